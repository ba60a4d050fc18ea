"""Where extauth's policy bundle comes from, and the hot swap to a new one.

A source (a local file/directory, or an HTTP bundle server) is polled; a changed bundle is
verified, compiled into a new PolicyEngine off the event loop, and swapped in by rebinding one
attribute (`holder.policy`), so the request path stays a plain attribute read. A request that
already holds the old engine keeps using it: the old engine is closed only after a grace period.
A bundle that fails (unreachable, unsigned, tampered, broken WASM, wrong entrypoint) is refused
and logged, and the last good one keeps serving. The state is written atomically to
RUN/policy-status.json for `ccr policy status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import aiohttp
import orjson

from ccr.contract import POLICY_STATUS_FILE
from extauth.bundle import Bundle, BundleError, directory_digest, load_bundle_bytes, parse_bundle, read_directory
from extauth.bundle_signing import BundleVerifier
from extauth.policy import PolicyEngine

log = logging.getLogger("extauth.bundle")

STATUS_FILE = POLICY_STATUS_FILE
LONG_POLL_TYPE = "application/vnd.openpolicyagent.bundles"  # a server that long-polls answers with it


@dataclass(frozen=True)
class Fetched:
    """A bundle as fetched: a tarball's bytes, or a directory's files."""

    where: str
    raw: bytes | None = None
    files: dict[str, bytes] | None = None

    def load(self, verifier: BundleVerifier | None) -> Bundle:
        if self.files is not None:
            return parse_bundle(self.files, directory_digest(self.files), self.where, verifier)
        assert self.raw is not None
        return load_bundle_bytes(self.raw, self.where, verifier)


class BundleSource(Protocol):
    describe: str

    async def fetch(self) -> Fetched | None:
        """The bundle if it may have changed since the last fetch, else None."""


class FileSource:
    """A .tar.gz file (re-read when its mtime or size changes) or a bundle directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.describe = str(path)
        self._stamp: object = None

    def _read(self) -> tuple[object, Fetched | None]:
        """(a stamp that changes with the content, the bundle unless the stamp is unchanged)."""
        try:
            if self.path.is_dir():  # a directory is re-read and compared by content
                files = read_directory(self.path)
                return directory_digest(files), Fetched(self.describe, files=files)
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp:
                return stamp, None
            return stamp, Fetched(self.describe, raw=self.path.read_bytes())
        except OSError as e:
            raise BundleError(f"cannot read policy bundle {self.path}: {e.strerror}") from None

    async def fetch(self) -> Fetched | None:
        stamp, fetched = await asyncio.to_thread(self._read)
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        return fetched


class HttpSource:
    """A bundle server: conditional GET (If-None-Match with the last ETag; 304 = unchanged),
    a per-request timeout and a bound on the download size."""

    def __init__(self, url: str, timeout_s: float, max_bytes: int, *, token: str | None = None,
                 ca_file: str | Path | None = None, long_poll_s: int | None = None) -> None:
        self.url, self.timeout_s, self.max_bytes = url, timeout_s, max_bytes
        self.long_poll_s = long_poll_s
        # Assumed until a long poll's answer lacks OPA's content type (then: interval polling).
        self.long_polling = bool(long_poll_s)
        self.describe = url
        self.etag: str | None = None
        self._token = token
        self._ssl = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
        self._session: aiohttp.ClientSession | None = None

    async def fetch(self) -> Fetched | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                                                  connector=aiohttp.TCPConnector(ssl=self._ssl or True))
        headers = {"Accept": "application/gzip, application/octet-stream"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        if self.etag:
            headers["If-None-Match"] = self.etag
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        long_poll = bool(self.long_poll_s and self.etag)
        if long_poll:
            # OPA long polling: the server answers when the bundle changes, or 304 after the wait.
            headers["Prefer"] = f"wait={self.long_poll_s}"
            timeout = aiohttp.ClientTimeout(total=self.timeout_s + self.long_poll_s)
        try:
            async with self._session.get(self.url, headers=headers, allow_redirects=False, timeout=timeout) as resp:
                if long_poll:
                    self.long_polling = resp.content_type == LONG_POLL_TYPE
                if resp.status == 304:
                    return None
                if resp.status != 200:
                    raise BundleError(f"bundle server {self.url} answered HTTP {resp.status}")
                if resp.content_length is not None and resp.content_length > self.max_bytes:
                    raise BundleError(f"bundle at {self.url} is {resp.content_length} bytes, "
                                      f"over policy.bundle.max_bytes {self.max_bytes}")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise BundleError(f"bundle at {self.url} exceeds policy.bundle.max_bytes {self.max_bytes}")
                etag = resp.headers.get("ETag")
        except (TimeoutError, aiohttp.ClientError) as e:
            raise BundleError(f"bundle server {self.url} unreachable: {e!r}") from None
        self.etag = etag
        return Fetched(self.url, raw=bytes(body))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def source_from(b, base: Path) -> BundleSource:
    """The source a `policy.bundle` (or a policy set's `bundle`) names; relative paths are against `base`."""
    if b.url is None:
        return FileSource(base / str(b.path))
    token = None
    if b.token_file:
        try:
            token = (base / b.token_file).read_text().strip()
        except OSError as e:
            raise BundleError(f"cannot read bundle token_file {b.token_file}: {e.strerror}") from None
    return HttpSource(b.url, b.timeout_s, b.max_bytes, token=token, ca_file=base / b.ca_file if b.ca_file else None,
                      long_poll_s=b.long_polling_timeout_s)


class PolicyHolder(Protocol):
    policy: PolicyEngine


@dataclass
class PolicyStatus:
    source: str
    entrypoint: str
    revision: str | None = None
    digest: str | None = None
    signed: bool | None = None
    loaded_at: float | None = None
    last_check_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    pid: int = 0


def write_status(path: Path, status: PolicyStatus) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(orjson.dumps(asdict(status), option=orjson.OPT_INDENT_2))
    os.replace(tmp, path)


def read_status(path: Path) -> dict:
    return orjson.loads(path.read_bytes())


class BundleLoader:
    """Polls one source and swaps `holder.policy` to each new good bundle."""

    def __init__(
        self, holder: PolicyHolder | None, source: BundleSource, entrypoint: str, *,
        verifier: BundleVerifier | None = None, status_path: Path | None = None,
        clock: Callable[[], float] = time.time, grace_s: float = 60.0,
        make_engine: Callable[[Bundle, str], PolicyEngine] = PolicyEngine,
    ) -> None:
        self.holder, self.source, self.entrypoint = holder, source, entrypoint
        self.verifier, self.status_path, self.clock, self.grace_s = verifier, status_path, clock, grace_s
        self.make_engine = make_engine  # extauth/opa_envoy.py's engine for an OPA-Envoy set
        self.status = PolicyStatus(source=source.describe, entrypoint=entrypoint, pid=os.getpid())
        self._retiring: list[asyncio.TimerHandle] = []
        # Set by extauth/policy_sets.py: called with (loader, "loaded" | "refused" | "checked") instead of
        # writing status_path, so every set's status lands in one file and in the metrics.
        self.on_status: Callable[[BundleLoader, str], None] | None = None
        # Called with (loader, bundle) before a new bundle serves (extauth/policy_admin.py records it in
        # the admin chain); raising refuses the bundle, and the next poll fetches it again.
        self.before_live: Callable[[BundleLoader, Bundle], Awaitable[None]] | None = None

    @classmethod
    def from_config(cls, config, runtime, holder: PolicyHolder | None = None, **kw) -> tuple[BundleLoader, float]:
        """The loader for `policy.bundle` (or, unset, the bundle `ccr up` compiled) and its poll interval."""
        from extauth.bundle import build_bundle

        base = Path(runtime.config_path).resolve().parent
        pol = config.policy
        verifier = None
        if pol.verification is not None:
            v = pol.verification
            verifier = BundleVerifier.from_file(base / v.key_file, v.alg, v.key_id, v.scope)
        source: BundleSource
        interval = 2.0
        if pol.bundle is None:
            path = Path(runtime.policy_bundle) if runtime.policy_bundle else build_bundle(
                base / pol.dir, Path(runtime.run_dir) / "policy.tar.gz", pol.entrypoint)
            source = FileSource(path)
        else:
            source = source_from(pol.bundle, base)
            interval = pol.bundle.poll_interval_s
        status_path = Path(runtime.run_dir) / STATUS_FILE
        return cls(holder, source, pol.entrypoint, verifier=verifier, status_path=status_path, **kw), interval

    def _build(self, fetched: Fetched) -> tuple[Bundle, PolicyEngine | None]:  # (or the set's engine)
        bundle = fetched.load(self.verifier)
        current = getattr(self.holder, "policy", None)  # unset before the first load
        if current is not None and current.bundle.digest == bundle.digest:
            return bundle, None
        return bundle, self.make_engine(bundle, self.entrypoint)

    async def load_initial(self) -> PolicyEngine:
        """The first bundle; failing here fails start-up (there is no last good one)."""
        self.status.last_check_at = self.clock()
        try:
            fetched = await self.source.fetch()
            if fetched is None:
                raise BundleError(f"{self.source.describe}: no bundle")
            bundle, engine = await asyncio.to_thread(self._build, fetched)
        except Exception as e:  # a BundleError, or the WASM runtime refusing the module
            self._error(str(e))
            if isinstance(e, BundleError):
                raise
            raise BundleError(f"{self.source.describe}: {e}") from e
        assert engine is not None
        if self.before_live is not None:
            try:  # at start there is no last good bundle to keep: serve it, and say loudly it is unrecorded
                await self.before_live(self, bundle)
            except Exception as e:
                log.error("policy bundle revision %r (sha256 %s) is not recorded in the admin log: %s",
                          bundle.revision, bundle.digest[:12], e)
        self._loaded(bundle)
        return engine

    async def poll_once(self) -> str:
        """One poll: 'loaded', 'unchanged' or 'refused' (the current engine keeps serving)."""
        self.status.last_check_at = self.clock()
        try:
            fetched = await self.source.fetch()
            if fetched is None:
                self._write()
                return "unchanged"
            bundle, engine = await asyncio.to_thread(self._build, fetched)
        except Exception as e:  # any failure: refuse the bundle, keep the last good one
            log.error("policy bundle from %s refused, keeping revision %r (sha256 %s): %s",
                      self.source.describe, self.status.revision, (self.status.digest or "")[:12], e)
            self._error(str(e))
            return "refused"
        if engine is None:
            self._write()
            return "unchanged"
        if self.before_live is not None:
            try:
                await self.before_live(self, bundle)
            except Exception as e:  # not recorded: not live (fail closed), fetched again next poll
                engine.close()
                self._forget_source()
                log.error("policy bundle revision %r from %s not made live, keeping revision %r: %s",
                          bundle.revision, self.source.describe, self.status.revision, e)
                self._error(f"revision {bundle.revision!r} not made live: {e}")
                return "refused"
        assert self.holder is not None
        old, self.holder.policy = self.holder.policy, engine  # the swap: one attribute rebind
        if old is not None:  # None: a shadow set whose first bundle failed (extauth/policy_sets.py)
            self._retire(old)
        self._loaded(bundle)
        return "loaded"

    def _forget_source(self) -> None:
        """Make the next fetch return the bundle again (a file's stamp, a server's ETag)."""
        if isinstance(self.source, FileSource):
            self.source._stamp = None
        elif isinstance(self.source, HttpSource):
            self.source.etag = None

    async def run(self, interval_s: float, wake: asyncio.Event | None = None) -> None:
        """Poll forever every `interval_s` (or at once when `wake` is set)."""
        wake = wake or asyncio.Event()
        outcome = "unchanged"
        while True:
            # A long-polling server holds each request until something changes: ask again at once
            # (unless the last poll failed: then wait, so a broken server is not hammered).
            if not (getattr(self.source, "long_polling", False) and outcome != "refused"):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), interval_s)
                wake.clear()
            outcome = await self.poll_once()

    def _retire(self, old: PolicyEngine) -> None:
        # In-flight requests may still hold `old` (e.g. a batch check across awaits): close it later.
        loop = asyncio.get_running_loop()
        self._retiring.append(loop.call_later(self.grace_s, old.close))

    async def close(self) -> None:
        for h in self._retiring:
            h.cancel()
        if isinstance(self.source, HttpSource):
            await self.source.close()

    def _loaded(self, bundle: Bundle) -> None:
        s = self.status
        s.revision, s.digest, s.signed, s.loaded_at = bundle.revision, bundle.digest, bundle.signed, self.clock()
        s.last_error = s.last_error_at = None
        log.info("policy bundle revision %r (sha256 %s%s) from %s now serving", bundle.revision,
                 bundle.digest[:12], ", signature verified" if self.verifier else "", self.source.describe)
        self._write("loaded")

    def _error(self, message: str) -> None:
        self.status.last_error, self.status.last_error_at = message, self.clock()
        self._write("refused")

    def _write(self, event: str = "checked") -> None:
        if self.on_status is not None:
            self.on_status(self, event)
            return
        if self.status_path is not None:
            try:
                write_status(self.status_path, self.status)
            except OSError as e:
                log.warning("cannot write %s: %s", self.status_path, e)
