"""Envoy gRPC access log receiver (AccessLogService/StreamAccessLogs) -> request_log."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from audit.bodies import BODY_SPOOL_DIR, BODY_SPOOL_WHEN_FULL, BodyWriter, captured, load_or_create_key
from audit.chain import CHECKPOINT_LOG, signing_key
from audit.entry import MalformedEntry, Namespaces, RowFacts, entry_to_row
from audit.ledger import Spend, SpendRecorder
from audit.observe import RequestObserver
from audit.spool import Spool
from audit.writer import RequestLogWriter, new_chain_id
from ccr import metrics
from ccr.config import GatewayConfig
from ccr.config_sync import on_config
from ccr.runtime import Runtime
from ccr.service import on_drain

log = logging.getLogger("ccr.audit")
# Messages of one stream read ahead of their rows' durability (the writer commits them together).
IN_FLIGHT = 32


class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):
    def __init__(self, writer: RequestLogWriter, spend: SpendRecorder | None = None,
                 observer: RequestObserver | None = None, facts: RowFacts | None = None,
                 bodies: BodyWriter | None = None) -> None:
        self.writer = writer
        self.bodies = bodies  # captured bodies, encrypted here (audit/bodies.py); None: audit.bodies is empty
        self.facts = facts  # provider, region, model spelling and prices from the config (audit/entry.py)
        self.observer = observer  # metrics and spans per request (audit/observe.py); None: metrics off
        self.spend = spend  # ledger rows and settlements (audit/ledger.py); None: spend is off
        # Set when this receiver drains (ccr.service.on_drain): each stream ends after its next message.
        self.draining = False

    async def StreamAccessLogs(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext,
    ) -> als_pb2.StreamAccessLogsResponse:
        skipped = 0
        pending: deque[asyncio.Future[None]] = deque()
        async for msg in request_iterator:
            if msg.HasField("identifier"):  # only on a stream's first message
                log.info("access log stream: node=%r log_name=%r peer=%s",
                         msg.identifier.node.id, msg.identifier.log_name, context.peer())
            if msg.WhichOneof("log_entries") != "http_logs":
                continue
            for entry in msg.http_logs.log_entry:
                ns = Namespaces(entry.common_properties)  # read once for the row, the metrics and the ledger
                try:
                    row = entry_to_row(entry, self.facts, ns)
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
                    if self.observer is not None:
                        self.observer.entry(entry, ns)
                if self.bodies is not None:
                    try:
                        c = captured(entry)
                        if c is not None:
                            await self.bodies.put(c)
                    except Exception:
                        log.exception("captured bodies of request_id=%r unreadable; not stored",
                                      entry.request.request_id)
                if self.spend is not None:  # spend (issue 8): cost, ledger row, settlement
                    try:
                        await self.spend.on_entry(entry, ns, row[0] if row is not None else None)
                    except Exception:
                        log.exception("spend accounting failed for request_id=%r", entry.request.request_id)
            # At most IN_FLIGHT messages of a stream are read before their rows are durable
            # (committed or spooled): what Envoy sent is safe within a few messages, and a stalled
            # writer stops the reading, which holds Envoy back.
            pending.append(await self.writer.mark())
            if self.draining:
                # Draining, and Envoy was told NOT_SERVING: end the stream now, right after a message.
                # Envoy sends the next batch on a new stream to another replica; only a batch it sent
                # in the moment before our end reaches it is lost (ALS has no acknowledgement). Were
                # the stream held to the drain deadline instead, grpc would cancel it there with every
                # message it had buffered unread (many, while PostgreSQL is slow) and a half-handled one.
                # Answered at once, before its rows are durable: the receiver's cleanup flushes them
                # (writer.stop) before the process exits.
                log.info("draining: access log stream from %s ended after its last message", context.peer())
                return als_pb2.StreamAccessLogsResponse()
            if len(pending) > IN_FLIGHT:
                await pending.popleft()
        # Envoy holds a stream open for its lifetime; when one ends, answer only after
        # its rows are durable, so a closed stream means a kept log.
        await self.writer.flush()
        if self.spend is not None:
            await self.spend.flush()
        if self.bodies is not None:
            await self.bodies.flush()
        if skipped:
            log.warning("access log stream ended; %d malformed entries skipped", skipped)
        return als_pb2.StreamAccessLogsResponse()


def make_writer(config: GatewayConfig, runtime: Runtime) -> RequestLogWriter:
    """This process's writer: its own chain, its own spool directory, the run's signing key."""
    a = config.audit
    audit_dir = Path(runtime.audit_dir) if runtime.audit_dir else Path(runtime.run_dir) / "audit"
    chain_id = new_chain_id()
    spool = Spool(audit_dir / "spool", chain_id, a.spool_max_bytes)
    spool.open()
    log.info("audit chain %s; spool %s; checkpoint key %s", chain_id, spool.dir, audit_dir / "signing.key")
    return RequestLogWriter(runtime.audit_dsn or runtime.postgres_dsn, spool=spool, signer=signing_key(audit_dir),
                            chain_id=chain_id, write_timeout=a.write_timeout_s,
                            checkpoint_every_s=a.checkpoint_interval_s, checkpoint_every_rows=a.checkpoint_every_rows,
                            checkpoint_log=audit_dir / CHECKPOINT_LOG)


async def setup(
    server: grpc.aio.Server, config: GatewayConfig, runtime: Runtime
) -> Callable[[], Awaitable[None]]:
    writer = make_writer(config, runtime)
    writer.start()
    spend = None
    if config.spend.enabled:
        spool = Path(runtime.config_path).resolve().parent / config.storage.data_dir / config.spend.spool_dir
        # As the request_log writer: the insert-only role when ccr manages PostgreSQL (migration 10
        # grants it the ledger), else the configured DSN.
        spend = SpendRecorder(config, runtime.audit_dsn or runtime.postgres_dsn, runtime.redis_url, spool)
        spend.start()
    observer = RequestObserver(config) if config.telemetry.metrics or config.telemetry.otlp_endpoint else None
    if config.telemetry.metrics and writer.spool is not None:
        metrics.watch_spool(writer.spool)
    bodies = None
    audit_dir = Path(runtime.audit_dir) if runtime.audit_dir else Path(runtime.run_dir) / "audit"
    body_spool_root = audit_dir / BODY_SPOOL_DIR
    # Bodies spooled before audit.bodies was emptied are still written (sealed: no key needed for that).
    left = body_spool_root.is_dir() and any(
        p.is_dir() and not p.name.startswith(".") for p in body_spool_root.iterdir())
    if config.audit.bodies or left:
        # Their own spool beside the rows' (sealed records only), named after this receiver's chain.
        body_spool = Spool(body_spool_root, writer.chain_id, config.audit.body_spool_max_bytes,
                           label="captured-body spool", when_full=BODY_SPOOL_WHEN_FULL)
        body_spool.open()
        # The body key is read by this process only (docs/audit.md "Bodies").
        key = load_or_create_key(audit_dir) if config.audit.bodies else None
        bodies = BodyWriter(runtime.audit_dsn or runtime.postgres_dsn, key, spool=body_spool,
                            write_timeout=config.audit.write_timeout_s)
        bodies.start()
        if config.telemetry.metrics:
            metrics.watch_spool(body_spool, "ccr_audit_body_spool", "the captured-body spool")
    servicer = AccessLogServicer(writer, spend, observer, RowFacts(config), bodies if config.audit.bodies else None)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(servicer, server)

    def use_config(new: GatewayConfig) -> None:
        """A new config version (ccr/config_sync.py): prices, providers and regions of the audit row, and
        metric labels of the new models."""
        servicer.facts = RowFacts(new)
        if servicer.observer is not None:
            servicer.observer = RequestObserver(new)
        if spend is not None:
            spend.spend = Spend(new)

    on_config(use_config)

    def drain() -> None:
        servicer.draining = True

    on_drain(drain)

    async def stop() -> None:
        await writer.stop()
        if bodies is not None:
            await bodies.stop()
        if spend is not None:
            await spend.stop()

    return stop
