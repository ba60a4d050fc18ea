"""The worst-case cost of a Messages request, for the budget reservation made at admission.

extauth has the model, max_tokens and the body size; it puts them, priced, with the principal's
budget subjects into AUTHZ_NS[AUTHZ_SPEND] (ccr/budgets.py spend_facts_json). The route turns
that into the spend descriptor (router/resources.py) and ratelimit/spend.py reserves it.
Only `messages.create` is reserved: count_tokens is never blocked by a budget.
"""

from __future__ import annotations

from typing import Any

from ccr.budgets import Facts, spend_facts_json
from ccr.config import GatewayConfig
from ccr.pricing import PriceTable, worst_case_micro
from extauth.principal import Principal

RESERVED_ENDPOINTS = frozenset({"messages.create"})


class WorstCase:
    def __init__(self, config: GatewayConfig) -> None:
        self.prices = PriceTable(config)
        self.tokens_per_byte = config.spend.input_tokens_per_byte

    def facts(self, p: Principal, endpoint: str, model: str | None, doc: dict[str, Any] | None,
              body_bytes: int) -> str | None:
        """AUTHZ_SPEND for this request, or None when it reserves nothing (not a Messages create)."""
        if endpoint not in RESERVED_ENDPOINTS or doc is None:
            return None
        rates = self.prices.rates(model)
        if rates is None:
            return None  # unroutable models are refused before this
        mt = doc.get("max_tokens")
        max_tokens = mt if isinstance(mt, int) and not isinstance(mt, bool) and mt > 0 else 0
        reserve = worst_case_micro(rates, body_bytes, max_tokens, self.tokens_per_byte)
        f = Facts(p.id, str(p.kind), p.key_id, tuple(p.groups), p.tenant, p.spiffe_id)
        return spend_facts_json(reserve, f, model)
