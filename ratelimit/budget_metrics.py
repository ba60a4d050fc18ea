"""The budget gauges (ccr/metrics.py BudgetCollector) of the rate limit service.

At a scrape: the budgets this process enforces (BudgetSource, the last good read of the table), each
read by ccr/budget_usage.py (one ledger query, one Redis GET or a bounded MGET). The figures are kept
for `max_age_s` so scrapers in a hurry, or several of them, cost one read; a failing read serves the
last good figures (logged once per outage). Never on the decision path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import psycopg
import redis

from ccr import metrics
from ccr.budget_usage import BudgetUsage, budget_usage
from ratelimit.spend import BudgetSource

log = logging.getLogger("ccr.spend")


class BudgetMetrics:
    def __init__(self, source: BudgetSource, dsn: str, client: redis.Redis, timezone: str,
                 max_age_s: float = 5.0, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.dsn = dsn
        self.client = client
        self.timezone = timezone
        self.max_age_s = max_age_s
        self.clock = clock
        self.monotonic = monotonic
        self._lock = threading.Lock()
        self._at: float | None = None
        self._last: list[BudgetUsage] = []
        self._failing = False

    def snapshot(self) -> list[BudgetUsage]:
        with self._lock:
            if self._at is not None and self.monotonic() - self._at < self.max_age_s:
                return self._last
            index = self.source.index
            if index is None:
                return []
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=2,
                                     application_name="ccr-ratelimit-metrics") as conn:
                    now = self.clock()
                    self._last = [budget_usage(conn, b, self.timezone, now, self.client) for b in index.all]
                self._failing = False
            except (psycopg.Error, OSError) as e:
                if not self._failing:
                    log.warning("budget metrics: ledger not readable (%s); serving the last figures", e)
                self._failing = True
            self._at = self.monotonic()
            return self._last

    def install(self) -> BudgetMetrics:
        metrics.BUDGETS.source = self.snapshot
        return self

    def uninstall(self) -> None:
        if metrics.BUDGETS.source == self.snapshot:
            metrics.BUDGETS.source = None
