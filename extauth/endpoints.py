"""The Anthropic API endpoints ccr understands, and strict matching of a request onto one.

Deny by default: a request is forwarded only if its method and path name one of these
endpoints, spelled exactly one way. Envoy's route table is generated from this registry
(router/resources.py) and extauth matches the same registry again, so a path the two
disagree on is refused, never guessed at.

Pure: no I/O, no Envoy or gRPC types; the route table, extauth and the batch/file
ownership checks all build on `match()`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

# Longest path (without the query string) we look at; the real API's are < 100 bytes.
MAX_PATH_BYTES = 512

# Object ids (batches, files) and model ids (the API's have no dots: "claude-sonnet-4-5-20250929"):
# ASCII letters, digits, '_' and '-', starting with a letter or digit, so an id can never be a
# dot segment, carry a slash or an escape.
# No length bound inside the regex (Envoy's RE2 program-size limit); match() checks MAX_ID_LEN.
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]*"
MAX_ID_LEN = 128

_PARAM = re.compile(r"\{([a-z_]+)\}")
# Bedrock model ids ("us.anthropic.claude-sonnet-4-5-20250929-v1:0") carry dots and a colon; the
# Anthropic SDK's Bedrock client sends the colon unencoded. Only the Bedrock-client paths take them.
BEDROCK_MODEL_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:-]*"
_PARAM_PATTERNS = {"model_id": ID_PATTERN, "batch_id": ID_PATTERN, "file_id": ID_PATTERN,
                   "bedrock_model": BEDROCK_MODEL_PATTERN}
# A canonical path: one or more "/segment" of unreserved characters (RFC 3986, minus '~'),
# nothing else. No '%', no '//', no trailing '/', no controls, no spaces, no non-ASCII.
_CANONICAL = re.compile(r"(?:/[A-Za-z0-9._-]+)+")
_CANONICAL_BEDROCK = re.compile(r"/model/[A-Za-z0-9._:-]+/[a-z-]+")


class Kind(StrEnum):
    """What an endpoint is about; the policy and the object checks key on it."""

    MESSAGES = "messages"  # a Messages call: the body names the model
    MODELS = "models"  # the model catalogue
    BATCHES = "batches"  # Message Batches (objects owned by the principal that created them)
    FILES = "files"  # Files API (off unless config enables it)


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str  # "messages.create": what policy, audit and tests call it
    method: str
    template: str  # "/v1/messages/batches/{batch_id}"
    kind: Kind
    model_in_body: bool = False  # the JSON body's top-level "model" is decided and routed on
    # The wire schema the client speaks: "anthropic", "openai" (Chat Completions) or "bedrock"
    # (InvokeModel); anything but "anthropic" is translated by the adapter (router/adapter/translators).
    schema: str = "anthropic"
    # The model is the path's `bedrock_model` parameter, not a body field.
    model_in_path: bool = False

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(_PARAM.findall(self.template))

    @property
    def regex(self) -> str:
        """The path as a regex (RE2- and Python-compatible) that must match the whole path."""
        out, pos = [], 0
        for m in _PARAM.finditer(self.template):
            out.append(re.escape(self.template[pos:m.start()]))
            out.append(f"({_PARAM_PATTERNS[m.group(1)]})")
            pos = m.end()
        out.append(re.escape(self.template[pos:]))
        return "".join(out)

    @property
    def is_exact(self) -> bool:
        return not self.params


def _e(name: str, method: str, template: str, kind: Kind, model_in_body: bool = False, schema: str = "anthropic",
       model_in_path: bool = False) -> Endpoint:
    return Endpoint(name, method, template, kind, model_in_body, schema, model_in_path)


ENDPOINTS: tuple[Endpoint, ...] = (
    _e("messages.create", "POST", "/v1/messages", Kind.MESSAGES, model_in_body=True),
    _e("messages.count_tokens", "POST", "/v1/messages/count_tokens", Kind.MESSAGES, model_in_body=True),
    _e("models.list", "GET", "/v1/models", Kind.MODELS),
    _e("models.get", "GET", "/v1/models/{model_id}", Kind.MODELS),
    _e("batches.create", "POST", "/v1/messages/batches", Kind.BATCHES),
    _e("batches.list", "GET", "/v1/messages/batches", Kind.BATCHES),
    _e("batches.get", "GET", "/v1/messages/batches/{batch_id}", Kind.BATCHES),
    _e("batches.results", "GET", "/v1/messages/batches/{batch_id}/results", Kind.BATCHES),
    _e("batches.cancel", "POST", "/v1/messages/batches/{batch_id}/cancel", Kind.BATCHES),
    _e("batches.delete", "DELETE", "/v1/messages/batches/{batch_id}", Kind.BATCHES),
    _e("files.upload", "POST", "/v1/files", Kind.FILES),
    _e("files.list", "GET", "/v1/files", Kind.FILES),
    _e("files.get", "GET", "/v1/files/{file_id}", Kind.FILES),
    _e("files.content", "GET", "/v1/files/{file_id}/content", Kind.FILES),
    _e("files.delete", "DELETE", "/v1/files/{file_id}", Kind.FILES),
    # Other clients' schemas for a Messages call (kind messages, so `messages.*` grants cover them).
    _e("messages.openai_chat", "POST", "/v1/chat/completions", Kind.MESSAGES, model_in_body=True, schema="openai"),
    _e("messages.bedrock_invoke", "POST", "/model/{bedrock_model}/invoke", Kind.MESSAGES, schema="bedrock",
       model_in_path=True),
    _e("messages.bedrock_invoke_stream", "POST", "/model/{bedrock_model}/invoke-with-response-stream",
       Kind.MESSAGES, schema="bedrock", model_in_path=True),
)
BY_NAME: dict[str, Endpoint] = {e.name: e for e in ENDPOINTS}
METHODS: frozenset[str] = frozenset(e.method for e in ENDPOINTS)

_EXACT: dict[tuple[str, str], Endpoint] = {(e.method, e.template): e for e in ENDPOINTS if e.is_exact}
_TEMPLATED: tuple[tuple[Endpoint, re.Pattern[str]], ...] = tuple(
    (e, re.compile(e.regex)) for e in ENDPOINTS if not e.is_exact
)


@dataclass(frozen=True, slots=True)
class EndpointMatch:
    endpoint: Endpoint
    # Path parameters as sorted (name, value) pairs: hashable, so decisions can be cached by it.
    params: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        return self.endpoint.name

    def param(self, name: str) -> str | None:
        return dict(self.params).get(name)

    def policy_input(self) -> dict[str, object]:
        """The endpoint part of the Rego input: `input.request.endpoint` and `.params`."""
        return {"endpoint": self.endpoint.name, "kind": str(self.endpoint.kind), "params": dict(self.params)}


def split_target(target: str) -> tuple[str, str]:
    """(path, query) of a request target; the query string is not part of matching."""
    path, _, query = target.partition("?")
    return path, query


def non_canonical(path: str) -> str | None:
    """Why `path` (no query string) is not the one spelling ccr accepts, or None if it is.

    Envoy normalises before routing; this is the second line: anything that still looks
    like an alternative spelling is refused rather than interpreted.
    """
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        return f"path longer than {MAX_PATH_BYTES} bytes"
    if not path.startswith("/"):
        return "path must start with '/'"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return "control character in path"
    if "%" in path:
        return "percent-encoding in path"
    if "//" in path:
        return "empty path segment ('//')"
    if path != "/" and path.endswith("/"):
        return "trailing slash"
    if any(seg in (".", "..") for seg in path.split("/")):
        return "dot segment in path"
    if path != "/" and not _CANONICAL.fullmatch(path) and not _CANONICAL_BEDROCK.fullmatch(path):
        return "character outside [A-Za-z0-9._-] in path"
    return None


def match(method: str, path: str) -> EndpointMatch | None:
    """The endpoint `method` + `path` (canonical, no query string) names, or None.

    Case-sensitive and exact: "/V1/messages" and "/v1/messages/" are not endpoints.
    """
    exact = _EXACT.get((method, path))
    if exact is not None:
        return EndpointMatch(exact)
    if len(path) > MAX_PATH_BYTES:
        return None
    for e, rx in _TEMPLATED:
        if e.method != method:
            continue
        m = rx.fullmatch(path)
        if m is not None and all(len(v) <= MAX_ID_LEN for v in m.groups()):
            return EndpointMatch(e, tuple(sorted(zip(e.params, m.groups(), strict=True))))
    return None


def path_known(path: str) -> bool:
    """Some endpoint has this path with another method (a wrong method, not an unknown path)."""
    return any(match(m, path) is not None for m in METHODS)
