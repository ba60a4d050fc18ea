"""Cost of a request from metered usage and the config's price table, in integer micro-USD.

Prices are USD per million tokens, which is exactly micro-USD per token; they are turned
once into integer pico-USD per token (Decimal from the YAML text, no float arithmetic), the
parts of a request are summed in pico-USD and rounded up to micro-USD once. Money is never a
float sum.

Usage rules (router/usage.py and router/meter.lua publish the counts):
- streamed usage is cumulative: the meter keeps the provider's last value, never a sum;
- an aborted stream is billed for what was produced (the meter's `partial`/`estimated` counts);
- cache writes are priced by lifetime: 5-minute at `cache_write`, 1-hour at `cache_write_1h`;
  a write count without the split is priced at the 1-hour price (the dearer: never under-billed);
- Message Batches results are billed at the batch discount (50%);
- a price with `long_context` prices a request whose prompt (input tokens, cache writes and cache
  reads together) is over its threshold wholly at the long-context rates, output included.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import ROUND_CEILING, Decimal

from ccr.config import GatewayConfig, LongContextPrice, Price

PICO_PER_MICRO = 1_000_000
MICRO_PER_USD = 1_000_000
BATCH_DISCOUNT_PERCENT = 50  # Anthropic bills Message Batches at half price
ANY_PROMPT = 1 << 62  # a prompt longer than any long-context threshold: at_most(ANY_PROMPT) is the dearest


def _pico(usd_per_mtok: float) -> int:
    # USD/MTok == micro-USD/token; x 1e6 -> pico-USD/token. str() gives the YAML's own digits.
    return int((Decimal(str(usd_per_mtok)) * PICO_PER_MICRO).to_integral_value(ROUND_CEILING))


@dataclass(frozen=True, slots=True)
class Rates:
    """One model's prices in pico-USD per token; with `long`, the rates of prompts over `long_over` tokens."""

    input: int
    output: int
    cache_write_5m: int
    cache_write_1h: int
    cache_read: int
    long: Rates | None = None
    long_over: int = 0

    @classmethod
    def of(cls, p: Price) -> Rates:
        flat = cls._flat(p)
        if p.long_context is None:
            return flat
        return replace(flat, long=cls._flat(p.long_context), long_over=p.long_context.over_prompt_tokens)

    @classmethod
    def _flat(cls, p: Price | LongContextPrice) -> Rates:
        w1h = p.cache_write_1h if p.cache_write_1h is not None else max(2 * p.input, p.cache_write)
        return cls(_pico(p.input), _pico(p.output), _pico(p.cache_write), _pico(w1h), _pico(p.cache_read))

    def for_prompt(self, prompt_tokens: int) -> Rates:
        """The rates a request whose prompt has this many tokens is priced at."""
        return self.long if self.long is not None and prompt_tokens > self.long_over else self

    def at_most(self, prompt_tokens: int) -> Rates:
        """Rates no lower than those of any prompt of at most this many tokens (for worst cases): past the
        long-context threshold either set may apply, so each price is the dearer of the two."""
        long = self.long
        if long is None or prompt_tokens <= self.long_over:
            return self
        return Rates(max(self.input, long.input), max(self.output, long.output),
                     max(self.cache_write_5m, long.cache_write_5m), max(self.cache_write_1h, long.cache_write_1h),
                     max(self.cache_read, long.cache_read))

    def no_dearer_than(self, other: Rates) -> bool:
        """Every price here, for a short prompt and for a long one, is at most `other`'s."""
        def parts(r: Rates) -> tuple[int, ...]:
            return r.input, r.output, r.cache_write_5m, r.cache_write_1h, r.cache_read

        return all(a <= b for a, b in zip(parts(self), parts(other), strict=True)) and all(
            a <= b for a, b in zip(parts(self.at_most(ANY_PROMPT)), parts(other.at_most(ANY_PROMPT)), strict=True))

    @property
    def dearest_input(self) -> int:
        """The most an input token can cost (plain, or written to either cache) at these rates."""
        return max(self.input, self.cache_write_5m, self.cache_write_1h, self.cache_read)


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    # The split of cache_creation_input_tokens by lifetime, when the provider gave it.
    cache_creation_5m_input_tokens: int | None = None
    cache_creation_1h_input_tokens: int | None = None


def micro_from_pico(pico: int) -> int:
    return -(-pico // PICO_PER_MICRO)  # round up: a fraction of a micro-dollar is still charged


def cost_pico(u: Usage, r: Rates, *, batch: bool = False) -> int:
    writes = u.cache_creation_input_tokens
    r = r.for_prompt(u.input_tokens + writes + u.cache_read_input_tokens)
    w5, w1 = u.cache_creation_5m_input_tokens, u.cache_creation_1h_input_tokens
    if w5 is None and w1 is None:
        write_cost = writes * r.cache_write_1h
    else:
        w5, w1 = w5 or 0, w1 or 0
        rest = max(writes - w5 - w1, 0)  # counted but not split: the dearer price
        write_cost = w5 * r.cache_write_5m + w1 * r.cache_write_1h + rest * r.cache_write_1h
    total = (u.input_tokens * r.input + u.output_tokens * r.output + write_cost
             + u.cache_read_input_tokens * r.cache_read)
    if batch:
        total = total * (100 - BATCH_DISCOUNT_PERCENT) // 100
    return total


def cost_micro(u: Usage, r: Rates, *, batch: bool = False) -> int:
    return micro_from_pico(cost_pico(u, r, batch=batch))


def worst_case_micro(r: Rates, body_bytes: int, max_tokens: int, tokens_per_byte: float = 1.0) -> int:
    """The most a Messages request can cost: every body byte an input token at the dearest input
    price (a token is at least a byte of text), plus max_tokens of output."""
    input_bound = int(Decimal(body_bytes) * Decimal(str(tokens_per_byte)) + 1)
    r = r.at_most(input_bound)  # a prompt that may be long: the dearer of both rates
    return micro_from_pico(input_bound * r.dearest_input + max(max_tokens, 0) * r.output)


def batch_worst_case_micro(requests: list[tuple[Rates, int]], body_bytes: int, tokens_per_byte: float = 1.0) -> int:
    """The most a Message Batch can cost, at the batch discount: all its requests' input together is at
    most the batch body's bytes (priced at the dearest input price among its models), plus each
    request's max_tokens at its model's output price."""
    if not requests:
        return 0
    input_bound = int(Decimal(body_bytes) * Decimal(str(tokens_per_byte)) + 1)
    # No request's prompt is longer than the whole batch body: its rates for a prompt of that bound.
    requests = [(r.at_most(input_bound), mt) for r, mt in requests]
    pico = input_bound * max(r.dearest_input for r, _ in requests) + sum(max(mt, 0) * r.output for r, mt in requests)
    return micro_from_pico(-(-pico * (100 - BATCH_DISCOUNT_PERCENT) // 100))  # rounded up, as everything here


class PriceTable:
    """Rates by model id, resolved like routing (first matching `models` entry), cached."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._by_entry = [Rates.of(m.price) for m in config.models]
        self._cache: dict[str, Rates | None] = {}

    def rates(self, model: str | None) -> Rates | None:
        if model is None:
            return None
        try:
            return self._cache[model]
        except KeyError:
            pass
        found = None
        for i, m in enumerate(self.config.models):
            if self.config.route_model(model) is m:
                found = self._by_entry[i]
                break
        if len(self._cache) >= 10_000:
            self._cache.clear()  # model ids come from clients
        self._cache[model] = found
        return found


def usd(micro: int) -> str:
    """Micro-USD as a dollar string with 6 decimals (exact)."""
    sign = "-" if micro < 0 else ""
    q, r = divmod(abs(micro), MICRO_PER_USD)
    return f"{sign}{q}.{r:06d}"


def parse_usd(text: str) -> int:
    """"20", "20.5", "$0.000001" -> micro-USD; refuses more than 6 decimals or a negative amount."""
    t = text.strip().removeprefix("$")
    try:
        d = Decimal(t)
    except Exception:
        raise ValueError(f"not an amount in USD: {text!r}") from None
    if not d.is_finite() or d < 0:
        raise ValueError(f"amount must be a non-negative number of USD, got {text!r}")
    micro = d * MICRO_PER_USD
    if micro != micro.to_integral_value():
        raise ValueError(f"amount {text!r} has more than 6 decimals (micro-USD is the unit)")
    return int(micro)
