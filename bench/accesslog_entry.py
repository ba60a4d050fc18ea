"""The access-log receiver's Python work per entry, in process: the request_log row, the metrics and the
spend ledger row of one final HTTPAccessLogEntry as Envoy sends it for the agent request.

    .venv/bin/python bench/accesslog_entry.py [-n 5000]

Each reads the entry's metadata namespaces; "shared" reads them once for all three (audit/entry.py
Namespaces, what audit/service.py does), "separate" lets each read its own. CPU µs per entry
(time.process_time, so the figures hold on a busy machine).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import timeit
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envoy.data.accesslog.v3 import accesslog_pb2  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402

from audit.entry import Namespaces, RowFacts, entry_to_row  # noqa: E402
from audit.ledger import Spend  # noqa: E402
from audit.observe import RequestObserver  # noqa: E402
from ccr.config import load_config  # noqa: E402
from ccr.contract import AUTHZ_NS, USAGE_NS  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def agent_entry() -> accesslog_pb2.HTTPAccessLogEntry:
    """A final entry with the metadata extauth and the usage meter set for the agent request."""
    e = accesslog_pb2.HTTPAccessLogEntry()
    c = e.common_properties
    c.start_time.GetCurrentTime()
    c.time_to_last_downstream_tx_byte.FromNanoseconds(3_000_000)
    c.time_to_first_upstream_tx_byte.FromNanoseconds(1_000_000)
    c.upstream_cluster = "provider_anthropic"
    c.access_log_type = accesslog_pb2.DownstreamEnd
    authz = struct_pb2.Struct()
    authz.update({"principal": "bench", "principal_id": "key_abc", "principal_kind": "api_key", "groups": ["default"],
                  "key_id": "key_abc", "model": "claude-sonnet-4-5", "endpoint": "messages.create",
                  "provider": "anthropic", "cluster": "provider_anthropic",
                  "rpm": {"requests_per_unit": 10000000, "unit": "MINUTE"}, "decision_id": "dec_0123456789ab00000001",
                  "spend_worst": 123456, "group_list": "default"})
    c.metadata.filter_metadata[AUTHZ_NS].CopyFrom(authz)
    usage = struct_pb2.Struct()
    usage.update({"input_tokens": 20000, "output_tokens": 300, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0, "cache_creation_5m_input_tokens": 0,
                  "cache_creation_1h_input_tokens": 0, "usage_status": "complete"})
    c.metadata.filter_metadata[USAGE_NS].CopyFrom(usage)
    e.request.request_id = "8d5f3c1e-1234-4abc-9def-0123456789ab"
    e.request.request_method = 3
    e.request.path = "/v1/messages"
    e.request.request_body_bytes = 83542
    e.response.response_code.value = 200
    e.response.response_body_bytes = 5000
    return e


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5000)
    args = ap.parse_args()
    cfg = yaml.safe_load((REPO / "ccr.example.yaml").read_text())
    cfg["policy"]["dir"] = str(REPO / "policies")
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "ccr.yaml").write_text(yaml.safe_dump(cfg))
        config = load_config(Path(d) / "ccr.yaml")
    e = agent_entry()
    spend, observer, facts = Spend(config), RequestObserver(config), RowFacts(config)

    def shared() -> None:
        ns = Namespaces(e.common_properties)
        row = entry_to_row(e, facts, ns)
        observer.entry(e, ns)
        spend.of_entry(e, ns, row[0] if row else None)

    def separate() -> None:
        entry_to_row(e, facts)
        observer.entry(e)
        spend.of_entry(e)

    for name, fn in (("row", lambda: entry_to_row(e, facts)), ("metrics", lambda: observer.entry(e)),
                     ("ledger", lambda: spend.of_entry(e)), ("separate (each reads)", separate),
                     ("shared (read once)", shared)):
        t = min(timeit.Timer(fn, timer=time.process_time).repeat(number=args.n, repeat=5)) / args.n * 1e6
        print(f"{name:<24}{t:7.1f} us")


if __name__ == "__main__":
    main()
