"""`ccr policy sign`: an existing bundle signed the way `opa build --signing-key` signs, checked by
extauth's verifier and by the real `opa` (`opa build --verification-key --bundle`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ccr.cli import main
from extauth.bundle import BundleError, build_bundle, find_opa, read_bundle
from extauth.bundle_signing import BundleVerifier
from tests.test_bundles import ENTRYPOINT, make_keys, policy_src, rewrite

CONFIG = "version: 1\nproviders: [{name: a}]\nmodels: [{match: '*', provider: a}]\n"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    return make_keys(tmp_path_factory.mktemp("sign-keys"))


@pytest.fixture(scope="module")
def unsigned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sign")
    return build_bundle(policy_src(root, ["claude-*"]), root / "unsigned.tar.gz", ENTRYPOINT, revision="u1")


def opa_verifies(bundle: Path, key: Path, alg: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([find_opa(), "build", "--verification-key", str(key), "--signing-alg", alg,
                           "--bundle", str(bundle), "-o", str(tmp / "opa-out.tar.gz")],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("alg", ["RS256", "ES256", "HS256"])
def test_sign_an_existing_bundle(tmp_path: Path, keys, unsigned: Path, alg: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "signed.tar.gz"
    assert main(["policy", "sign", "-c", str(config), str(unsigned), "--signing-key", str(keys[alg][0]),
                 "--alg", alg, "--out", str(out)]) == 0
    assert f"signed {out} ({alg})" in capsys.readouterr().out
    b = read_bundle(out, BundleVerifier.from_file(keys[alg][1], alg))
    assert b.signed and b.revision == "u1" and read_bundle(unsigned).wasm == b.wasm
    proc = opa_verifies(out, keys[alg][1], alg, tmp_path)
    assert proc.returncode == 0, proc.stderr

    # Tampered after signing: refused by both.
    tampered = tmp_path / "tampered.tar.gz"
    tampered.write_bytes(rewrite(out.read_bytes(), replace={"data.json": b'{"model_access": {"default": ["*"]}}'}))
    with pytest.raises(BundleError, match="tampered"):
        read_bundle(tampered, BundleVerifier.from_file(keys[alg][1], alg))
    assert opa_verifies(tampered, keys[alg][1], alg, tmp_path).returncode != 0


def test_resign_in_place_with_key_id_and_scope(tmp_path: Path, keys, unsigned: Path) -> None:
    bundle = tmp_path / "b.tar.gz"
    bundle.write_bytes(unsigned.read_bytes())
    config = tmp_path / "gw.yaml"
    config.write_text(CONFIG)
    sign = ["policy", "sign", "-c", str(config), str(bundle)]
    assert main([*sign, "--signing-key", str(keys["other-RS256"][0])]) == 0
    # Signed again with another key: the old signature is replaced, not kept next to the new one.
    assert main([*sign, "--signing-key", str(keys["RS256"][0]), "--key-id", "sec-2026", "--scope", "ccr"]) == 0
    verifier = BundleVerifier.from_file(keys["RS256"][1], "RS256", "sec-2026", "ccr")
    assert read_bundle(bundle, verifier).signed
    with pytest.raises(BundleError, match="does not verify"):
        read_bundle(bundle, BundleVerifier.from_file(keys["other-RS256"][1], "RS256", "sec-2026"))
    with pytest.raises(BundleError, match="key id"):
        read_bundle(bundle, BundleVerifier.from_file(keys["RS256"][1], "RS256"))


def test_sign_refuses_a_public_key(tmp_path: Path, keys, unsigned: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "never.tar.gz"
    assert main(["policy", "sign", "-c", str(config), str(unsigned), "--signing-key", str(keys["RS256"][1]),
                 "--out", str(out)]) == 1
    assert "public key" in capsys.readouterr().err and not out.exists()
