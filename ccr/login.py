"""`ccr login`: sign in at the gateway and keep a short-lived session for Claude Code.

Device flow by default (prints a URL and a code, then polls), `--browser` for the
authorization code flow through a loopback redirect to this process. Only the gateway
URL is needed: the gateway talks to the IdP. The session file (mode 0600) holds a
one-hour session token and a gateway refresh token, never an IdP token.
`--print-token` prints a valid session token, refreshing it first when it is close to
expiry: that is what Claude Code's `apiKeyHelper` runs.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import http.server
import json
import os
import secrets
import shlex
import shutil
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import webbrowser
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from ccr.contract import SIGNIN_PREFIX

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# Refresh when less than this is left, so a token handed to Claude Code outlives its next request.
REFRESH_MARGIN_S = 300


class LoginError(Exception):
    """Sign-in failed; the message says why and what to do."""


def default_session_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "ccr" / "session.json"


def _post(gateway: str, path: str, form: dict[str, str], timeout: float = 30) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(gateway.rstrip("/") + SIGNIN_PREFIX + path,
                                 data=urllib.parse.urlencode(form).encode(), method="POST",
                                 headers={"Content-Type": "application/x-www-form-urlencoded",
                                          "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    except OSError as e:
        raise LoginError(f"cannot reach the gateway at {gateway}: {e}") from None
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or status == 404:
        raise LoginError(f"the gateway at {gateway} does not offer sign-in (HTTP {status}); "
                         f"its config needs identity.signin")
    return status, doc


def _oauth_failure(doc: dict[str, Any]) -> str:
    if isinstance(doc.get("error"), dict):  # the gateway's Anthropic-shaped error
        return str(doc["error"].get("message"))
    return f"{doc.get('error')}: {doc.get('error_description', '')}".rstrip(": ")


# -- session file -----------------------------------------------------------------


def save_session(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def load_session(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise LoginError(f"no session at {path}; sign in with `ccr login`") from None
    except ValueError:
        raise LoginError(f"{path} is not a ccr session file; sign in again with `ccr login`") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) for k in ("gateway", "access_token")):
        raise LoginError(f"{path} is not a ccr session file; sign in again with `ccr login`")
    return doc


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One refresher at a time: a refresh token is spent by its use, and presenting a
    spent one again ends the session."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _session_doc(gateway: str, tok: dict[str, Any], now: float) -> dict[str, Any]:
    for k in ("access_token", "refresh_token", "expires_in"):
        if k not in tok:
            raise LoginError(f"the gateway's token response lacks {k}")
    return {"gateway": gateway, "access_token": tok["access_token"], "refresh_token": tok["refresh_token"],
            "expires_at": int(now) + int(tok["expires_in"]), "session_id": tok.get("session_id"),
            "name": tok.get("name")}


# -- device flow ----------------------------------------------------------------------


def device_login(gateway: str, out: TextIO, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    status, start = _post(gateway, "device", {})
    if status != 200:
        raise LoginError(f"the gateway could not start a sign-in: {_oauth_failure(start)}")
    interval = max(1, int(start.get("interval", 5)))
    deadline = clock() + int(start.get("expires_in", 600))
    where = start.get("verification_uri_complete") or start["verification_uri"]
    print(f"To sign in, open {where}\nand confirm the code: {start['user_code']}\n"
          f"(waiting for you to approve; Ctrl-C to give up)", file=out, flush=True)
    while clock() < deadline:
        sleep(interval)
        status, tok = _post(gateway, "token", {"grant_type": DEVICE_GRANT, "device_code": start["device_code"]})
        if status == 200:
            return _session_doc(gateway, tok, clock())
        err = tok.get("error")
        if err == "authorization_pending":
            continue
        if err == "slow_down":
            interval += 5
            continue
        if err == "temporarily_unavailable":
            continue
        raise LoginError(f"sign-in failed: {_oauth_failure(tok)}")
    raise LoginError("the sign-in code expired before it was approved; run `ccr login` again")


# -- browser flow ------------------------------------------------------------------------


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


class _Callback(http.server.BaseHTTPRequestHandler):
    result: dict[str, str] | None = None
    done: threading.Event

    def do_GET(self) -> None:  # noqa: N802
        u = urllib.parse.urlsplit(self.path)
        if u.path != "/callback":
            self.send_error(404)
            return
        type(self).result = dict(urllib.parse.parse_qsl(u.query))
        body = b"<!doctype html><title>ccr</title><p>Signed in. You can close this tab and go back to the terminal."
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.done.set()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def browser_login(gateway: str, out: TextIO, open_browser: bool = True, timeout_s: float = 300,
                  clock: Callable[[], float] = time.time) -> dict[str, Any]:
    verifier, challenge = _pkce()
    state = secrets.token_urlsafe(24)
    handler = type("Callback", (_Callback,), {"done": threading.Event(), "result": None})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        redirect = f"http://127.0.0.1:{server.server_address[1]}/callback"
        url = (gateway.rstrip("/") + SIGNIN_PREFIX + "login?" + urllib.parse.urlencode(
            {"cli_redirect": redirect, "cli_challenge": challenge, "cli_state": state}))
        print(f"To sign in, open this URL in your browser:\n  {url}", file=out, flush=True)
        if open_browser:
            webbrowser.open(url)
        if not handler.done.wait(timeout_s):
            raise LoginError("no sign-in arrived from the browser in time; run `ccr login --browser` again")
    finally:
        server.shutdown()
        server.server_close()
    got = handler.result or {}
    if not secrets.compare_digest(got.get("state", "").encode(), state.encode()):
        raise LoginError("the browser came back with a different state; not accepting it (run `ccr login` again)")
    status, tok = _post(gateway, "token", {"grant_type": "authorization_code", "code": got.get("code", ""),
                                           "code_verifier": verifier})
    if status != 200:
        raise LoginError(f"sign-in failed: {_oauth_failure(tok)}")
    return _session_doc(gateway, tok, clock())


# -- token for Claude Code ------------------------------------------------------------


def current_token(path: Path, clock: Callable[[], float] = time.time) -> str:
    """A session token with at least REFRESH_MARGIN_S left, refreshing (and saving) if needed."""
    with _locked(path):
        doc = load_session(path)
        if int(doc.get("expires_at", 0)) - clock() > REFRESH_MARGIN_S:
            return str(doc["access_token"])
        if not isinstance(doc.get("refresh_token"), str):
            raise LoginError(f"the session in {path} cannot be refreshed; sign in again with `ccr login`")
        status, tok = _post(doc["gateway"], "token", {"grant_type": "refresh_token",
                                                      "refresh_token": doc["refresh_token"]})
        if status != 200:
            raise LoginError(f"could not refresh the session: {_oauth_failure(tok)}")
        new = _session_doc(doc["gateway"], tok, clock())
        save_session(path, new)
        return str(new["access_token"])


def logout(path: Path) -> bool:
    with _locked(path):
        doc = load_session(path)
        status, res = _post(doc["gateway"], "revoke", {"token": doc.get("refresh_token") or doc["access_token"]})
        if status != 200:
            raise LoginError(f"the gateway refused to sign out: {_oauth_failure(res)}")
        path.unlink()
        return bool(res.get("revoked"))


def usage_text(doc: dict[str, Any], path: Path) -> str:
    """How to use the session with Claude Code, with commands that work as printed."""
    ccr = "ccr" if shutil.which("ccr") else f"{shlex.quote(sys.executable)} -m ccr.cli"
    helper = f"{ccr} login --print-token"
    if path != default_session_file():
        helper += f" --session-file {shlex.quote(str(path))}"
    minutes = max(0, (int(doc["expires_at"]) - int(time.time())) // 60)
    settings = json.dumps({"apiKeyHelper": helper, "env": {
        "ANTHROPIC_BASE_URL": doc["gateway"], "CLAUDE_CODE_API_KEY_HELPER_TTL_MS": "900000"}}, indent=2)
    return (f"Signed in to {doc['gateway']} as {doc.get('name') or '?'} (session {doc.get('session_id')}; "
            f"token valid for {minutes} min, refreshable).\n"
            f"Session saved to {path} (mode 0600).\n\n"
            f"Use it with Claude Code, either for this shell (the token lasts {minutes} min):\n"
            f"  export ANTHROPIC_BASE_URL={doc['gateway']}\n"
            f"  export ANTHROPIC_AUTH_TOKEN=\"$({helper})\"\n\n"
            f"or let Claude Code fetch a fresh one itself: put this in ~/.claude/settings.json\n"
            f"{settings}\n")
