"""OPA standard bundles: signatures made by the real `opa build`, refusals (unsigned, tampered,
wrong key), a real HTTP bundle server (ETag/304, size bound), and the hot swap."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from extauth.bundle import BundleError, build_bundle, load_bundle_bytes, read_bundle
from extauth.bundle_signing import BundleVerifier
from extauth.bundle_source import BundleLoader, FileSource, HttpSource, read_status
from extauth.policy import PolicyEngine
from extauth.principal import Principal, PrincipalKind
from tests.bundle_server import BundleServer
from tests.harness import copy_policy_modules

REPO = Path(__file__).resolve().parent.parent
ENTRYPOINT = "ccr/authz/decision"
ALICE = Principal(PrincipalKind.KEY, "key_a", "alice", ("default",), key_id="key_a")
SONNET = ("POST", "/v1/messages", "claude-sonnet-4-5")


def _pem_pair(private, path: Path) -> tuple[Path, Path]:
    priv = path / "private.pem"
    pub = path / "public.pem"
    priv.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    pub.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def make_keys(root: Path) -> dict[str, tuple[Path, Path]]:
    """alg -> (signing key file, verification key file)."""
    out = {}
    for name, private in (("RS256", rsa.generate_private_key(65537, 2048)),
                          ("ES256", ec.generate_private_key(ec.SECP256R1())),
                          ("other-RS256", rsa.generate_private_key(65537, 2048))):
        (root / name).mkdir(parents=True)
        out[name] = _pem_pair(private, root / name)
    secret = root / "hs-secret"
    secret.write_bytes(b"a-shared-secret-of-thirty-two-bytes!")
    out["HS256"] = (secret, secret)
    return out


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    return make_keys(tmp_path_factory.mktemp("keys"))


def policy_src(root: Path, models: list[str], extra: dict | None = None) -> Path:
    src = root / "policies"
    src.mkdir(parents=True, exist_ok=True)
    copy_policy_modules(src)
    data = {"endpoint_access": {"*": ["messages.*"]}, "model_access": {"default": models}, **(extra or {})}
    (src / "data.json").write_text(json.dumps(data))
    return src


def signed(tmp: Path, keys, alg: str = "RS256", models: list[str] | None = None, revision: str = "r1",
           **kw) -> Path:
    src = policy_src(tmp / revision, models or ["claude-*"])
    return build_bundle(src, tmp / f"{revision}.tar.gz", ENTRYPOINT, revision=revision,
                        signing_key=keys[alg][0], signing_alg=alg, **kw)


def rewrite(raw: bytes, *, replace: dict[str, bytes] | None = None, add: dict[str, bytes] | None = None,
            remove: set[str] = frozenset()) -> bytes:
    """A copy of a bundle tarball with members replaced, added or removed."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as src, tarfile.open(fileobj=out, mode="w:gz") as dst:
        for m in src:
            name = m.name.lstrip("/")
            if name in remove:
                continue
            body = (replace or {}).get(name, src.extractfile(m).read())  # type: ignore[union-attr]
            info = tarfile.TarInfo(m.name)
            info.size = len(body)
            dst.addfile(info, io.BytesIO(body))
        for name, body in (add or {}).items():
            info = tarfile.TarInfo("/" + name)
            info.size = len(body)
            dst.addfile(info, io.BytesIO(body))
    return out.getvalue()


def verifier(keys, alg: str = "RS256", **kw) -> BundleVerifier:
    return BundleVerifier.from_file(keys[alg][1], alg.removeprefix("other-"), **kw)


# -- signatures ------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256", "HS256"])
def test_signed_bundle_accepted(tmp_path: Path, keys, alg: str) -> None:
    b = read_bundle(signed(tmp_path, keys, alg), verifier(keys, alg))
    assert b.signed and b.revision == "r1" and b.roots == ("",)
    assert set(b.files) == {".signatures.json", ".manifest", "data.json", "policy.wasm",
                            *(f.name for f in (REPO / "policies").glob("*.rego") if not f.name.endswith("_test.rego"))}
    eng = PolicyEngine(b, ENTRYPOINT)
    try:
        assert eng.decide(ALICE, *SONNET).allow
    finally:
        eng.close()


def test_canonical_json_hash_matches_opa(tmp_path: Path, keys) -> None:
    """OPA hashes data.json canonically; numbers as written, HTML-escaped and non-ASCII strings."""
    tricky = {"z": [1.50, 1e3, -0, 12345678901234567890], "s": "<a&b> \u00e9 \u2028 \"q\" \\", "a": {"b": None}}
    src = policy_src(tmp_path, ["claude-*"], extra={"tricky": tricky})
    raw_json = (src / "data.json").read_text().replace("1.5,", "1.50,")  # keep a trailing zero as written
    (src / "data.json").write_text(raw_json)
    out = build_bundle(src, tmp_path / "b.tar.gz", ENTRYPOINT, signing_key=keys["RS256"][0])
    b = read_bundle(out, verifier(keys))
    assert b.data["tricky"]["s"] == tricky["s"]


def test_unsigned_bundle_refused_when_key_configured(tmp_path: Path, keys) -> None:
    unsigned = build_bundle(policy_src(tmp_path, ["claude-*"]), tmp_path / "u.tar.gz", ENTRYPOINT)
    assert read_bundle(unsigned).signed is False  # fine without a key
    with pytest.raises(BundleError, match="not signed"):
        read_bundle(unsigned, verifier(keys))


def test_signatures_file_removed_refused(tmp_path: Path, keys) -> None:
    raw = signed(tmp_path, keys).read_bytes()
    with pytest.raises(BundleError, match="not signed"):
        load_bundle_bytes(rewrite(raw, remove={".signatures.json"}), "b", verifier(keys))


def test_tampered_data_refused(tmp_path: Path, keys) -> None:
    raw = signed(tmp_path, keys, models=["claude-haiku-*"]).read_bytes()
    assert load_bundle_bytes(raw, "b", verifier(keys)).data["model_access"]["default"] == ["claude-haiku-*"]
    evil = json.dumps({"endpoint_access": {"*": ["*"]}, "model_access": {"default": ["*"]}}).encode()
    with pytest.raises(BundleError, match=r"data\.json does not match its signed hash"):
        load_bundle_bytes(rewrite(raw, replace={"data.json": evil}), "b", verifier(keys))
    # Without a verification key the same tampered bundle would load: the key is what refuses it.
    assert load_bundle_bytes(rewrite(raw, replace={"data.json": evil}), "b").data["model_access"]["default"] == ["*"]


def test_tampered_wasm_and_manifest_refused(tmp_path: Path, keys) -> None:
    raw = signed(tmp_path, keys).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        wasm = t.extractfile("/policy.wasm").read()  # type: ignore[union-attr]
    with pytest.raises(BundleError, match="policy.wasm does not match"):
        load_bundle_bytes(rewrite(raw, replace={"policy.wasm": wasm + b"\0"}), "b", verifier(keys))
    manifest = b'{"revision":"r999","roots":[""]}'
    with pytest.raises(BundleError, match=".manifest does not match"):
        load_bundle_bytes(rewrite(raw, replace={".manifest": manifest}), "b", verifier(keys))


def test_added_and_removed_files_refused(tmp_path: Path, keys) -> None:
    raw = signed(tmp_path, keys).read_bytes()
    with pytest.raises(BundleError, match="not covered by the signature"):
        load_bundle_bytes(rewrite(raw, add={"extra/data.json": b'{"x": 1}'}), "b", verifier(keys))
    with pytest.raises(BundleError, match="missing from the bundle"):
        load_bundle_bytes(rewrite(raw, remove={"data.json"}), "b", verifier(keys))


def test_wrong_key_alg_kid_scope_refused(tmp_path: Path, keys) -> None:
    out = signed(tmp_path, keys)
    with pytest.raises(BundleError, match="does not verify"):
        read_bundle(out, verifier(keys, "other-RS256"))
    with pytest.raises(BundleError):
        read_bundle(out, BundleVerifier.from_file(keys["ES256"][1], "ES256"))
    with pytest.raises(BundleError, match="key id"):
        read_bundle(out, verifier(keys, key_id="security-team"))
    with pytest.raises(BundleError, match="scope"):
        read_bundle(out, verifier(keys, scope="prod"))
    scoped = signed(tmp_path, keys, revision="r2", key_id="security-team", scope="prod")
    assert read_bundle(scoped, verifier(keys, key_id="security-team", scope="prod")).revision == "r2"
    with pytest.raises(BundleError, match="scope"):
        read_bundle(scoped, verifier(keys, key_id="security-team", scope="staging"))


def test_private_key_refused_as_verification_key(keys) -> None:
    with pytest.raises(BundleError, match="private key"):
        BundleVerifier.from_file(keys["RS256"][0], "RS256")


def test_unsafe_members_refused(tmp_path: Path) -> None:
    raw = build_bundle(policy_src(tmp_path, ["claude-*"]), tmp_path / "u.tar.gz", ENTRYPOINT).read_bytes()
    with pytest.raises(BundleError, match="unsafe path"):
        load_bundle_bytes(rewrite(raw, add={"../escape/data.json": b"{}"}), "b")
    with pytest.raises(BundleError, match="appears twice"):
        load_bundle_bytes(rewrite(raw, add={"data.json": b"{}"}), "b")
    with pytest.raises(BundleError, match="unpacks to more than"):
        load_bundle_bytes(raw, "b", max_unpacked=1000)
    link = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as src, tarfile.open(fileobj=link, mode="w:gz") as dst:
        for m in src:
            dst.addfile(m, src.extractfile(m))
        sym = tarfile.TarInfo("/x/data.json")
        sym.type, sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
        dst.addfile(sym)
    with pytest.raises(BundleError, match="not a regular file"):
        load_bundle_bytes(link.getvalue(), "b")


def test_bundle_directory_and_roots(tmp_path: Path, keys) -> None:
    out = signed(tmp_path, keys)
    d = tmp_path / "unpacked"
    d.mkdir()
    with tarfile.open(out) as t:
        t.extractall(d, filter="data")
    b = read_bundle(d, verifier(keys))
    assert b.revision == "r1" and b.signed
    (d / "data.json").write_text('{"model_access": {"default": ["*"]}}')
    with pytest.raises(BundleError, match="tampered"):
        read_bundle(d, verifier(keys))
    # Data outside the manifest's roots is refused (unsigned here: roots are checked regardless).
    raw = rewrite(out.read_bytes(), replace={".manifest": b'{"revision":"x","roots":["ccr"]}'},
                  remove={".signatures.json"})
    with pytest.raises(BundleError, match="outside the manifest roots"):
        load_bundle_bytes(raw, "b")


# -- the loader: HTTP bundle server, hot swap, status -----------------------------


class Holder:
    policy: PolicyEngine


def test_http_source_etag_304_swap_and_refusals(tmp_path: Path, keys) -> None:
    r1 = signed(tmp_path, keys, models=["claude-*"], revision="r1").read_bytes()
    r2 = signed(tmp_path, keys, models=["claude-haiku-*"], revision="r2").read_bytes()
    unsigned = build_bundle(policy_src(tmp_path / "u", ["*"]), tmp_path / "u.tar.gz", ENTRYPOINT).read_bytes()
    status_path = tmp_path / "policy-status.json"
    ticks = iter(range(1000, 2000))

    async def scenario() -> None:
        with BundleServer() as srv:
            srv.put("/b.tar.gz", r1)
            source = HttpSource(srv.url + "/b.tar.gz", timeout_s=5, max_bytes=len(r1) * 4)
            holder = Holder()
            loader = BundleLoader(holder, source, ENTRYPOINT, verifier=verifier(keys), status_path=status_path,
                                  clock=lambda: float(next(ticks)))
            holder.policy = await loader.load_initial()
            try:
                first = holder.policy
                assert first.bundle.revision == "r1" and holder.policy.decide(ALICE, *SONNET).allow
                st = read_status(status_path)
                assert st["revision"] == "r1" and st["last_error"] is None and st["signed"] is True

                # Unchanged: the server answers 304 to our ETag, nothing is reloaded.
                assert await loader.poll_once() == "unchanged"
                assert srv.requests[-1][1] is not None and srv.statuses()[-1] == 304
                assert holder.policy is first

                # Tampered data.json on the server: refused, r1 keeps serving, status says why.
                evil = json.dumps({"endpoint_access": {"*": ["*"]}, "model_access": {"default": ["*"]}}).encode()
                srv.put("/b.tar.gz", rewrite(r2, replace={"data.json": evil}))
                assert await loader.poll_once() == "refused"
                assert holder.policy is first
                st = read_status(status_path)
                assert st["revision"] == "r1" and "tampered" in st["last_error"]

                # Unsigned: refused too.
                srv.put("/b.tar.gz", unsigned)
                assert await loader.poll_once() == "refused"
                assert "not signed" in read_status(status_path)["last_error"]

                # Too large: refused by Content-Length, and by counting when there is none.
                srv.put("/b.tar.gz", r2 + b"\0" * (len(r1) * 4))
                assert await loader.poll_once() == "refused"
                assert "max_bytes" in read_status(status_path)["last_error"]
                srv.no_length = True
                srv.put("/b.tar.gz", r2 + b"\1" * (len(r1) * 4))
                assert await loader.poll_once() == "refused"
                assert "exceeds policy.bundle.max_bytes" in read_status(status_path)["last_error"]
                srv.no_length = False

                # A broken bundle (not a tarball): refused.
                srv.put("/b.tar.gz", b"garbage")
                assert await loader.poll_once() == "refused"
                assert holder.policy is first and first.decide(ALICE, *SONNET).allow

                # The good r2: swapped in; the old engine still answers for requests holding it.
                srv.put("/b.tar.gz", r2)
                assert await loader.poll_once() == "loaded"
                assert holder.policy.bundle.revision == "r2"
                assert not holder.policy.decide(ALICE, *SONNET).allow  # r2: haiku only
                assert first.decide(ALICE, *SONNET).allow  # in-flight holder of r1: still usable
                st = read_status(status_path)
                assert st["revision"] == "r2" and st["last_error"] is None
                assert st["digest"] == holder.policy.bundle.digest and st["loaded_at"] > 1000
                assert await loader.poll_once() == "unchanged" and srv.statuses()[-1] == 304
            finally:
                await loader.close()
                holder.policy.close()
                first.close()

    asyncio.run(scenario())


def test_hot_swap_under_concurrent_decisions(tmp_path: Path, keys) -> None:
    """Checks keep running while a new bundle is fetched, compiled and swapped: none fails, and
    every answer is either the old revision's or the new one's."""
    r1 = signed(tmp_path, keys, models=["claude-*"], revision="r1")
    r2 = signed(tmp_path, keys, models=["claude-haiku-*"], revision="r2")
    live = tmp_path / "live.tar.gz"
    live.write_bytes(r1.read_bytes())

    async def scenario() -> None:
        holder = Holder()
        loader = BundleLoader(holder, FileSource(live), ENTRYPOINT, verifier=verifier(keys))
        holder.policy = first = await loader.load_initial()
        seen: list[tuple[str, bool]] = []
        swapped = asyncio.Event()
        after: list[int] = []  # decisions made once the swap is done

        async def checker() -> None:
            # Like a request: read the current engine (one attribute), decide, yield to the loop.
            while len(after) < 20:
                eng = holder.policy
                d = eng.decide(ALICE, "POST", "/v1/messages", f"claude-sonnet-4-{len(seen) % 7}")
                seen.append((eng.bundle.revision, d.allow))
                if swapped.is_set():
                    after.append(1)
                await asyncio.sleep(0)

        async def swapper() -> None:
            while len(seen) < 20:
                await asyncio.sleep(0)
            live.write_bytes(r2.read_bytes())
            assert await loader.poll_once() == "loaded"
            swapped.set()

        try:
            await asyncio.wait_for(asyncio.gather(checker(), checker(), swapper()), 60)
        finally:
            await loader.close()
            holder.policy.close()
            first.close()
        assert {(rev, allow) for rev, allow in seen} == {("r1", True), ("r2", False)}
        assert seen[-1] == ("r2", False)

    asyncio.run(scenario())


def test_file_source_unchanged_and_broken(tmp_path: Path, keys) -> None:
    live = tmp_path / "live.tar.gz"
    live.write_bytes(signed(tmp_path, keys).read_bytes())
    status_path = tmp_path / "status.json"

    async def scenario() -> None:
        holder = Holder()
        loader = BundleLoader(holder, FileSource(live), ENTRYPOINT, verifier=verifier(keys),
                              status_path=status_path)
        holder.policy = first = await loader.load_initial()
        try:
            assert await loader.poll_once() == "unchanged"
            live.write_bytes(b"not a bundle at all")
            assert await loader.poll_once() == "refused"
            assert holder.policy is first
            st = read_status(status_path)
            assert st["revision"] == "r1" and "not a valid OPA bundle" in st["last_error"]
            # Signed and intact, but compiled for another entrypoint: refused, r1 keeps serving.
            src = tmp_path / "other"
            src.mkdir()
            (src / "p.rego").write_text("package other\n\nallow := true\n")
            build_bundle(src, live, "other/allow", revision="r-other", signing_key=keys["RS256"][0])
            assert await loader.poll_once() == "refused"
            assert holder.policy is first and first.decide(ALICE, *SONNET).allow
            assert "entrypoint 'ccr/authz/decision' not in bundle" in read_status(status_path)["last_error"]
        finally:
            await loader.close()
            first.close()

    asyncio.run(scenario())


def test_first_bundle_refused_fails_start(tmp_path: Path, keys) -> None:
    unsigned = build_bundle(policy_src(tmp_path, ["*"]), tmp_path / "u.tar.gz", ENTRYPOINT)
    status_path = tmp_path / "status.json"

    async def scenario() -> None:
        loader = BundleLoader(None, FileSource(unsigned), ENTRYPOINT, verifier=verifier(keys),
                              status_path=status_path)
        with pytest.raises(BundleError, match="not signed"):
            await loader.load_initial()

    asyncio.run(scenario())
    st = read_status(status_path)
    assert st["revision"] is None and "not signed" in st["last_error"]


def test_from_config_bearer_token_and_status_in_run_dir(tmp_path: Path, keys) -> None:
    """policy.bundle/verification as extauth's setup reads them; the bundle server wants a token."""
    from ccr.config import parse_config
    from ccr.runtime import Runtime
    from tests.test_extauth import GATEWAY_YAML

    r1 = signed(tmp_path, keys, revision="r1").read_bytes()
    (tmp_path / "token").write_text("s3cret-token\n")
    run = tmp_path / "run"
    run.mkdir()

    async def scenario(srv: BundleServer, token_file: str) -> str:
        import yaml

        cfg = yaml.safe_load(GATEWAY_YAML)
        cfg["policy"] = {"bundle": {"url": srv.url + "/b.tar.gz", "token_file": token_file, "poll_interval_s": 5},
                         "verification": {"key_file": str(keys["RS256"][1]), "alg": "RS256"}}
        runtime = Runtime(config_path=str(tmp_path / "ccr.yaml"), run_dir=str(run), postgres_dsn="x", redis_url="x")
        loader, interval = BundleLoader.from_config(parse_config(cfg), runtime)
        assert interval == 5
        try:
            engine = await loader.load_initial()
            engine.close()
            return engine.bundle.revision
        finally:
            await loader.close()

    with BundleServer() as srv:
        srv.put("/b.tar.gz", r1)
        srv.token = "s3cret-token"
        assert asyncio.run(scenario(srv, "token")) == "r1"
        assert read_status(run / "policy-status.json")["revision"] == "r1"
        (tmp_path / "wrong").write_text("guess")
        with pytest.raises(BundleError, match="HTTP 401"):
            asyncio.run(scenario(srv, "wrong"))
        assert "HTTP 401" in read_status(run / "policy-status.json")["last_error"]


def test_old_engine_closed_after_grace(tmp_path: Path, keys) -> None:
    """The replaced engine is closed once the grace period is over (not leaked, not closed early)."""
    from extauth.policy import PolicyError

    live = tmp_path / "live.tar.gz"
    live.write_bytes(signed(tmp_path, keys, revision="r1").read_bytes())

    async def scenario() -> None:
        holder = Holder()
        loader = BundleLoader(holder, FileSource(live), ENTRYPOINT, verifier=verifier(keys), grace_s=0)
        holder.policy = first = await loader.load_initial()
        live.write_bytes(signed(tmp_path, keys, models=["claude-haiku-*"], revision="r2").read_bytes())
        assert await loader.poll_once() == "loaded"
        assert first.decide(ALICE, *SONNET).allow  # the swap itself does not close it
        closed = asyncio.Event()
        asyncio.get_running_loop().call_soon(closed.set)  # runs after the grace (0 s) timer's turn
        await closed.wait()
        with pytest.raises(PolicyError):
            first.decide(ALICE, "POST", "/v1/messages", "claude-opus-4-1")  # not cached: evaluates
        await loader.close()
        holder.policy.close()

    asyncio.run(scenario())


async def until(cond, what: str, timeout: float = 30) -> None:
    """Wait on a condition another task or thread makes true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_long_polling_swaps_as_soon_as_published(tmp_path: Path, keys) -> None:
    """With OPA long polling the new revision arrives on a held request, not on the (hour-long) interval."""
    r1 = signed(tmp_path, keys, revision="r1").read_bytes()
    r2 = signed(tmp_path, keys, models=["claude-haiku-*"], revision="r2").read_bytes()

    async def scenario() -> None:
        with BundleServer() as srv:
            srv.put("/b.tar.gz", r1)
            source = HttpSource(srv.url + "/b.tar.gz", timeout_s=5, max_bytes=len(r1) * 4, long_poll_s=60)
            holder = Holder()
            loader = BundleLoader(holder, source, ENTRYPOINT, verifier=verifier(keys))
            holder.policy = first = await loader.load_initial()
            task = asyncio.create_task(loader.run(interval_s=3600))
            try:
                await until(lambda: srv.holding() == 1, "a long poll held by the server")
                srv.put("/b.tar.gz", r2)
                await until(lambda: holder.policy.bundle.revision == "r2", "r2 swapped in")
                assert source.long_polling
                assert srv.statuses() == [200, 200]  # the initial GET, then the held one
                await until(lambda: srv.holding() == 1, "the next long poll")
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await loader.close()
                holder.policy.close()
                first.close()

    asyncio.run(scenario())


def test_long_polling_falls_back_to_interval(tmp_path: Path, keys) -> None:
    """A server that does not long-poll (a plain 304 without OPA's content type): interval polling."""
    r1 = signed(tmp_path, keys, revision="r1").read_bytes()

    async def scenario() -> None:
        with BundleServer() as srv:
            srv.put("/b.tar.gz", r1)
            srv.long_poll = False
            source = HttpSource(srv.url + "/b.tar.gz", timeout_s=5, max_bytes=len(r1) * 4, long_poll_s=60)
            loader = BundleLoader(Holder(), source, ENTRYPOINT, verifier=verifier(keys))
            loader.holder.policy = await loader.load_initial()
            assert await loader.poll_once() == "unchanged"
            assert srv.requests[-1][2] == 304 and not source.long_polling
            await loader.close()
            loader.holder.policy.close()

    asyncio.run(scenario())
