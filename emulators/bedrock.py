"""AWS Bedrock runtime emulator: InvokeModel and InvokeModelWithResponseStream for Anthropic models.

Checks what Bedrock checks: a SigV4 signature (recomputed with botocore from the received method,
host, path, signed headers and body, against one known test key pair), its date within 5 minutes,
the Bedrock model id in the URL, `anthropic_version: bedrock-2023-05-31` and no `model` in the
body. Errors are Bedrock's: `{"message"}` with `x-amzn-ErrorType`. Streams are AWS event-stream
`chunk` events, each carrying one Anthropic event (base64), no pings; the last carries
`amazon-bedrock-invocationMetrics` as Bedrock's does.

Run: python -m emulators.bedrock --port 0 --access-key-id AKID --secret-access-key S --ready-file F
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import hmac
import os
import re
import signal
import time
from typing import Any

import orjson
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from emulators._messages import Replies
from emulators.anthropic import BadRequest, validate_messages, write_ready
from router.adapter.translators.eventstream import chunk_event

BEDROCK_VERSION = "bedrock-2023-05-31"
_AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=(?P<akid>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
                   r"(?P<service>[^/]+)/aws4_request, ?SignedHeaders=(?P<signed>[^,]+), ?"
                   r"Signature=(?P<sig>[0-9a-f]{64})")
_MODEL = re.compile(r"^(?:(?:us|eu|apac|global)\.)?anthropic\.claude-[a-z0-9-]+-v\d+(?::\d+)?$")


def error(status: int, exception: str, message: str) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"message": message}), content_type="application/json",
                        headers={"x-amzn-ErrorType": f"{exception}:http://internal.amazon.com/coral/com.amazon.bedrock/"})


class BedrockEmulator:
    def __init__(self, access_key_id: str, secret_access_key: str, region: str, output_tokens: int = 24,
                 tokens_per_second: float = 0.0) -> None:
        self.creds = Credentials(access_key_id, secret_access_key)
        self.region = region
        self.replies = Replies(output_tokens)
        self.tps = tokens_per_second
        self.records: list[dict[str, Any]] = []
        # Tests set this to make every call fail with that status (a regional outage), after the signature check.
        self.fail_status: int | None = None
        self.reset = False  # tests set this to drop every connection before a reply (a dead endpoint)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/model/{model}/invoke", self.invoke)
        app.router.add_post("/model/{model}/invoke-with-response-stream", self.invoke)
        app.router.add_get("/_emulator/requests", lambda r: web.json_response(self.records))
        return app

    def verify(self, request: web.Request, body: bytes) -> str | None:
        """Why the signature is not valid, or None."""
        m = _AUTH.fullmatch(request.headers.get("authorization", ""))
        if m is None:
            return "Authorization header is missing or not SigV4"
        if m["akid"] != self.creds.access_key or m["region"] != self.region or m["service"] != "bedrock":
            return "The security token included in the request is invalid."
        amz_date = request.headers.get("x-amz-date", "")
        try:
            when = dt.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
        except ValueError:
            return "x-amz-date is missing or malformed"
        if abs(time.time() - when.timestamp()) > 300:
            return "Signature expired"
        signed = m["signed"].split(";")
        if "host" not in signed:
            return "host must be signed"
        headers = {h: request.headers.get(h, "") for h in signed}
        raw_path = request.raw_path.split("?", 1)[0]
        req = AWSRequest(method=request.method, url=f"https://{request.headers.get('host', '')}{raw_path}",
                         data=body, headers=headers)
        req.context["timestamp"] = amz_date
        auth = SigV4Auth(self.creds, "bedrock", self.region)
        expected = auth.signature(auth.string_to_sign(req, auth.canonical_request(req)), req)
        if not hmac.compare_digest(expected, m["sig"]):
            return ("The request signature we calculated does not match the signature you provided. "
                    "Check your AWS Secret Access Key and signing method.")
        return None

    async def invoke(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        rec = {"path": request.raw_path, "headers": dict(request.headers), "body": body.decode("utf-8", "replace")}
        self.records.append(rec)
        why = self.verify(request, body)
        if why is not None:
            rec["status"] = 403
            kind = "InvalidSignatureException" if "signature" in why.lower() else "UnrecognizedClientException"
            return error(403, kind, why)
        if self.reset and request.transport is not None:
            rec["status"] = 0
            request.transport.close()
            raise ConnectionResetError("emulated reset")
        if self.fail_status is not None:
            rec["status"] = self.fail_status
            return error(self.fail_status, "InternalServerException" if self.fail_status != 429 else
                         "ThrottlingException", f"emulated failure {self.fail_status}")
        model = request.match_info["model"]
        if not _MODEL.fullmatch(model):
            return error(400, "ValidationException", f"The provided model identifier is invalid: {model}")
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return error(400, "ValidationException", "Malformed input request, please reformat your input.")
        if not isinstance(doc, dict) or doc.get("anthropic_version") != BEDROCK_VERSION:
            return error(400, "ValidationException", "Malformed input request: #: required key [anthropic_version] "
                         "not found or not bedrock-2023-05-31")
        for extra in ("model", "stream"):
            if extra in doc:
                return error(400, "ValidationException",
                             f"Malformed input request: #: extraneous key [{extra}] is not permitted")
        try:
            validate_messages({**doc, "model": model})
        except BadRequest as e:
            return error(400, "ValidationException", str(e))
        message, events, reply = self.replies.make(doc, model)
        rec["status"] = 200
        if not request.path.endswith("-with-response-stream"):
            return web.Response(body=orjson.dumps(message), content_type="application/json")
        resp = web.StreamResponse(headers={"content-type": "application/vnd.amazon.eventstream",
                                           "x-amzn-bedrock-content-type": "application/json"})
        await resp.prepare(request)
        for e in events:
            if e["type"] == "message_stop":
                usage = message["usage"]
                e = {**e, "amazon-bedrock-invocationMetrics": {
                    "inputTokenCount": usage["input_tokens"], "outputTokenCount": usage["output_tokens"],
                    "invocationLatency": 1, "firstByteLatency": 1}}
            await resp.write(chunk_event(e))
            if self.tps > 0 and e["type"] == "content_block_delta":
                await asyncio.sleep(3 / self.tps)
        await resp.write_eof()
        return resp


async def start(host: str = "127.0.0.1", port: int = 0, **kw: Any) -> tuple[web.AppRunner, int, BedrockEmulator]:
    emu = BedrockEmulator(**kw)
    runner = web.AppRunner(emu.app(), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner, runner.addresses[0][1], emu


def b64(s: bytes) -> str:
    return base64.b64encode(s).decode()


async def _serve(args: argparse.Namespace) -> None:
    runner, port, _ = await start(args.host, args.port, access_key_id=args.access_key_id,
                                  secret_access_key=args.secret_access_key, region=args.region,
                                  tokens_per_second=args.tokens_per_second)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    if args.ready_file:
        write_ready(args.ready_file, args.host, port)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m emulators.bedrock")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--region", default="us-east-1")
    ap.add_argument("--access-key-id", default=os.environ.get("CCR_EMULATOR_AWS_ACCESS_KEY_ID"))
    ap.add_argument("--secret-access-key", default=os.environ.get("CCR_EMULATOR_AWS_SECRET_ACCESS_KEY"))
    ap.add_argument("--tokens-per-second", type=float, default=0.0)
    ap.add_argument("--ready-file")
    args = ap.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
