"""Server-side fallbacks (`fallbacks` in a Messages body): every model the provider may answer with instead is
checked as the request's own model is, by the real extauth service with the shipped policies over gRPC."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from google.rpc import code_pb2

from ccr.service import GRPC_OPTIONS
from extauth.bundle import build_bundle
from extauth.deny import Deny
from extauth.fallbacks import named
from extauth.keys import create_key
from tests.harness import running_service
from tests.test_extauth import denied_error, http_check

REPO = Path(__file__).resolve().parent.parent

GATEWAY_YAML = """
version: 1
providers:
  - name: anthropic
  - name: other
models:
  - match: claude-opus-4-1
    provider: other
    price: {input: 15, output: 75}
  - match: claude-opus-*
    provider: anthropic
    price: {input: 5, output: 25}
  - match: claude-haiku-*
    provider: anthropic
    price: {input: 1, output: 5}
  - match: claude-sonnet-*
    targets: [anthropic, other]
    price: {input: 3, output: 15}
aliases:
  fast: claude-haiku-4-5
"""


@pytest.fixture(scope="module")
def stub(postgres_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[pb_grpc.AuthorizationStub]:
    run = tmp_path_factory.mktemp("extauth-fallbacks")
    bundle = build_bundle(REPO / "policies", run / "policy.tar.gz", "ccr/authz/decision")
    with running_service("extauth", run, GATEWAY_YAML, postgres_dsn=postgres_dsn, policy_bundle=str(bundle)) as child, \
            grpc.insecure_channel(str(child.info["address"]), options=GRPC_OPTIONS) as ch:
        yield pb_grpc.AuthorizationStub(ch)


@pytest.fixture(scope="module")
def keys(postgres_dsn: str) -> dict[str, str]:
    return {"default": create_key(postgres_dsn, "fallbacks-default")[1],
            "haiku": create_key(postgres_dsn, "fallbacks-haiku", groups=["haiku-only"])[1]}


def check(stub: pb_grpc.AuthorizationStub, key: str, model: str, fallbacks: Any, path: str = "/v1/messages"
          ) -> tuple[int, dict[str, Any]]:
    doc: dict[str, Any] = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    if fallbacks is not ...:
        doc["fallbacks"] = fallbacks
    resp = stub.Check(http_check({"x-api-key": key, "content-type": "application/json"}, path=path,
                                 body=orjson.dumps(doc)))
    if resp.status.code == code_pb2.OK:
        return 200, {}
    return denied_error(resp)


def test_a_fallback_the_policy_refuses_this_principal_refuses_the_request(stub, keys) -> None:
    # haiku-only may use claude-haiku-*: a refusal provoked on Haiku must not be answered by Opus.
    assert check(stub, keys["haiku"], "claude-haiku-4-5", ...)[0] == 200
    status, err = check(stub, keys["haiku"], "claude-haiku-4-5", [{"model": "claude-opus-4-8"}])
    assert status == 403 and err["type"] == "permission_error"
    assert "fallbacks.0.model" in err["message"] and "claude-opus-4-8" in err["message"]
    # The same on count_tokens, and the second entry is checked as the first is.
    status, err = check(stub, keys["haiku"], "claude-haiku-4-5",
                        [{"model": "claude-haiku-4-5-20251001"}, {"model": "claude-opus-4-8"}],
                        path="/v1/messages/count_tokens")
    assert status == 403 and "fallbacks.1.model" in err["message"]


def test_allowed_no_dearer_fallbacks_at_the_same_provider_pass(stub, keys) -> None:
    assert check(stub, keys["default"], "claude-opus-4-8", [{"model": "claude-haiku-4-5"}])[0] == 200
    assert check(stub, keys["default"], "claude-opus-4-8",
                 [{"model": "claude-opus-4-7"}, {"model": "claude-haiku-4-5"}])[0] == 200
    assert check(stub, keys["haiku"], "claude-haiku-4-5", [{"model": "claude-haiku-4-5-20251001"}])[0] == 200
    assert check(stub, keys["default"], "claude-opus-4-8", None)[0] == 200  # null: no fallbacks


def test_a_dearer_fallback_is_refused_it_would_be_billed_at_the_requested_models_rates(stub, keys) -> None:
    status, err = check(stub, keys["default"], "claude-haiku-4-5", [{"model": "claude-opus-4-8"}])
    assert status == 400 and err["type"] == "invalid_request_error"
    assert "priced above claude-haiku-4-5" in err["message"]


def test_a_fallback_not_served_wherever_the_request_may_go_is_refused(stub, keys) -> None:
    # claude-opus-4-1 is served at `other` only; an Opus 4.8 request goes to `anthropic`.
    status, err = check(stub, keys["default"], "claude-opus-4-8", [{"model": "claude-opus-4-1"}])
    assert status == 400 and "may be sent to anthropic" in err["message"] and "claude-opus-4-1" in err["message"]
    # A Sonnet request may fail over to `other`, where the gateway serves no Haiku.
    status, err = check(stub, keys["default"], "claude-sonnet-4-6", [{"model": "claude-haiku-4-5"}])
    assert status == 400 and "may be sent to other" in err["message"]


def test_what_the_gateway_cannot_check_is_refused(stub, keys) -> None:
    k = keys["default"]
    status, err = check(stub, k, "claude-opus-4-8", "default")
    assert status == 400 and '"default" lets the provider choose' in err["message"]
    status, err = check(stub, k, "claude-opus-4-8", [{"model": "fast"}])  # an alias reaches the provider as written
    assert status == 400 and "alias of claude-haiku-4-5" in err["message"]
    status, err = check(stub, k, "claude-opus-4-8", [{"model": "gpt-5"}])
    assert status == 400 and "not a model this gateway serves" in err["message"]
    for bad in ([], [{"model": "claude-haiku-4-5"}] * 4, [{"model": "claude-haiku-4-5", "max_tokens": 5}],
                [{"model": ""}], ["claude-haiku-4-5"], {"model": "claude-haiku-4-5"}, 7):
        status, err = check(stub, k, "claude-opus-4-8", bad)
        assert status == 400 and err["message"].startswith("fallbacks"), (bad, err)


def test_a_batch_request_is_checked_as_a_single_call(stub, keys) -> None:
    def batch(fallbacks: Any) -> tuple[int, dict[str, Any]]:
        params = {"model": "claude-haiku-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}],
                  "fallbacks": fallbacks}
        body = orjson.dumps({"requests": [{"custom_id": "a", "params": params}]})
        resp = stub.Check(http_check({"x-api-key": keys["haiku"], "content-type": "application/json"},
                                     path="/v1/messages/batches", body=body))
        return (200, {}) if resp.status.code == code_pb2.OK else denied_error(resp)

    assert batch([{"model": "claude-haiku-4-5-20251001"}])[0] == 200
    status, err = batch([{"model": "claude-opus-4-8"}])
    assert status == 403 and "requests.0.params.fallbacks.0.model" in err["message"]
    # What a single call may not carry, a batch request may not either.
    for bad, where in (("default", "requests.0.params.fallbacks:"), ([{"model": "fast"}], "fallbacks.0.model"),
                       ([{"model": "claude-haiku-4-5", "system": "x"}], "requests.0.params.fallbacks.0:"),
                       ([], "requests.0.params.fallbacks:")):
        status, err = batch(bad)
        assert status == 400 and where in err["message"], (bad, err)


def test_named_reads_only_model_entries() -> None:
    assert named(None, "f") == []
    assert named([{"model": "a"}, {"model": "b"}], "f") == ["a", "b"]
    with pytest.raises(Deny) as e:
        named("default", "f")
    assert e.value.status == 400


def test_fallbacks_given_twice_are_refused_a_provider_may_read_the_other_one(stub, keys) -> None:
    # Any key given twice in one object is refused by the parse (tests/test_one_reading.py); these are the
    # fallbacks walk-arounds it closes.
    def raw(body: bytes, path: str = "/v1/messages") -> tuple[int, dict[str, Any]]:
        resp = stub.Check(http_check({"x-api-key": keys["haiku"], "content-type": "application/json"}, path=path,
                                     body=body))
        return (200, {}) if resp.status.code == code_pb2.OK else denied_error(resp)

    def refused(status_err: tuple[int, dict[str, Any]], key: str) -> bool:
        status, err = status_err
        return status == 400 and f'"{key}" is given twice in one object' in err["message"]

    head = b'{"model":"claude-haiku-4-5","max_tokens":16,"messages":[{"role":"user","content":"hi"}]'
    # The parse would keep the last (null): the first, which names a refused model, must not slip through.
    assert refused(raw(head + b',"fallbacks":[{"model":"claude-opus-4-8"}],"fallbacks":null}'), "fallbacks")
    # A nested key of that name is not a second one; an escaped one in text is not a key at all.
    assert raw(head + b',"metadata":{"fallbacks":1},"fallbacks":null}')[0] == 200
    assert refused(raw(b'{"requests":[{"custom_id":"a","params":' + head
                       + b',"fallbacks":[{"model":"claude-opus-4-8"}],"fallbacks":[{"model":"claude-haiku-4-5"}]}}]}',
                       "/v1/messages/batches"), "fallbacks")
    # The same key spelled with \u escapes is the same key to the parser.
    for spelled in (b"fallback\\u0073", b"\\u0066allbacks", b"f\\u0061ll\\u0062\\u0061\\u0063\\u006Bs"):
        assert refused(raw(b'{"requests":[{"custom_id":"a","params":' + head
                           + b',"fallbacks":[{"model":"claude-opus-4-8"}],"' + spelled + b'":null}}]}',
                           "/v1/messages/batches"), "fallbacks"), spelled
        assert refused(raw(head + b',"fallbacks":[{"model":"claude-opus-4-8"}],"' + spelled + b'":null}'),
                       "fallbacks"), spelled
    # One entry naming two models: the parse would keep the allowed last one, a provider may read the refused first.
    for entry in (b'{"model":"claude-opus-4-8","model":"claude-haiku-4-5"}',
                  b'{"model":"claude-opus-4-8","\\u006dodel":"claude-haiku-4-5"}'):
        assert refused(raw(head + b',"fallbacks":[' + entry + b']}'), "model"), entry
        assert refused(raw(b'{"requests":[{"custom_id":"a","params":' + head + b',"fallbacks":[' + entry + b']}}]}',
                           "/v1/messages/batches"), "model"), entry
    ok = (b'{"requests":[{"custom_id":"a","params":{"model":"claude-haiku-4-5","max_tokens":16,"messages":[{"role":'
          b'"user","content":"say \\"fallbacks\\": now"}],"fallbacks":[{"model":"claude-haiku-4-5"}]}}]}')
    assert raw(ok, "/v1/messages/batches")[0] == 200
