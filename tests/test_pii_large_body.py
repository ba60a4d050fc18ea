"""A 20 MB request with the PII scan on (`data.pii.mode: block`) stays within issue 6's memory bound:
the scan decodes and reads the text a chunk at a time (extauth/pii.py), so a Check allocates nothing
body-sized, and it still reads all of it (an SSN in the last bytes is found). The same holds when the
bundle asks for the request text in its input: only `max_text_chars` of it are decoded."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.rpc import code_pb2

from extauth.keys import create_key
from tests.test_extauth import denied_error, ok_headers
from tests.test_extauth_large_body import BIG, MIB, SLACK, check_bytes, checks, text_body
from tests.test_policy_input import bundle_of, shipped_data


@pytest.fixture(scope="module")
def pii_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = shipped_data()
    data["pii"].update(mode="block", kinds=["ssn", "card", "iban", "email"])
    return bundle_of(tmp_path_factory.mktemp("pii-big"), data)


@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = shipped_data(policy_input={"text": True})  # max_text_chars: the default 256 Ki
    data["pii"].update(mode="block")
    return bundle_of(tmp_path_factory.mktemp("pii-big-text"), data)


def _with_ssn_at_the_end(size: int = BIG) -> bytes:
    body = text_body(size)
    tail = b'consectetur\\n"}]}]}'
    assert body.endswith(tail)
    return body[: -len(tail)] + b'ssn 123-45-6789"}]}]}'


@pytest.mark.parametrize("which", ["pii", "pii+text"])
def test_a_20mb_text_body_is_scanned_without_a_body_sized_allocation(postgres_dsn: str, pii_bundle: Path,
                                                                     text_bundle: Path, which: str) -> None:
    bundle = pii_bundle if which == "pii" else text_bundle
    _, key = create_key(postgres_dsn, f"big-pii-{which}")
    clean, dirty = text_body(), _with_ssn_at_the_end()
    warm = check_bytes(key, b'{"model": "claude-sonnet-4-5", "max_tokens": 8, "messages": []}')
    (_, _), (ok, ok_peak), (deny, deny_peak) = checks(
        postgres_dsn, bundle, [warm, check_bytes(key, clean), check_bytes(key, dirty)], traced=True)
    assert ok.status.code == code_pb2.OK and ok_headers(ok)["x-ccr-model"] == "claude-sonnet-4-5"
    status, err = denied_error(deny)  # the last bytes of 20 MB were read
    assert status == 403 and err["message"].startswith("prompt contains a US SSN (messages[0].content[0])")
    # Before: 166 MB for this body (the text decoded whole, then normalised copies of it). With the text
    # in the input, 256 Ki characters of it (1 MiB as a str of 4-byte characters) are added.
    bound = SLACK + (2 * MIB if which == "pii+text" else 0)
    assert ok_peak <= bound and deny_peak <= bound, (ok_peak / MIB, deny_peak / MIB)
