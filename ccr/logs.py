"""How every ccr process logs: one readable line per record, or JSON lines for log shippers.

A request id travels with the records logged while a request is handled: set REQUEST_ID (a
context variable, so concurrent calls on one event loop keep theirs apart) or pass
`extra={"request_id": ...}`; the JSON formatter writes it as `request_id`.
"""

from __future__ import annotations

import contextvars
import logging
import os
from datetime import UTC, datetime

import orjson

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("ccr_request_id", default=None)


class JsonLines(logging.Formatter):
    """One JSON object per record: ts (UTC, RFC 3339), level, service, logger, msg, request_id, exc."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "service": self.service,
            "pid": record.process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or REQUEST_ID.get()
        if rid:
            out["request_id"] = rid
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        # Never raises on odd values (bytes, objects): they are written as their str().
        return orjson.dumps(out, default=str).decode()


class _Text(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s {service} %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None) or REQUEST_ID.get()
        return f"{line} request_id={rid}" if rid else line


def start_logging(service: str, fmt: str = "text") -> None:
    """Root logging for process `service`; the level comes from CCR_LOG_LEVEL (default INFO)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines(service) if fmt == "json" else _Text(service))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(os.environ.get("CCR_LOG_LEVEL", "INFO"))
