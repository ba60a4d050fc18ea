"""Provider adapter (upstream ext_proc): credentials per provider and usage metering."""

from router.adapter.server import (
    PROVIDER_METADATA_KEY,
    USAGE_NAMESPACE,
    Adapter,
    AnthropicHandler,
    ProviderHandler,
    build_handlers,
    setup,
)

__all__ = [
    "PROVIDER_METADATA_KEY",
    "USAGE_NAMESPACE",
    "Adapter",
    "AnthropicHandler",
    "ProviderHandler",
    "build_handlers",
    "setup",
]
