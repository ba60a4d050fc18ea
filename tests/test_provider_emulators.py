"""The provider emulators refuse what the real services refuse: an unsigned or mis-signed Bedrock
call, a Vertex call without a token it issued or with the wrong model spelling, an OpenAI-compatible
call without its key. (Their happy paths are covered end to end: tests/test_e2e_providers.py.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest

from router.adapter.translators.bedrock import AwsKeys, bedrock_path, sign
from tests.provider_emulators import AWS_KEY_ID, AWS_SECRET, PROJECT, REGION, Emulators, running_emulators

KEYS = AwsKeys(AWS_KEY_ID, AWS_SECRET)
BODY = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def emus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulators]:
    with running_emulators(tmp_path_factory.mktemp("emus")) as e:
        yield e


def _bedrock(emus: Emulators, body: dict[str, object], model: str = "anthropic.claude-x-1-v1:0",
             keys: AwsKeys = KEYS, tamper: bytes = b"") -> httpx.Response:
    host = emus.bedrock_url.split("//", 1)[1]
    path = bedrock_path(model, False)
    data = json.dumps(body).encode()
    h = {"content-type": "application/json", "accept": "application/json"}
    h |= sign(keys, "us-east-1", host, path, data, h)
    return httpx.post(emus.bedrock_url + path, content=data + tamper, headers=h, timeout=10)


def test_bedrock_checks_signature_model_and_body(emus: Emulators) -> None:
    assert _bedrock(emus, BODY).status_code == 200
    r = _bedrock(emus, BODY, keys=AwsKeys(AWS_KEY_ID, "wrong"))
    assert r.status_code == 403 and r.headers["x-amzn-errortype"].startswith("InvalidSignatureException")
    assert _bedrock(emus, BODY, tamper=b" ").status_code == 403  # body changed after signing
    assert _bedrock(emus, BODY, keys=AwsKeys("AKIDOTHER", AWS_SECRET)).headers["x-amzn-errortype"].startswith(
        "UnrecognizedClientException")
    r = httpx.post(emus.bedrock_url + bedrock_path("anthropic.claude-x-1-v1:0", False), json=BODY, timeout=10)
    assert r.status_code == 403  # unsigned
    assert _bedrock(emus, BODY, model="claude-x-1").status_code == 400  # not a Bedrock model id
    r = _bedrock(emus, {**BODY, "model": "claude-x-1"})
    assert r.status_code == 400 and "extraneous key [model]" in r.json()["message"]
    assert _bedrock(emus, {k: v for k, v in BODY.items() if k != "anthropic_version"}).status_code == 400


def test_vertex_checks_token_and_model_naming(emus: Emulators) -> None:
    base = f"{emus.vertex_url}/v1/projects/{PROJECT}/locations/{REGION}/publishers/anthropic/models/"
    body = {"anthropic_version": "vertex-2023-10-16", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    emus.vertex.tokens["good"] = 4_000_000_000.0
    emus.vertex.tokens["expired"] = 1.0
    ok = {"authorization": "Bearer good"}
    assert httpx.post(base + quote("claude-sonnet-4-5@20250929") + ":rawPredict", json=body, headers=ok).status_code \
        == 200
    for token in ("expired", "made-up"):
        r = httpx.post(base + "claude-x:rawPredict", json=body, headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 401 and r.json()["error"]["status"] == "UNAUTHENTICATED"
    r = httpx.post(base + "claude-sonnet-4-5-20250929:rawPredict", json=body, headers=ok)  # not the '@' spelling
    assert r.status_code == 404 and r.json()["error"]["status"] == "NOT_FOUND"
    r = httpx.post(base + "claude-x:rawPredict", json={**body, "model": "claude-x"}, headers=ok)
    assert r.status_code == 400
    r = httpx.post(f"{emus.vertex_url}/token", data={"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                                                      "assertion": "not.a.jwt"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


def test_openai_compat_checks_its_key(emus: Emulators) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{emus.openai_url}/v1/chat/completions", json=body).status_code == 401
    r = httpx.post(f"{emus.openai_url}/v1/chat/completions", json=body,
                   headers={"authorization": "Bearer sk-oss-test-key"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
