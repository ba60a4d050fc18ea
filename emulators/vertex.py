"""Google Vertex AI emulator: rawPredict and streamRawPredict for Anthropic models, with its own
OAuth token endpoint.

POST /token takes a service-account JWT bearer assertion (RFC 7523, as google-auth sends it),
checks its RS256 signature against the one service-account public key it was given, its
audience (Google's token endpoint), issuer and lifetime, and issues an opaque access token with a
configurable lifetime. The model endpoints accept only unexpired tokens it issued, only the
configured project, Vertex model naming ("claude-sonnet-4-5@20250929": a dated id with '@'),
`anthropic_version: vertex-2023-10-16` and no `model` in the body. Errors from its front end
are Google's `{"error": {"code", "message", "status"}}`. Streams are Anthropic SSE with pings.
"""

from __future__ import annotations

import secrets
import time
from typing import Any
from urllib.parse import parse_qs

import orjson
from aiohttp import web
from joserfc import jwt
from joserfc.jwk import RSAKey

from emulators._messages import Replies
from emulators.anthropic import BadRequest, _sse, error_response, validate_messages

VERTEX_VERSION = "vertex-2023-10-16"
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
_DATED_PLAIN = r"-\d{8}$"


def google_error(status: int, state: str, message: str) -> web.Response:
    return web.Response(status=status, content_type="application/json",
                        body=orjson.dumps({"error": {"code": status, "message": message, "status": state}}))


class VertexEmulator:
    def __init__(self, project: str, region: str, public_key_pem: bytes, token_ttl_s: int = 3600,
                 output_tokens: int = 24) -> None:
        self.project = project
        self.region = region
        self.key = RSAKey.import_key(public_key_pem)
        self.token_ttl_s = token_ttl_s
        self.tokens: dict[str, float] = {}  # access token -> expiry (epoch seconds)
        self.token_requests = 0
        self.replies = Replies(output_tokens)
        self.records: list[dict[str, Any]] = []
        self.base_url = ""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/token", self.token)
        app.router.add_post("/v1/projects/{project}/locations/{region}/publishers/anthropic/models/{model_verb}",
                            self.predict)
        app.router.add_get("/_emulator/requests", lambda r: web.json_response(self.records))
        return app

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        form = parse_qs((await request.read()).decode())
        if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"]:
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        try:
            tok = jwt.decode(form.get("assertion", [""])[0], self.key, algorithms=["RS256"])
        except Exception as e:  # noqa: BLE001 - any bad assertion is invalid_grant
            return web.json_response({"error": "invalid_grant", "error_description": f"bad assertion: {e}"}, status=400)
        c = tok.claims
        now = time.time()
        # google-auth signs for Google's token endpoint whatever token_uri says; so does this check.
        if c.get("aud") != GOOGLE_TOKEN_AUDIENCE or not c.get("iss") or not (c.get("iat", 0) - 60 <= now
                                                                               < c.get("exp", 0)):
            return web.json_response({"error": "invalid_grant", "error_description": "bad aud, iss or lifetime"},
                                     status=400)
        access = "ya29.emulated-" + secrets.token_urlsafe(24)
        self.tokens[access] = now + self.token_ttl_s
        return web.json_response({"access_token": access, "expires_in": self.token_ttl_s, "token_type": "Bearer"})

    async def predict(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        rec: dict[str, Any] = {"path": request.path, "headers": dict(request.headers)}
        self.records.append(rec)
        auth = request.headers.get("authorization", "")
        exp = self.tokens.get(auth[7:]) if auth.startswith("Bearer ") else None
        if exp is None or exp <= time.time():
            rec["status"] = 401
            return google_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials. "
                                "Expected OAuth 2 access token.")
        m = request.match_info
        model, _, verb = m["model_verb"].partition(":")
        if m["project"] != self.project or m["region"] != self.region:
            return google_error(403, "PERMISSION_DENIED", f"Permission denied on resource project {m['project']}.")
        import re

        if verb not in ("rawPredict", "streamRawPredict") or re.search(_DATED_PLAIN, model):
            return google_error(404, "NOT_FOUND", f"Publisher Model `projects/{m['project']}/locations/{m['region']}/"
                                f"publishers/anthropic/models/{model}` not found.")
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return error_response(400, "invalid_request_error", "request body is not valid JSON")
        if not isinstance(doc, dict) or doc.get("anthropic_version") != VERTEX_VERSION:
            return error_response(400, "invalid_request_error", f"anthropic_version: must be {VERTEX_VERSION}")
        if "model" in doc:
            return error_response(400, "invalid_request_error", "model: Extra inputs are not permitted")
        try:
            validate_messages({**doc, "model": model})
        except BadRequest as e:
            return error_response(400, "invalid_request_error", str(e))
        message, events, _ = self.replies.make(doc, model.replace("@", "-"))
        rec["status"] = 200
        if verb == "rawPredict":
            return web.Response(body=orjson.dumps(message), content_type="application/json")
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        out = []
        for e in events:
            out.append(_sse(e["type"], e))
            if e["type"] == "content_block_start" and e["index"] == 0:
                out.append(_sse("ping", {"type": "ping"}))
        await resp.write(b"".join(out))
        await resp.write_eof()
        return resp


async def start(host: str = "127.0.0.1", port: int = 0, **kw: Any) -> tuple[web.AppRunner, int, VertexEmulator]:
    emu = VertexEmulator(**kw)
    runner = web.AppRunner(emu.app(), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    port = runner.addresses[0][1]
    emu.base_url = f"http://{host}:{port}"
    return runner, port, emu
