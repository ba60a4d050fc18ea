"""Anthropic message generation shared by the provider emulators (emulators/anthropic.py's rules):
a reply, as a Message or as the stream events the Anthropic API sends for it."""

from __future__ import annotations

from typing import Any

from emulators.anthropic import TOKENS_PER_DELTA, PromptCache, Reply, _chunk, _rand_id, generate, scan_prompt

Json = dict[str, Any]


class Replies:
    def __init__(self, output_tokens: int = 24) -> None:
        self.cache = PromptCache()
        self.output_tokens = output_tokens

    def make(self, body: Json, model: str) -> tuple[Json, list[Json], Reply]:
        """(Message, stream events without pings, reply) for an Anthropic-shaped body."""
        usage = self.cache.apply(scan_prompt({**body, "model": model}))
        reply = generate(body, self.output_tokens)
        msg_id = _rand_id("msg_01", 22)
        message = {"id": msg_id, "type": "message", "role": "assistant", "model": model, "content": reply.blocks,
                   "stop_reason": reply.stop_reason, "stop_sequence": reply.stop_sequence,
                   "usage": {**usage, "output_tokens": reply.output_tokens}}
        events: list[Json] = [{"type": "message_start", "message": {
            **message, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {**usage, "output_tokens": 1}}}]
        for idx, (block, frags) in enumerate(zip(reply.blocks, reply.fragments, strict=True)):
            kind = block["type"]
            if kind == "tool_use":
                empty: Json = {**block, "input": {}}
                deltas = [{"type": "input_json_delta", "partial_json": t} for t in frags]
            elif kind == "thinking":
                empty = {"type": "thinking", "thinking": "", "signature": ""}
                deltas = [{"type": "thinking_delta", "thinking": t} for t in _chunk(frags, TOKENS_PER_DELTA)]
                deltas.append({"type": "signature_delta", "signature": block["signature"]})
            else:
                empty = {"type": "text", "text": ""}
                deltas = [{"type": "text_delta", "text": t} for t in _chunk(frags, TOKENS_PER_DELTA)]
            events.append({"type": "content_block_start", "index": idx, "content_block": empty})
            events += [{"type": "content_block_delta", "index": idx, "delta": d} for d in deltas]
            events.append({"type": "content_block_stop", "index": idx})
        final = {k: usage[k] for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")}
        events.append({"type": "message_delta", "delta": {"stop_reason": reply.stop_reason,
                                                          "stop_sequence": reply.stop_sequence},
                       "usage": {**final, "output_tokens": reply.output_tokens}})
        events.append({"type": "message_stop"})
        return message, events, reply
