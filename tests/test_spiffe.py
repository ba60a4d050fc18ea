"""SPIFFE IDs: the strict parser (examples and properties) and workload identity in extauth."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ccr.config import SpiffeSettings
from extauth.deny import Deny
from extauth.identity import Identity
from extauth.keys import KeyStore
from extauth.principal import PrincipalKind
from extauth.spiffe import MAX_ID_BYTES, SpiffeIdError, parse_spiffe_id, svid_spiffe_id
from tests import pki

# The grammar, written independently of the parser as one regular expression.
REFERENCE = re.compile(r"spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)+")

td_chars = st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789.-_")
seg_chars = st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")
trust_domains = st.text(td_chars, min_size=1, max_size=40)
segments = st.text(seg_chars, min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))
paths = st.lists(segments, min_size=1, max_size=6).map(lambda segs: "/" + "/".join(segs))


def reference_accepts(text: str) -> bool:
    if len(text.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES or not REFERENCE.fullmatch(text):
        return False
    return all(seg not in (".", "..") for seg in text.split("/")[3:])


@given(trust_domains, paths)
def test_valid_ids_round_trip(td: str, path: str) -> None:
    sid = parse_spiffe_id(f"spiffe://{td}{path}")
    assert (sid.trust_domain, sid.path) == (td, path)
    assert str(sid) == f"spiffe://{td}{path}"


@given(st.one_of(
    st.text(max_size=80),
    st.builds(lambda td, p, junk: f"spiffe://{td}{p}{junk}", trust_domains, paths, st.text(max_size=5)),
    st.builds(lambda junk, td, p: f"spiffe://{junk}{td}{p}", st.text(max_size=3), trust_domains, paths),
    st.builds(lambda td, a, b: f"spiffe://{td}/{a}/{b}", trust_domains, st.text(max_size=4), st.text(max_size=4)),
))
@example("spiffe://example.org/ns/batch/sa/job\n")
@example("spiffe://example.org/ns/./job")
@example("spiffe://example.org/ns/../job")
def test_parser_agrees_with_the_grammar(text: str) -> None:
    try:
        parse_spiffe_id(text)
    except SpiffeIdError:
        accepted = False
    else:
        accepted = True
    assert accepted == reference_accepts(text), text


@given(trust_domains, paths, st.integers(min_value=0), st.sampled_from(list(":@?#% \n\tAZ\u00e9\\")))
def test_a_forbidden_character_in_the_trust_domain_is_refused(td: str, path: str, at: int, bad: str) -> None:
    i = at % (len(td) + 1)
    with pytest.raises(SpiffeIdError):
        parse_spiffe_id(f"spiffe://{td[:i]}{bad}{td[i:]}{path}")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("SPIFFE://example.org/ns/a", "does not start with 'spiffe://'"),
        ("spiffe:/example.org/ns/a", "does not start with 'spiffe://'"),
        ("https://example.org/ns/a", "does not start with 'spiffe://'"),
        ("CN=job,O=example", "does not start with 'spiffe://'"),
        ("spiffe:///ns/a", "has no trust domain"),
        ("spiffe://Example.org/ns/a", "trust domain may hold only"),
        ("spiffe://example.org:8443/ns/a", "trust domain may hold only"),
        ("spiffe://user@example.org/ns/a", "trust domain may hold only"),
        ("spiffe://example.org", "has no path"),
        ("spiffe://example.org/", "empty segment or a trailing slash"),
        ("spiffe://example.org/ns//a", "empty segment or a trailing slash"),
        ("spiffe://example.org/ns/a/", "empty segment or a trailing slash"),
        ("spiffe://example.org/ns/../admin", "'.' or '..' segment"),
        ("spiffe://example.org/ns/%2e%2e/admin", "may hold only letters"),
        ("spiffe://example.org/ns/a?x=1", "may hold only letters"),
        ("spiffe://example.org/ns/a#frag", "may hold only letters"),
        ("spiffe://example.org/" + "a" * MAX_ID_BYTES, "longer than"),
    ],
)
def test_malformed_ids_say_why(text: str, reason: str) -> None:
    with pytest.raises(SpiffeIdError, match=re.escape(reason)):
        parse_spiffe_id(text)


# -- workload identity in extauth (no database needed: workloads hold no key) ----------

BATCH = "spiffe://example.org/ns/batch/sa/job"


def authenticate(settings: SpiffeSettings, headers: dict[str, str], peer: str | None):
    ident = Identity(KeyStore("postgresql://unused@127.0.0.1:1/unused"), spiffe=settings)
    return asyncio.run(ident.authenticate(headers, peer))


ON = SpiffeSettings(enabled=True, trust_domains=["example.org"], allow_without_key=True)


def test_workload_without_key() -> None:
    p = authenticate(ON, {}, BATCH)
    assert p.kind == PrincipalKind.WORKLOAD and p.id == p.name == p.spiffe_id == BATCH
    assert p.key_id is None and p.groups == ()
    assert p.policy_input()["claims"] == {"trust_domain": "example.org"}


@pytest.mark.parametrize(
    ("settings", "peer", "status", "needle"),
    [
        (ON, "spiffe://other.org/ns/batch/sa/job", 403, "trust domain 'other.org' is not trusted"),
        (ON, "spiffe://example.org.evil/ns/x", 403, "trust domain 'example.org.evil' is not trusted"),
        (ON, "CN=job,O=example", 401, "is not a valid SPIFFE ID: it does not start with 'spiffe://'"),
        (ON, "spiffe://example.org", 401, "has no path"),
        (SpiffeSettings(enabled=True, trust_domains=["example.org"]), BATCH, 401,
         "must present one too (identity.spiffe.allow_without_key is off)"),
        # SPIFFE off: a client certificate is no identity at all.
        (SpiffeSettings(enabled=False, trust_domains=["example.org"], allow_without_key=True), BATCH, 401,
         "missing credentials"),
        (ON, None, 401, "missing credentials"),
    ],
)
def test_workload_refusals(settings: SpiffeSettings, peer: str | None, status: int, needle: str) -> None:
    with pytest.raises(Deny) as e:
        authenticate(settings, {}, peer)
    assert e.value.status == status and needle in e.value.message
    assert e.value.err_type == ("permission_error" if status == 403 else "authentication_error")


def test_untrusted_peer_is_refused_even_with_a_credential() -> None:
    # Refused before the key is looked up (the store here has no database).
    with pytest.raises(Deny) as e:
        authenticate(ON, {"x-api-key": "ccr_" + "A" * 43}, "spiffe://other.org/ns/x")
    assert e.value.status == 403


# -- the peer certificate must be an X.509-SVID ------------------------------------


def pem(issued: pki.Issued) -> str:
    return issued.cert_file.read_text()


def test_svid_spiffe_id(tmp_path: Path) -> None:
    ca = pki.make_ca(tmp_path, "ca")
    assert svid_spiffe_id(pem(pki.issue(ca, tmp_path, "svid", uris=(BATCH,)))) == BATCH
    cases = {
        "has 2 URI SANs": pki.issue(ca, tmp_path, "two", uris=(BATCH, "spiffe://example.org/ns/admin")),
        "has 0 URI SANs": pki.issue(ca, tmp_path, "dns", dns=("job.example.org",)),
        "is a CA certificate": ca,
    }
    for needle, cert in cases.items():
        with pytest.raises(SpiffeIdError, match=re.escape(needle)):
            svid_spiffe_id(pem(cert))
    with pytest.raises(SpiffeIdError, match="could not be parsed"):
        svid_spiffe_id("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")


def test_the_certificate_decides_over_the_reported_peer(tmp_path: Path) -> None:
    ca = pki.make_ca(tmp_path, "ca")
    web = pem(pki.issue(ca, tmp_path, "web", uris=("spiffe://example.org/ns/web/sa/api",)))
    ident = Identity(KeyStore("postgresql://unused@127.0.0.1:1/unused"), spiffe=ON)
    p = asyncio.run(ident.authenticate({}, None, web))
    assert p.id == "spiffe://example.org/ns/web/sa/api"
    with pytest.raises(Deny, match="ambiguous"):
        asyncio.run(ident.authenticate({}, BATCH, web))
    two = pem(pki.issue(ca, tmp_path, "two", uris=(BATCH, "spiffe://example.org/ns/admin")))
    with pytest.raises(Deny, match="not an X.509-SVID: it has 2 URI SANs") as e:
        asyncio.run(ident.authenticate({}, BATCH, two))
    assert e.value.status == 401
