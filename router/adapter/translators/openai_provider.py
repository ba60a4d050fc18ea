"""Provider side: OpenAI-compatible Chat Completions servers (vLLM, TGI, SGLang, ...).

Anthropic Messages -> Chat Completions: system prompt, text and image parts, tool definitions,
tool calls and results, stop sequences, sampling; streams ask for usage (stream_options
include_usage). Replies come back as an Anthropic Message, or as Anthropic stream events built
from the chunks (text deltas, tool-call argument deltas, the finish reason, usage).
Thinking blocks have no Chat Completions form and are dropped from the history.
"""

from __future__ import annotations

import orjson

from router.adapter.translators.base import (
    STATUS_ERROR_TYPES,
    Event,
    Json,
    ProviderError,
    ProviderSide,
    SseParser,
    StreamDecoder,
    TranslationError,
    Upstream,
    new_id,
)

FINISH_TO_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                  "function_call": "tool_use", "content_filter": "refusal"}


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def _user_parts(blocks: list[Json]) -> list[Json]:
    parts: list[Json] = []
    for b in blocks:
        t = b.get("type")
        if t == "text":
            parts.append({"type": "text", "text": b.get("text", "")})
        elif t == "image":
            src = b.get("source") or {}
            if src.get("type") == "base64":
                parts.append({"type": "image_url", "image_url": {
                    "url": f"data:{src.get('media_type', 'image/png')};base64,{src.get('data', '')}"}})
            elif src.get("type") == "url":
                parts.append({"type": "image_url", "image_url": {"url": src.get("url", "")}})
            else:
                raise TranslationError("image source type not supported by this provider (use base64 or url)")
        elif t in ("thinking", "redacted_thinking"):
            continue
        elif t == "document":
            raise TranslationError("document blocks are not supported by this provider")
    return parts


def to_chat_messages(req: Json) -> list[Json]:
    out: list[Json] = []
    system = req.get("system")
    if system:
        out.append({"role": "system", "content": _text(system)})
    for m in req.get("messages") or ():
        role, content = m.get("role"), m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        blocks = [b for b in content or () if isinstance(b, dict)]
        if role == "assistant":
            msg: Json = {"role": "assistant", "content": _text(blocks) or None}
            calls = [{"id": b.get("id"), "type": "function", "function": {
                "name": b.get("name"), "arguments": orjson.dumps(b.get("input") or {}).decode()}}
                for b in blocks if b.get("type") == "tool_use"]
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
            continue
        # user: tool results become "tool" messages (first, as the calls they answer came just before)
        for b in blocks:
            if b.get("type") == "tool_result":
                c = b.get("content")
                text = _text(c) if not isinstance(c, str) else c
                if b.get("is_error"):
                    text = f"[tool error] {text}"
                out.append({"role": "tool", "tool_call_id": b.get("tool_use_id"), "content": text})
        parts = _user_parts([b for b in blocks if b.get("type") != "tool_result"])
        if parts:
            only_text = all(p["type"] == "text" for p in parts)
            out.append({"role": "user", "content": "".join(p["text"] for p in parts) if only_text else parts})
    return out


def to_chat_request(req: Json, model: str, streaming: bool) -> Json:
    body: Json = {"model": model, "messages": to_chat_messages(req), "max_tokens": req.get("max_tokens")}
    for k in ("temperature", "top_p"):
        if req.get(k) is not None:
            body[k] = req[k]
    if req.get("stop_sequences"):
        body["stop"] = req["stop_sequences"]
    tools = [t for t in req.get("tools") or () if isinstance(t, dict) and t.get("type") in (None, "custom")]
    if tools:
        body["tools"] = [{"type": "function", "function": {
            "name": t.get("name"), "description": t.get("description", ""),
            "parameters": t.get("input_schema") or {"type": "object"}}} for t in tools]
    tc = req.get("tool_choice")
    if isinstance(tc, dict) and tools:
        kind = tc.get("type")
        body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(kind) or \
            {"type": "function", "function": {"name": tc.get("name")}}
        if tc.get("disable_parallel_tool_use"):
            body["parallel_tool_calls"] = False
    if streaming:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def usage_from_chat(u: object) -> Json:
    if not isinstance(u, dict):
        return {"input_tokens": 0, "output_tokens": 0}
    prompt = int(u.get("prompt_tokens") or 0)
    details = u.get("prompt_tokens_details") or {}
    cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
    return {"input_tokens": prompt - cached, "output_tokens": int(u.get("completion_tokens") or 0),
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def _tool_input(arguments: object) -> Json:
    if isinstance(arguments, dict):
        return arguments
    try:
        doc = orjson.loads(arguments or "{}")  # type: ignore[arg-type]
    except (orjson.JSONDecodeError, TypeError):
        return {"_raw_arguments": arguments}
    return doc if isinstance(doc, dict) else {"value": doc}


def chat_to_message(doc: Json, model: str) -> Json:
    choice = (doc.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    content: list[Json] = []
    if msg.get("content"):
        content.append({"type": "text", "text": _text(msg["content"])})
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or new_id("toolu_"), "name": fn.get("name", ""),
                        "input": _tool_input(fn.get("arguments"))})
    return {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": FINISH_TO_STOP.get(choice.get("finish_reason") or "stop", "end_turn"),
            "stop_sequence": None, "usage": usage_from_chat(doc.get("usage"))}


class ChatStreamDecoder(StreamDecoder):
    """Chat Completions chunks -> Anthropic events, one content block at a time."""

    def __init__(self, model: str) -> None:
        self._sse = SseParser()
        self._model = model
        self._started = False
        self._index = -1
        self._open: str | None = None  # "text" or "tool:<openai index>"
        self._finish: str | None = None
        self._usage: Json | None = None
        self._done = False

    def _start(self, out: list[Event]) -> None:
        if not self._started:
            self._started = True
            out.append({"type": "message_start", "message": {
                "id": new_id("msg_"), "type": "message", "role": "assistant", "model": self._model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}})

    def _block(self, out: list[Event], key: str, start: Json) -> None:
        if self._open == key:
            return
        self._close(out)
        self._index += 1
        self._open = key
        out.append({"type": "content_block_start", "index": self._index, "content_block": start})

    def _close(self, out: list[Event]) -> None:
        if self._open is not None:
            out.append({"type": "content_block_stop", "index": self._index})
            self._open = None

    def _chunk(self, doc: Json, out: list[Event]) -> None:
        self._start(out)
        if doc.get("usage"):
            self._usage = usage_from_chat(doc["usage"])
        for choice in doc.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self._block(out, "text", {"type": "text", "text": ""})
                out.append({"type": "content_block_delta", "index": self._index,
                            "delta": {"type": "text_delta", "text": delta["content"]}})
            for call in delta.get("tool_calls") or ():
                key = f"tool:{call.get('index', 0)}"
                fn = call.get("function") or {}
                self._block(out, key, {"type": "tool_use", "id": call.get("id") or new_id("toolu_"),
                                       "name": fn.get("name", ""), "input": {}})
                if fn.get("arguments"):
                    out.append({"type": "content_block_delta", "index": self._index,
                                "delta": {"type": "input_json_delta", "partial_json": fn["arguments"]}})
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]

    def _end(self, out: list[Event]) -> None:
        if self._done:
            return
        self._done = True
        self._start(out)
        self._close(out)
        if self._finish is None:
            out.append({"type": "error", "error": {"type": "api_error",
                                                   "message": "the provider's stream ended without a finish reason"}})
            return
        out.append({"type": "message_delta", "delta": {"stop_reason": FINISH_TO_STOP.get(self._finish, "end_turn"),
                                                       "stop_sequence": None},
                    "usage": self._usage or {"output_tokens": 0}})
        out.append({"type": "message_stop"})

    def _handle(self, items: list[tuple[str, str]]) -> list[Event]:
        out: list[Event] = []
        for _, data in items:
            if data.strip() == "[DONE]":
                self._end(out)
                continue
            try:
                doc = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(doc, dict):
                if isinstance(doc.get("error"), dict):
                    err = doc["error"]
                    out.append({"type": "error", "error": {"type": "api_error", "message": str(err.get("message"))}})
                    self._done = True
                    continue
                self._chunk(doc, out)
        return out

    def feed(self, chunk: bytes) -> list[Event]:
        return self._handle(self._sse.feed(chunk))

    def finish(self) -> list[Event]:
        out = self._handle(self._sse.finish())
        if not self._done:
            # A server that omits [DONE] but finished ends cleanly; one cut off ends in an error event,
            # so the client knows and the meter estimates.
            self._end(out)
        return out


class OpenAICompatible(ProviderSide):
    sends_pings = False

    def __init__(self, model_ids: dict[str, str] | None = None) -> None:
        self._model_ids = model_ids or {}
        self._model = ""

    async def build(self, req: Json, streaming: bool) -> Upstream:
        self._model = str(req["model"])
        model = self._model_ids.get(self._model, self._model)
        body = to_chat_request(req, model, streaming)
        accept = "text/event-stream" if streaming else "application/json"
        headers = {"content-type": "application/json", "accept": accept}
        return Upstream("/v1/chat/completions", orjson.dumps(body), headers,
                        remove=["anthropic-version", "anthropic-beta"])

    def stream_decoder(self) -> StreamDecoder:
        return ChatStreamDecoder(self._model)

    def message(self, body: bytes, model: str) -> Json:
        doc = orjson.loads(body)
        if not isinstance(doc, dict) or not isinstance(doc.get("choices"), list):
            raise ValueError("reply is not a chat completion")
        return chat_to_message(doc, model)

    def error(self, status: int, headers: dict[str, str], body: bytes) -> ProviderError:
        message = ""
        try:
            doc = orjson.loads(body)
            err = doc.get("error") if isinstance(doc, dict) else None
            message = str(err.get("message") if isinstance(err, dict) else (doc.get("message") or doc.get("detail")))
        except (orjson.JSONDecodeError, AttributeError):
            message = body[:500].decode("utf-8", "replace")
        return ProviderError(status, STATUS_ERROR_TYPES.get(status, "api_error"), message or f"replied {status}")
