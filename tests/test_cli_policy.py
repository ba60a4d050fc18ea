"""`ccr policy build|verify|test|status` with the real opa CLI; policy.bundle/verification config."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ccr.cli import main
from ccr.config import ConfigError, load_config
from extauth.bundle import read_bundle
from extauth.bundle_source import STATUS_FILE, PolicyStatus, write_status

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def setup(tmp_path: Path) -> tuple[str, Path]:
    """A config with policy.bundle + ES256 verification, its policy dir and a key pair."""
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    key = ec.generate_private_key(ec.SECP256R1())
    priv = tmp_path / "signing.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    (tmp_path / "verify.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    cfg = yaml.safe_load((REPO / "ccr.example.yaml").read_text())
    cfg["storage"]["data_dir"] = str(tmp_path / "data")
    cfg["policy"] = {"dir": "policies", "entrypoint": "ccr/authz/decision",
                     "bundle": {"path": "bundle.tar.gz"},
                     "verification": {"key_file": "verify.pem", "alg": "ES256", "key_id": "sec-team"}}
    path = tmp_path / "ccr.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path), priv


def test_build_signed_then_verify(setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, priv = setup
    out = tmp_path / "bundle.tar.gz"
    # alg and key id come from policy.verification, so the bundle matches what extauth expects.
    assert main(["policy", "build", "-c", config, "--out", str(out), "--signing-key", str(priv),
                 "--revision", "2026-11-26.1"]) == 0
    assert "signed (ES256)" in capsys.readouterr().out
    b = read_bundle(out)
    assert b.signed and b.revision == "2026-11-26.1"
    assert main(["-c", config, "policy", "verify", str(out)]) == 0
    assert "signature OK" in capsys.readouterr().out

    # Tampered: data.json rewritten inside the tarball -> verify fails.
    raw = io.BytesIO()
    with tarfile.open(out) as src, tarfile.open(fileobj=raw, mode="w:gz") as dst:
        for m in src:
            body = src.extractfile(m).read()  # type: ignore[union-attr]
            if m.name.lstrip("/") == "data.json":
                body = json.dumps({"model_access": {"default": ["*"]}}).encode()
            info = tarfile.TarInfo(m.name)
            info.size = len(body)
            dst.addfile(info, io.BytesIO(body))
    bad = tmp_path / "tampered.tar.gz"
    bad.write_bytes(raw.getvalue())
    assert main(["policy", "verify", "-c", config, str(bad)]) == 1
    assert "tampered" in capsys.readouterr().err

    # Unsigned: verify fails.
    assert main(["policy", "build", "-c", config, "--out", str(tmp_path / "u.tar.gz")]) == 0
    assert "unsigned" in capsys.readouterr().out
    assert main(["policy", "verify", "-c", config, str(tmp_path / "u.tar.gz")]) == 1
    assert "not signed" in capsys.readouterr().err


def test_policy_test_wraps_opa_test(setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, _ = setup
    assert main(["policy", "test", "-c", config]) == 0
    (tmp_path / "policies" / "broken_test.rego").write_text(
        "package ccr.broken_test\n\ntest_fails if {\n\tfalse\n}\n")
    assert main(["policy", "test", "-c", config]) != 0


def test_policy_status(setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, _ = setup
    assert main(["policy", "status", "-c", config]) == 1
    assert "no policy status" in capsys.readouterr().err
    run = tmp_path / "data" / "run"
    run.mkdir(parents=True)
    st = PolicyStatus(source="https://b/x.tar.gz", entrypoint="ccr/authz/decision", revision="r7",
                      digest="ab" * 32, signed=True, loaded_at=1_800_000_000.0, last_check_at=1_800_000_030.0)
    write_status(run / STATUS_FILE, st)
    assert main(["policy", "status", "-c", config]) == 0
    out = capsys.readouterr().out
    assert "revision   : r7" in out and "abab" in out and "2027-01-15T08:00:00+00:00" in out
    st.last_error, st.last_error_at = "x.tar.gz: data.json does not match its signed hash (tampered)", 1.8e9 + 60
    write_status(run / STATUS_FILE, st)
    assert main(["policy", "status", "-c", config]) == 1
    out = capsys.readouterr().out
    assert "revision   : r7" in out and "tampered" in out and "keeps serving" in out
    assert main(["policy", "status", "-c", config, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["revision"] == "r7"


def test_config_refuses_unsafe_bundle_settings(tmp_path: Path) -> None:
    base = yaml.safe_load((REPO / "ccr.example.yaml").read_text())

    def check(policy: dict) -> None:
        cfg = dict(base, policy=policy)
        p = tmp_path / "c.yaml"
        p.write_text(yaml.safe_dump(cfg))
        load_config(p)

    check({"bundle": {"url": "https://b.example/x.tar.gz"}, "verification": {"key_file": "k.pem"}})
    check({"bundle": {"url": "https://b.example/x.tar.gz", "allow_unsigned": True}})
    with pytest.raises(ConfigError, match="without policy.verification"):
        check({"bundle": {"url": "https://b.example/x.tar.gz"}})
    with pytest.raises(ConfigError, match="needs policy.bundle"):
        check({"verification": {"key_file": "k.pem"}})
    with pytest.raises(ConfigError, match="exactly one of"):
        check({"bundle": {"url": "https://b.example/x", "path": "x"}, "verification": {"key_file": "k"}})
    with pytest.raises(ConfigError, match="http"):
        check({"bundle": {"url": "file:///etc/passwd"}, "verification": {"key_file": "k"}})
    with pytest.raises(ConfigError, match="alg"):
        check({"bundle": {"path": "x"}, "verification": {"key_file": "k", "alg": "none"}})


def test_push_verifies_then_puts(setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.bundle_server import BundleServer

    config, priv = setup
    good, unsigned = tmp_path / "good.tar.gz", tmp_path / "unsigned.tar.gz"
    assert main(["policy", "build", "-c", config, "--out", str(good), "--signing-key", str(priv)]) == 0
    assert main(["policy", "build", "-c", config, "--out", str(unsigned)]) == 0
    (tmp_path / "token").write_text("push-token\n")
    with BundleServer() as srv:
        srv.token = "push-token"
        url = srv.url + "/ccr/bundle.tar.gz"
        # Unsigned: refused before anything is sent.
        assert main(["policy", "push", "-c", config, str(unsigned), "--url", url,
                     "--token-file", str(tmp_path / "token")]) == 1
        assert "not signed" in capsys.readouterr().err and srv.requests == []
        assert main(["policy", "push", "-c", config, str(good), "--url", url]) == 1  # no token: 401
        assert "HTTP 401" in capsys.readouterr().err
        assert main(["policy", "push", "-c", config, str(good), "--url", url,
                     "--token-file", str(tmp_path / "token")]) == 0
        assert "signature OK" in capsys.readouterr().out
        assert srv.files["/ccr/bundle.tar.gz"] == good.read_bytes()


def test_push_installs_at_the_bundle_path_atomically(setup, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """With `bundle.path` (no bundle server), push verifies, then renames the bundle over that file,
    which extauth's file source re-reads; an unsigned or tampered bundle never gets there."""
    config, priv = setup
    good, unsigned = tmp_path / "good.tar.gz", tmp_path / "unsigned.tar.gz"
    assert main(["policy", "build", "-c", config, "--out", str(good), "--revision", "r7",
                 "--signing-key", str(priv)]) == 0
    assert main(["policy", "build", "-c", config, "--out", str(unsigned)]) == 0
    capsys.readouterr()
    installed = tmp_path / "bundle.tar.gz"  # policy.bundle.path, relative to the config file
    installed.write_bytes(b"the last good bundle")
    assert main(["policy", "push", "-c", config, str(unsigned)]) == 1
    assert "not signed" in capsys.readouterr().err and installed.read_bytes() == b"the last good bundle"
    assert main(["policy", "push", "-c", config, str(good)]) == 0
    assert f"to {installed}" in capsys.readouterr().out
    assert installed.read_bytes() == good.read_bytes()
    assert read_bundle(installed).revision == "r7"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle")) == []  # no temp file left
    other = tmp_path / "elsewhere" / "b.tar.gz"
    assert main(["policy", "push", "-c", config, str(good), "--path", str(other)]) == 0
    assert other.read_bytes() == good.read_bytes()
    (tmp_path / "dir-bundle").mkdir()
    assert main(["policy", "push", "-c", config, str(good), "--path", str(tmp_path / "dir-bundle")]) == 2
    assert "bundle directory" in capsys.readouterr().err
    assert main(["policy", "push", "-c", config, str(good), "--path", str(other), "--url", "http://x"]) == 2
