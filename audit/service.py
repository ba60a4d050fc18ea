"""Envoy gRPC access log receiver (AccessLogService/StreamAccessLogs) -> request_log."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from audit.entry import MalformedEntry, entry_to_row
from audit.ledger import SpendRecorder
from audit.writer import RequestLogWriter
from ccr.config import GatewayConfig
from ccr.runtime import Runtime

log = logging.getLogger("ccr.audit")


class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):
    def __init__(self, writer: RequestLogWriter, spend: SpendRecorder | None = None) -> None:
        self.writer = writer
        self.spend = spend  # ledger rows and settlements (audit/ledger.py); None: spend is off

    async def StreamAccessLogs(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> als_pb2.StreamAccessLogsResponse:
        skipped = 0
        async for msg in request_iterator:
            if msg.HasField("identifier"):  # only on a stream's first message
                log.info("access log stream: node=%r log_name=%r peer=%s",
                         msg.identifier.node.id, msg.identifier.log_name, context.peer())
            if msg.WhichOneof("log_entries") != "http_logs":
                continue
            for entry in msg.http_logs.log_entry:
                try:
                    row = entry_to_row(entry)
                except MalformedEntry as e:
                    skipped += 1
                    log.warning("skipping access log entry request_id=%r: %s", entry.request.request_id, e)
                    continue
                except Exception:
                    # Whatever else one entry does wrong, the others still get their rows.
                    skipped += 1
                    log.exception("skipping access log entry request_id=%r", entry.request.request_id)
                    continue
                if row is not None:
                    await self.writer.put(row)
                if self.spend is not None:  # spend seam (issue 8): cost, ledger row, settlement
                    try:
                        await self.spend.on_entry(entry)
                    except Exception:
                        log.exception("spend accounting failed for request_id=%r", entry.request.request_id)
        # Envoy holds a stream open for its lifetime; when one ends, answer only after
        # its rows are committed, so a closed stream means a written log.
        await self.writer.flush()
        if self.spend is not None:
            await self.spend.flush()
        if skipped:
            log.warning("access log stream ended; %d malformed entries skipped", skipped)
        return als_pb2.StreamAccessLogsResponse()


async def setup(
    server: grpc.aio.Server, config: GatewayConfig, runtime: Runtime
) -> Callable[[], Awaitable[None]]:
    writer = RequestLogWriter(runtime.postgres_dsn)
    writer.start()
    spend = None
    if config.spend.enabled:
        spool = Path(runtime.config_path).resolve().parent / config.storage.data_dir / config.spend.spool_dir
        spend = SpendRecorder(config, runtime.postgres_dsn, runtime.redis_url, spool)
        spend.start()
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(AccessLogServicer(writer, spend), server)

    async def stop() -> None:
        await writer.stop()
        if spend is not None:
            await spend.stop()

    return stop
