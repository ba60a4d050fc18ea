"""The worst-case cost of a Messages request, for the budget reservation made at admission.

extauth has the model, max_tokens and the body size; it prices the worst case and puts it in
AUTHZ_NS as `spend_worst` (a number: the ledger charges it when usage cannot be read) and, when a
budget may apply to the principal, with the principal's budget subjects as AUTHZ_SPEND (ccr/budgets.py
spend_facts_json). Only AUTHZ_SPEND makes the route send the spend descriptor (router/resources.py),
so a principal without any budget costs no rate limit call at all. Only `messages.create` is
reserved: count_tokens is never blocked by a budget. Batch results are charged (never refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import psycopg

from ccr.budgets import Facts, SubjectKind, spend_facts_json
from ccr.config import GatewayConfig
from ccr.pricing import PriceTable, batch_worst_case_micro, worst_case_micro
from extauth.objects import ObjectFacts
from extauth.principal import Principal

log = logging.getLogger(__name__)

RESERVED_ENDPOINTS = frozenset({"messages.create"})
# A batch create reserves the whole batch's worst case at the batch discount; the access-log receiver
# holds it (audit/ledger.py) until the batch's results are first fetched and charged, which releases it.
BATCH_CREATE = "batches.create"
# Batch results carry the (discounted) cost of a whole batch, metered on their first fetch: they are
# charged to the budgets' counters (a zero reservation settled to the cost) but never refused.
CHARGED_ENDPOINTS = frozenset({"batches.results"})


class BudgetSubjects:
    """Which (subject kind, subject) pairs have a budget, re-read every `refresh_s`.

    Until the first successful read every principal may have one (the rate limit service, which
    reads the same table, then decides): never admit unreserved because of a stale view here.
    """

    def __init__(self, dsn: str, refresh_s: float) -> None:
        self.dsn = dsn
        self.refresh_s = refresh_s
        self.subjects: frozenset[tuple[str, str]] | None = None
        self._task: asyncio.Task[None] | None = None
        # Kept open between refreshes (autocommit: never idle in a transaction): a new connection each
        # second cost this process ~3 ms of CPU (SCRAM) and PostgreSQL a backend start (docs/hot-path.md).
        self._conn: psycopg.AsyncConnection | None = None

    async def load_once(self) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            conn = self._conn = await psycopg.AsyncConnection.connect(
                self.dsn, connect_timeout=2, autocommit=True, application_name="ccr-extauth-budgets")
        try:
            cur = await conn.execute("SELECT DISTINCT subject_kind, subject FROM budgets")
            rows = await cur.fetchall()
        except (psycopg.Error, OSError):
            self._conn = None
            with contextlib.suppress(Exception):
                await conn.close()
            raise
        self.subjects = frozenset((str(k), str(s)) for k, s in rows)

    async def start(self) -> None:
        with contextlib.suppress(psycopg.Error, OSError):
            await self.load_once()
        self._task = asyncio.create_task(self._run(), name="budget-subjects")

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.load_once()
                failing = False
            except (psycopg.Error, OSError) as e:
                if not failing:
                    log.warning("budget subjects not readable, keeping the last set: %s", e)
                failing = True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()

    def may_apply(self, p: Principal) -> bool:
        subjects = self.subjects
        if subjects is None:
            return True
        if not subjects:
            return False
        if p.tenant and (SubjectKind.TENANT, p.tenant) in subjects:
            return True
        if any((SubjectKind.GROUP, g) in subjects for g in p.groups):
            return True
        if str(p.kind) == "user" and (SubjectKind.USER, p.id) in subjects:
            return True
        if p.key_id and (SubjectKind.KEY, p.key_id) in subjects:
            return True
        return bool(p.spiffe_id and (SubjectKind.SPIFFE, p.spiffe_id) in subjects)


class WorstCase:
    def __init__(self, config: GatewayConfig, subjects: BudgetSubjects | None = None) -> None:
        self.prices = PriceTable(config)
        self.tokens_per_byte = config.spend.input_tokens_per_byte
        self.subjects = subjects  # None: every principal may have a budget (always reserve)

    def facts(self, p: Principal, endpoint: str, model: str | None, doc: dict[str, Any] | None,
              body_bytes: int, obj: ObjectFacts | None = None) -> tuple[int | None, str | None] | None:
        """(worst-case micro-USD, AUTHZ_SPEND or None when no budget applies), or None when the
        request reserves nothing (not a Messages or batch create). Batch results: (None, a charge-only
        AUTHZ_SPEND naming the create whose hold they release)."""
        if endpoint in CHARGED_ENDPOINTS:
            if self.subjects is not None and not self.subjects.may_apply(p):
                return None
            f = Facts(p.id, str(p.kind), p.key_id, tuple(p.groups), p.tenant, p.spiffe_id)
            hold = obj.create_request_id if obj is not None else None
            return None, spend_facts_json(0, f, None, charge_only=True, releases_hold=hold)
        if endpoint == BATCH_CREATE:
            if obj is None or not obj.batch:
                return None
            priced = [(self.prices.rates(m), mt) for m, mt in obj.batch]
            if any(r is None for r, _ in priced):
                return None  # unroutable models are refused before this
            reserve = batch_worst_case_micro([(r, mt) for r, mt in priced if r is not None], body_bytes,
                                             self.tokens_per_byte)
            if self.subjects is not None and not self.subjects.may_apply(p):
                return None
            f = Facts(p.id, str(p.kind), p.key_id, tuple(p.groups), p.tenant, p.spiffe_id)
            return reserve, spend_facts_json(reserve, f, None)
        if endpoint not in RESERVED_ENDPOINTS or doc is None:
            return None
        rates = self.prices.rates(model)
        if rates is None:
            return None  # unroutable models are refused before this
        mt = doc.get("max_tokens")
        max_tokens = mt if isinstance(mt, int) and not isinstance(mt, bool) and mt > 0 else 0
        reserve = worst_case_micro(rates, body_bytes, max_tokens, self.tokens_per_byte)
        if self.subjects is not None and not self.subjects.may_apply(p):
            return reserve, None
        f = Facts(p.id, str(p.kind), p.key_id, tuple(p.groups), p.tenant, p.spiffe_id)
        return reserve, spend_facts_json(reserve, f, model)
