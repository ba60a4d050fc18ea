"""Client side: OpenAI Chat Completions callers (`POST /v1/chat/completions`, the openai SDK).

Chat Completions -> Anthropic Messages: system and developer messages become the system prompt,
text and image parts content blocks, assistant tool calls tool_use blocks, `tool` messages
tool_result blocks; functions become tools. Replies go back as a chat.completion, or as
chat.completion.chunk events ending in `[DONE]`, with a usage chunk when the request asked for
it (stream_options.include_usage). Options with no Messages equivalent are refused (n > 1).
"""

from __future__ import annotations

import time

import orjson

from router.adapter.translators.base import (
    ClientSide,
    Event,
    Json,
    StreamEncoder,
    TranslationError,
    loads_object,
    new_id,
)

DEFAULT_MAX_TOKENS = 4096  # Chat Completions may omit it; Messages requires it
STOP_TO_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
                  "refusal": "content_filter", "pause_turn": "stop"}
ERROR_TYPES = {"invalid_request_error": "invalid_request_error", "authentication_error": "authentication_error",
               "permission_error": "permission_error", "not_found_error": "not_found_error",
               "rate_limit_error": "rate_limit_exceeded", "overloaded_error": "server_error",
               "api_error": "server_error"}


def _content_blocks(content: object, where: str) -> list[Json]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if content is None:
        return []
    if not isinstance(content, list):
        raise TranslationError(f"{where}.content: must be a string or a list of parts")
    blocks: list[Json] = []
    for i, part in enumerate(content):
        t = part.get("type") if isinstance(part, dict) else None
        if t == "text":
            blocks.append({"type": "text", "text": str(part.get("text", ""))})
        elif t == "image_url":
            url = str((part.get("image_url") or {}).get("url", ""))
            if url.startswith("data:") and ";base64," in url:
                media, data = url[5:].split(";base64,", 1)
                blocks.append({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}})
            else:
                blocks.append({"type": "image", "source": {"type": "url", "url": url}})
        else:
            raise TranslationError(f"{where}.content[{i}]: part type {t!r} is not supported")
    return blocks


def to_anthropic(doc: Json) -> tuple[Json, bool, bool]:
    """(Anthropic request, streaming, include usage chunk)."""
    if doc.get("n") not in (None, 1):
        raise TranslationError("n: only 1 choice per request is supported")
    msgs = doc.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise TranslationError("messages: a non-empty list is required")
    system: list[str] = []
    out: list[Json] = []

    def add(role: str, blocks: list[Json]) -> None:
        if not blocks:
            return
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})

    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise TranslationError(f"messages[{i}]: must be an object")
        role = m.get("role")
        if role in ("system", "developer"):
            system.extend(b["text"] for b in _content_blocks(m.get("content"), f"messages[{i}]") if b["type"] == "text")
        elif role == "user":
            add("user", _content_blocks(m.get("content"), f"messages[{i}]"))
        elif role == "assistant":
            blocks = _content_blocks(m.get("content"), f"messages[{i}]")
            for call in m.get("tool_calls") or ():
                fn = call.get("function") or {}
                try:
                    inp = orjson.loads(fn.get("arguments") or "{}")
                except orjson.JSONDecodeError:
                    raise TranslationError(f"messages[{i}].tool_calls: arguments are not valid JSON") from None
                blocks.append({"type": "tool_use", "id": call.get("id") or new_id("toolu_"),
                               "name": fn.get("name", ""), "input": inp if isinstance(inp, dict) else {}})
            add("assistant", blocks)
        elif role == "tool":
            c = m.get("content")
            text = c if isinstance(c, str) else "".join(b.get("text", "") for b in _content_blocks(c, "tool"))
            add("user", [{"type": "tool_result", "tool_use_id": m.get("tool_call_id"), "content": text}])
        else:
            raise TranslationError(f"messages[{i}].role: {role!r} is not supported")
    req: Json = {"model": doc.get("model"), "messages": out,
                 "max_tokens": doc.get("max_completion_tokens") or doc.get("max_tokens") or DEFAULT_MAX_TOKENS}
    if system:
        req["system"] = "\n\n".join(system)
    for k in ("temperature", "top_p"):
        if doc.get(k) is not None:
            req[k] = doc[k]
    stop = doc.get("stop")
    if stop:
        req["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    tools = doc.get("tools")
    if tools:
        req["tools"] = [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
                         "input_schema": t["function"].get("parameters") or {"type": "object", "properties": {}}}
                        for t in tools if isinstance(t, dict) and t.get("type") == "function"]
    tc = doc.get("tool_choice")
    if tc is not None and tools:
        if tc == "auto":
            req["tool_choice"] = {"type": "auto"}
        elif tc == "required":
            req["tool_choice"] = {"type": "any"}
        elif tc == "none":
            req["tool_choice"] = {"type": "none"}
        elif isinstance(tc, dict):
            req["tool_choice"] = {"type": "tool", "name": (tc.get("function") or {}).get("name")}
        if doc.get("parallel_tool_calls") is False and req["tool_choice"]["type"] != "none":
            req["tool_choice"]["disable_parallel_tool_use"] = True
    streaming = doc.get("stream") is True
    opts = doc.get("stream_options")
    include_usage = streaming and isinstance(opts, dict) and opts.get("include_usage") is True
    if streaming:
        req["stream"] = True
    return req, streaming, include_usage


def chat_usage(u: Json) -> Json:
    cached = int(u.get("cache_read_input_tokens") or 0)
    prompt = int(u.get("input_tokens") or 0) + cached + int(u.get("cache_creation_input_tokens") or 0)
    out = int(u.get("output_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out,
            "prompt_tokens_details": {"cached_tokens": cached}}


class ChatChunkEncoder(StreamEncoder):
    def __init__(self, include_usage: bool) -> None:
        self._include_usage = include_usage
        self._id = new_id("chatcmpl-")
        self._created = int(time.time())
        self._model = ""
        self._usage: Json = {}
        self._tool_index = -1
        self._tool_blocks: dict[int, int] = {}  # Anthropic block index -> tool call index

    def _chunk(self, delta: Json, finish: str | None = None, usage: Json | None = None, choices: bool = True) -> bytes:
        doc: Json = {"id": self._id, "object": "chat.completion.chunk", "created": self._created,
                     "model": self._model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []}
        if usage is not None:
            doc["usage"] = usage
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    def encode(self, events: list[Event]) -> bytes:
        out: list[bytes] = []
        for e in events:
            t = e.get("type")
            if t == "message_start":
                msg = e.get("message") or {}
                self._model = str(msg.get("model", ""))
                self._usage = dict(msg.get("usage") or {})
                out.append(self._chunk({"role": "assistant", "content": ""}))
            elif t == "content_block_start":
                b = e.get("content_block") or {}
                if b.get("type") == "tool_use":
                    self._tool_index += 1
                    self._tool_blocks[int(e.get("index", 0))] = self._tool_index
                    out.append(self._chunk({"tool_calls": [{"index": self._tool_index, "id": b.get("id"),
                                                            "type": "function",
                                                            "function": {"name": b.get("name"), "arguments": ""}}]}))
            elif t == "content_block_delta":
                d = e.get("delta") or {}
                if d.get("type") == "text_delta":
                    out.append(self._chunk({"content": d.get("text", "")}))
                elif d.get("type") == "input_json_delta" and d.get("partial_json"):
                    k = self._tool_blocks.get(int(e.get("index", 0)), 0)
                    out.append(self._chunk({"tool_calls": [{"index": k, "function": {
                        "arguments": d["partial_json"]}}]}))
            elif t == "message_delta":
                self._usage.update({k: v for k, v in (e.get("usage") or {}).items() if v is not None})
                stop = (e.get("delta") or {}).get("stop_reason")
                out.append(self._chunk({}, STOP_TO_FINISH.get(stop or "end_turn", "stop")))
            elif t == "message_stop":
                if self._include_usage:
                    out.append(self._chunk({}, usage=chat_usage(self._usage), choices=False))
                out.append(b"data: [DONE]\n\n")
            elif t == "ping":  # the provider's keep-alive, as one an OpenAI client skips
                out.append(self.ping())
            elif t == "error":
                err = e.get("error") or {}
                out.append(b"data: " + orjson.dumps({"error": {
                    "message": err.get("message", ""), "type": ERROR_TYPES.get(err.get("type", ""), "server_error"),
                    "code": None}}) + b"\n\n")
        return b"".join(out)

    def ping(self) -> bytes:
        return b": ping\n\n"  # an SSE comment: OpenAI clients skip it


class OpenAIClient(ClientSide):
    def __init__(self) -> None:
        self._include_usage = False

    def parse(self, body: bytes, path: str, model: str | None) -> tuple[Json, bool]:
        req, streaming, self._include_usage = to_anthropic(loads_object(body, "a Chat Completions request"))
        return req, streaming

    def stream_encoder(self) -> StreamEncoder:
        return ChatChunkEncoder(self._include_usage)

    def message(self, msg: Json) -> bytes:
        text = "".join(b.get("text", "") for b in msg.get("content") or () if b.get("type") == "text")
        calls = [{"id": b.get("id"), "type": "function",
                  "function": {"name": b.get("name"), "arguments": orjson.dumps(b.get("input") or {}).decode()}}
                 for b in msg.get("content") or () if b.get("type") == "tool_use"]
        message: Json = {"role": "assistant", "content": text or None}
        if calls:
            message["tool_calls"] = calls
        return orjson.dumps({
            "id": new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()),
            "model": msg.get("model", ""),
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": STOP_TO_FINISH.get(msg.get("stop_reason") or "end_turn", "stop")}],
            "usage": chat_usage(msg.get("usage") or {})})

    def error(self, status: int, err_type: str, message: str) -> tuple[int, dict[str, str], bytes]:
        return status, {"content-type": "application/json"}, orjson.dumps({"error": {
            "message": message, "type": ERROR_TYPES.get(err_type, err_type), "param": None, "code": None}})
