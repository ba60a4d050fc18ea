"""Where Envoy's own CPU goes in the gateway: the real generated config, features taken off one by one.

    .venv/bin/python bench/envoy_features.py [--duration 2] [--rate 100] [--runs 2] [--only step,step]
                                             [--concurrency N  (closed loop instead of paced)]

It starts a full gateway (embedded PostgreSQL/Redis, the emulator as upstream, the real extauth,
ratelimit, adapter and accesslog services), then builds the same listener, routes and clusters the
router serves over xDS (router/resources.py `build`, plus the overload manager of ccr/overload.py)
as a static Envoy bootstrap and runs one Envoy per step, each pointing at the gateway's own
services. A step is the config with one more feature removed (the ladder goes from the full
gateway down to bare Envoy, router filter only, as bench/gateway.py runs it); side steps change one
thing on the full config (the client asking for gzip, a TLS listener, the adapter's ext_proc metering
every reply as before issue 6, `--concurrency 2`, ...).

Each step sends the 84 KB streamed agent request (tests/fixtures/agent_request_90k.json) for
--duration seconds, paced at --rate req/s (every step sees the same load, so per-request costs
compare: Envoy batches more work per wakeup under heavier load), and reads the CPU time of the
Envoy process only: the sum over its threads of /proc/PID/task/TID/schedstat (nanoseconds; the
clock-tick counters of /proc/PID/stat are 10 ms coarse). The client, the Python services and the
emulator are left out. Every step runs --runs times (interleaved) so the table shows the noise.
Timings on a shared, busy machine are noisy: compare deltas that exceed the spread of the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gzip
import json
import os
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.gateway import _bound_port, bare_envoy_config, gateway_config  # noqa: E402
from ccr.config import load_config  # noqa: E402
from ccr.fixtures import AGENT_REQUEST, fixture_path  # noqa: E402
from ccr.overload import overload_manager  # noqa: E402
from ccr.procs import Child, spawn, wait_until  # noqa: E402
from ccr.supervisor import Gateway, envoy_binary  # noqa: E402
from router import resources  # noqa: E402
from router.downstream import IDENTITY_FIRST  # noqa: E402

Json = dict[str, Any]
T = "type.googleapis.com/"
API_VERSION = "2023-06-01"
EXT_AUTHZ = "envoy.filters.http.ext_authz"
RATELIMIT = "envoy.filters.http.ratelimit"
COMPRESSOR = "envoy.filters.http.compressor"
EXT_PROC = "envoy.filters.http.ext_proc"
# A provider cluster's upstream filters (router/resources.py upstream_filters).
METER = "envoy.filters.http.lua"
CODEC = "envoy.filters.http.upstream_codec"
MESSAGES = "/v1/messages"
SMALL_BODY = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": True,
                         "messages": [{"role": "user", "content": "Say hello."}]}).encode()
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- Envoy CPU: nanoseconds on CPU summed over the process's threads


def envoy_cpu_s(pid: int) -> float:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that just ended
    return total / 1e9


def envoy_user_sys_s(pid: int) -> tuple[float, float]:
    """User and system CPU seconds (clock ticks: coarse, used only for the kernel's share)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rfind(b")") + 2:].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


# -- the config under test


@dataclass
class Ctx:
    """What the steps need to know about the running gateway."""
    emulator_key: str
    provider_cluster: str
    emulator_url: str
    tls: tuple[str, str] | None = None  # (cert, key) for the TLS listener step
    uds: dict[str, str] = field(default_factory=dict)  # service cluster -> Unix socket relaying to it
    real: tuple[str, int, str] | None = None  # the gateway's own Envoy (config over xDS): url, pid, admin url
    stubs: dict[str, int] = field(default_factory=dict)  # fixed-answer ext_authz servers: answer -> port
    traced: dict[float, Json] = field(default_factory=dict)  # sample ratio -> the full config with tracing on


def hcm(b: Json) -> Json:
    return b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def drop_filter(b: Json, name: str) -> None:
    h = hcm(b)
    h["http_filters"] = [f for f in h["http_filters"] if f["name"] != name]


def filter_config(b: Json, name: str) -> Json:
    return next(f for f in hcm(b)["http_filters"] if f["name"] == name)["typed_config"]


def api_routes(b: Json) -> list[Json]:
    routes = hcm(b)["route_config"]["virtual_hosts"][0]["routes"]
    return [r for r in routes if "route" in r and r["route"].get("cluster") != resources.SIGNIN]


def provider_clusters(b: Json) -> list[Json]:
    return [c for c in b["static_resources"]["clusters"]
            if c["name"] not in (resources.EXTAUTH, resources.RATELIMIT, resources.ADAPTER, resources.ACCESSLOG,
                                 resources.SIGNIN)]


def upstream_filters(c: Json) -> list[Json]:
    return c["typed_extension_protocol_options"][resources.HTTP_OPTS_KEY]["http_filters"]


def full_bootstrap(gw: Gateway, otlp: tuple[str, float] | None = None) -> Json:
    """The gateway's config as a static bootstrap; with `otlp` (collector, sample ratio), tracing on as
    telemetry.otlp_endpoint and telemetry.sample_ratio set it (HCM tracing, the OTLP cluster, the ALS headers)."""
    assert gw.runtime is not None
    config = load_config(gw.config_path)
    if otlp is not None:
        config = config.model_copy(update={"telemetry": config.telemetry.model_copy(
            update={"otlp_endpoint": otlp[0], "sample_ratio": otlp[1]})})
    res = resources.build(config, gw.runtime, 0, inline_routes=True)
    return {
        "node": {"id": "ccr-bench-features", "cluster": "ccr-bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": res.listeners, "clusters": res.clusters},
        "overload_manager": overload_manager(config.gateway.overload),
    }


# Each edit changes the bootstrap in place; the ladder applies them cumulatively.


def no_access_log(b: Json, ctx: Ctx) -> None:
    hcm(b).pop("access_log", None)


def no_compressor(b: Json, ctx: Ctx) -> None:
    drop_filter(b, COMPRESSOR)


def no_ratelimit(b: Json, ctx: Ctx) -> None:
    drop_filter(b, RATELIMIT)
    for r in api_routes(b):
        r["route"].pop("rate_limits", None)
    for r in hcm(b)["route_config"]["virtual_hosts"][0]["routes"]:
        r.get("typed_per_filter_config", {}).pop(RATELIMIT, None)


def no_overload_manager(b: Json, ctx: Ctx) -> None:
    b.pop("overload_manager", None)


def _static_key(b: Json, ctx: Ctx) -> None:
    """The emulator's key set by the route, as the adapter would (no filter left to do it)."""
    for r in api_routes(b):
        r.setdefault("request_headers_to_add", []).append({
            "header": {"key": "x-api-key", "value": ctx.emulator_key}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"})


def _is(f: Json, name: str) -> bool:
    return bool(f["name"] == name)


def no_meter(b: Json, ctx: Ctx) -> None:
    """Without the usage meter (router/meter.lua)."""
    for c in provider_clusters(b):
        opts = c["typed_extension_protocol_options"][resources.HTTP_OPTS_KEY]
        opts["http_filters"] = [f for f in opts["http_filters"] if not _is(f, METER)]


def no_upstream_extras(b: Json, ctx: Ctx) -> None:
    """Without header hygiene and the credential injector: the route sets the key, as bare Envoy needs."""
    for c in provider_clusters(b):
        opts = c["typed_extension_protocol_options"][resources.HTTP_OPTS_KEY]
        opts["http_filters"] = [f for f in opts["http_filters"] if f["name"] == CODEC]
    _static_key(b, ctx)


def adapter_meters(b: Json, ctx: Ctx) -> None:
    """As before issue 6: the adapter's streaming ext_proc meters every reply instead of the Lua meter."""
    clusters = provider_clusters(b)
    proc = next(f for c in clusters for f in upstream_filters(c) if _is(f, EXT_PROC))
    for c in clusters:
        fs = upstream_filters(c)
        c["typed_extension_protocol_options"][resources.HTTP_OPTS_KEY]["http_filters"] = [
            proc if _is(f, METER) else f for f in fs]


def adapter_observes(b: Json, ctx: Ctx) -> None:
    """The adapter's ext_proc in observability mode (Envoy sends the reply as it passes, never waits)."""
    adapter_meters(b, ctx)
    for c in provider_clusters(b):
        for f in upstream_filters(c):
            if f["name"] == EXT_PROC:
                f["typed_config"]["observability_mode"] = True


def no_identity_first(b: Json, ctx: Ctx) -> None:
    drop_filter(b, IDENTITY_FIRST)
    for r in hcm(b)["route_config"]["virtual_hosts"][0]["routes"]:
        r.get("typed_per_filter_config", {}).pop(IDENTITY_FIRST, None)


def ext_authz_headers_only(b: Json, ctx: Ctx) -> None:
    """Information only (the body names the model, so extauth needs it): what buffering and packing cost."""
    filter_config(b, EXT_AUTHZ).pop("with_request_body", None)


def ext_authz_as_string(b: Json, ctx: Ctx) -> None:
    filter_config(b, EXT_AUTHZ)["with_request_body"]["pack_as_bytes"] = False


def ext_authz_allowed_headers(b: Json, ctx: Ctx) -> None:
    """Only the headers extauth reads: the credential ones and x-ccr-* (to name spoofed ones)."""
    allowed = {"patterns": [{"exact": "x-api-key"}, {"exact": "authorization"}, {"prefix": "x-ccr-"}]}
    filter_config(b, EXT_AUTHZ)["allowed_headers"] = allowed


def no_ext_authz(b: Json, ctx: Ctx) -> None:
    """No authorization: the route names the provider's cluster itself (extauth would have)."""
    drop_filter(b, EXT_AUTHZ)
    drop_filter(b, IDENTITY_FIRST)
    for r in hcm(b)["route_config"]["virtual_hosts"][0]["routes"]:
        for name in (EXT_AUTHZ, IDENTITY_FIRST):
            r.get("typed_per_filter_config", {}).pop(name, None)
    for r in api_routes(b):
        r["route"].pop("cluster_header", None)  # one dict shared by every endpoint's route
        r["route"]["cluster"] = ctx.provider_cluster


def no_hcm_extras(b: Json, ctx: Ctx) -> None:
    """The HCM as bare Envoy has it: no early header mutations, local reply mappers, path
    normalisation, request-id in the response, XFCC sanitising, connection limits."""
    h = hcm(b)
    for k in ("early_header_mutation_extensions", "local_reply_config", "normalize_path", "merge_slashes",
              "path_with_escaped_slashes_action", "always_set_request_id_in_response",
              "forward_client_cert_details", "request_headers_timeout", "common_http_protocol_options",
              "http2_protocol_options", "max_request_headers_kb"):
        h.pop(k, None)
    filter_config(b, "envoy.filters.http.router").pop("suppress_envoy_headers", None)


def no_request_id(b: Json, ctx: Ctx) -> None:
    hcm(b)["generate_request_id"] = False


def one_route(b: Json, ctx: Ctx) -> None:
    """One prefix route instead of one per endpoint (method and path matchers, headers removed)."""
    vh = hcm(b)["route_config"]["virtual_hosts"][0]
    route = next(r for r in api_routes(b) if r.get("name") == "messages.create")
    vh["routes"] = [{"match": {"prefix": "/"}, "route": route["route"],
                     **({"request_headers_to_add": route["request_headers_to_add"]}
                        if "request_headers_to_add" in route else {})}]


def gzip_best_speed(b: Json, ctx: Ctx) -> None:
    lib = filter_config(b, COMPRESSOR)["compressor_library"]["typed_config"]
    lib["compression_level"] = "BEST_SPEED"


def als_big_buffer(b: Json, ctx: Ctx) -> None:
    common = hcm(b)["access_log"][0]["typed_config"]["common_config"]
    common["buffer_size_bytes"] = 64 * 1024


def als_no_trace_headers(b: Json, ctx: Ctx) -> None:
    """Information only: the access log without the traceparent/tracestate the accesslog span needs."""
    cfg = hcm(b)["access_log"][0]["typed_config"]
    cfg["additional_request_headers_to_log"] = [h for h in cfg["additional_request_headers_to_log"]
                                                if h not in ("traceparent", "tracestate")]


def flush_per_100_spans(b: Json, ctx: Ctx) -> None:
    """Envoy's OpenTelemetry tracer exports every 100 spans (or 5 s) instead of every 5 (its default:
    about once per sampled request)."""
    b["layered_runtime"] = {"layers": [{"name": "static", "static_layer": {
        "tracing.opentelemetry.min_flush_spans": 100}}, {"name": "admin", "admin_layer": {}}]}


def short_path_tag(b: Json, ctx: Ctx) -> None:
    hcm(b)["tracing"]["max_path_tag_length"] = 16


def services_over_uds(b: Json, ctx: Ctx) -> None:
    """Envoy reaches the four gRPC services over Unix sockets (a relay forwards to their TCP ports)."""
    for c in b["static_resources"]["clusters"]:
        if c["name"] in ctx.uds:
            ep = c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            ep["address"] = {"pipe": {"path": ctx.uds[c["name"]]}}


def get_checked_twice(b: Json, ctx: Ctx) -> None:
    """As before router/downstream.py `authz_per_route`: a GET's body buffered for the full check,
    and the identity-first check before it (a GET has no Content-Length)."""
    for r in hcm(b)["route_config"]["virtual_hosts"][0]["routes"]:
        if r.get("match", {}).get("headers", [{}])[0].get("string_match", {}).get("exact") in ("GET", "DELETE"):
            tpfc = r.get("typed_per_filter_config", {})
            tpfc.pop(EXT_AUTHZ, None)
            tpfc.pop(IDENTITY_FIRST, None)


def _authz_stub(answer: str) -> Callable[[Json, Ctx], None]:
    def edit(b: Json, ctx: Ctx) -> None:
        for c in b["static_resources"]["clusters"]:
            if c["name"] == resources.EXTAUTH:
                ep = c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
                ep["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": ctx.stubs[answer]}}
    return edit


def no_stats(b: Json, ctx: Ctx) -> None:
    """Information only (operators and tests read Envoy's stats): what keeping them costs."""
    b["stats_config"] = {"stats_matcher": {"reject_all": True}}


def tls_listener(b: Json, ctx: Ctx) -> None:
    assert ctx.tls is not None
    cert, key = ctx.tls
    for chain in b["static_resources"]["listeners"][0]["filter_chains"]:
        chain["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificates": [{"certificate_chain": {"filename": cert}, "private_key": {"filename": key}}]}}}


def _edits(*fs: Callable[[Json, Ctx], None]) -> Callable[[Json, Ctx], None]:
    def apply(b: Json, ctx: Ctx) -> None:
        for f in fs:
            f(b, ctx)
    return apply


@dataclass
class Step:
    name: str
    edit: Callable[[Json, Ctx], None] | None  # None: bench/gateway.py's bare Envoy
    base: str | None = None  # the step this one is compared with (default: the previous ladder step)
    gzip: bool = False  # the client asks for gzip
    concurrency: int = 1  # Envoy worker threads
    tls: bool = False
    cumulative: bool = True  # part of the ladder (its edit includes every edit above it)
    path: str = "/v1/messages"  # anything else is sent as a GET
    real: bool = False  # the gateway's own Envoy, configured over xDS by the router (not a static copy)
    small_body: bool = False  # a 1-message request of about 200 bytes instead of the 84 KB one
    sample_ratio: float | None = None  # tracing on (telemetry.otlp_endpoint, a local span sink) at this ratio


def steps() -> list[Step]:
    ladder = [
        ("full", []),
        ("-access log (ALS)", [no_access_log]),
        ("-compressor", [no_compressor]),
        ("-ratelimit", [no_ratelimit]),
        ("-overload manager", [no_overload_manager]),
        ("-usage meter (Lua)", [no_meter]),
        ("-upstream hygiene, credential", [no_upstream_extras]),
        ("-identity-first authz", [no_identity_first]),
        ("-ext_authz", [no_ext_authz]),
        ("-HCM extras", [no_hcm_extras]),
        ("-request id", [no_request_id]),
        ("-endpoint routes", [one_route]),
    ]
    out: list[Step] = []
    done: list[Callable[[Json, Ctx], None]] = []
    for name, fs in ladder:
        done = done + fs
        out.append(Step(name, _edits(*done)))
    out.append(Step("bare (bench/gateway.py)", None))
    above_authz = [no_access_log, no_compressor, no_ratelimit, no_overload_manager, no_meter, no_upstream_extras,
                   no_identity_first]
    side = [
        Step("ext_authz stub, extauth's answer", _edits(*above_authz, _authz_stub("full")),
             base="-identity-first authz"),
        Step("ext_authz stub, cluster header only", _edits(*above_authz, _authz_stub("min")),
             base="ext_authz stub, extauth's answer"),
        Step("-identity-first authz, small body", _edits(*above_authz), small_body=True),
        Step("-ext_authz, small body", _edits(*above_authz, no_ext_authz), base="-identity-first authz, small body",
             small_body=True),
        Step("gateway's own Envoy (xDS)", _edits(), base="full", real=True),
        Step("full, client asks gzip", _edits(), base="full", gzip=True),
        Step("full, client asks gzip, BEST_SPEED", _edits(gzip_best_speed), base="full, client asks gzip",
             gzip=True),
        Step("full, ALS buffer 64 KB", _edits(als_big_buffer), base="full"),
        Step("full, ext_authz allowed_headers", _edits(ext_authz_allowed_headers), base="full"),
        Step("full, ext_authz without body (denied)", _edits(ext_authz_headers_only), base="full"),
        Step("full, ext_authz body as string", _edits(ext_authz_as_string), base="full"),
        Step("full, adapter ext_proc meters (before)", _edits(adapter_meters), base="full"),
        Step("full, adapter ext_proc observability", _edits(adapter_observes), base="full"),
        Step("full, no stats (reject_all)", _edits(no_stats), base="full"),
        Step("full, services over unix sockets", _edits(services_over_uds), base="full"),
        Step("full, TLS listener", _edits(tls_listener), base="full", tls=True),
        Step("full, --concurrency 2", _edits(), base="full", concurrency=2),
        Step("full, GET /v1/models, two checks", _edits(get_checked_twice), base="full", path="/v1/models"),
        Step("full, GET /v1/models", _edits(), base="full, GET /v1/models, two checks", path="/v1/models"),
        # Issue 11: what tracing costs Envoy; at 0% every request pays only the unsampled path.
        Step("full, tracing 0%", _edits(), base="full", sample_ratio=0.0),
        Step("full, tracing 5%", _edits(), base="full", sample_ratio=0.05),
        Step("full, tracing 100%", _edits(), base="full", sample_ratio=1.0),
        Step("full, tracing 0%, ALS without trace headers", _edits(als_no_trace_headers), base="full, tracing 0%",
             sample_ratio=0.0),
        Step("full, tracing 0%, path tag 16", _edits(short_path_tag), base="full, tracing 0%", sample_ratio=0.0),
        Step("full, tracing 5%, flush per 100 spans", _edits(flush_per_100_spans), base="full, tracing 5%",
             sample_ratio=0.05),
    ]
    for s in side:
        s.cumulative = False
    return out + side


# -- one Envoy per step


@contextmanager
def envoy(bootstrap: Json, tmp: Path, name: str, concurrency: int) -> Iterator[tuple[int, str, Child]]:
    d = Path(tempfile.mkdtemp(prefix=name + "-", dir=tmp))  # a fresh dir: no stale admin address
    config = d / "bootstrap.json"
    config.write_text(json.dumps(bootstrap))
    admin_path = d / "admin"
    child = spawn("envoy-" + name, [envoy_binary(), "-c", str(config), "--disable-hot-restart",
                                    "--concurrency", str(concurrency), "--admin-address-path", str(admin_path),
                                    "-l", "warning", "--drain-time-s", "1", "--parent-shutdown-time-s", "2"], d)
    try:
        wait_until(child, lambda: admin_path.exists() and admin_path.read_text().strip() != "", 30, "serving admin")
        admin_url = "http://" + admin_path.read_text().strip()
        wait_until(child, lambda: _bound_port(admin_url) is not None, 30, "listening")
        yield int(_bound_port(admin_url) or 0), admin_url, child
    finally:
        child.stop()


# -- load


@dataclass
class Sample:
    ok: int = 0
    errors: int = 0
    first_error: str | None = None
    envoy_s: float = 0.0
    wall: float = 0.0
    lat: list[float] = field(default_factory=list)
    user_s: float = 0.0
    sys_s: float = 0.0
    cluster_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def us_per_request(self) -> float:
        # Over every request sent: the "denied" side step's replies are errors by design.
        n = self.ok + self.errors
        return self.envoy_s * 1e6 / n if n else float("nan")


def complete(status: int, data: bytes, gz: bool, get: bool = False) -> bool:
    if status != 200:
        return False
    if gz:
        data = gzip.decompress(data)
    return b'"data"' in data if get else b"event: message_stop" in data[-256:]


async def load(url: str, key: str, body: bytes, pid: int, admin_url: str, args: argparse.Namespace, gz: bool,
               ctx: ssl.SSLContext | None, get: bool = False) -> Sample:
    headers = {"x-api-key": key, "anthropic-version": API_VERSION, "content-type": "application/json",
               "accept-encoding": "gzip" if gz else "identity"}
    s = Sample()
    conc = args.concurrency or 64
    connector = aiohttp.TCPConnector(limit=conc, keepalive_timeout=60, ssl=ctx if ctx is not None else False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60),
                                     auto_decompress=False) as session:
        async def one(counted: bool) -> None:
            t = time.perf_counter()
            try:
                async with (session.get(url, headers=headers) if get else
                            session.post(url, data=body, headers=headers)) as r:
                    data = await r.read()
                    status = r.status
            except (TimeoutError, aiohttp.ClientError) as e:
                status, data = 0, f"{type(e).__name__}: {e}".encode()
            if not counted:
                return
            if complete(status, data, gz, get):
                s.ok += 1
                s.lat.append(time.perf_counter() - t)
            else:
                s.errors += 1
                s.first_error = s.first_error or f"HTTP {status}: {data[:300]!r}"

        for _ in range(3):  # warm-up: connections, caches
            await asyncio.gather(*(one(False) for _ in range(8)))
        bytes0 = cluster_bytes(admin_url)
        us0 = envoy_user_sys_s(pid)
        cpu0, t0 = envoy_cpu_s(pid), time.perf_counter()
        if args.concurrency:
            deadline = t0 + args.duration

            async def worker() -> None:
                while time.perf_counter() < deadline:
                    await one(True)
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        else:
            n = int(args.rate * args.duration)
            tasks = []
            for i in range(n):
                delay = t0 + i / args.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(True)))
            await asyncio.gather(*tasks)
        s.wall = time.perf_counter() - t0
        s.envoy_s = envoy_cpu_s(pid) - cpu0
        us1 = envoy_user_sys_s(pid)
        s.user_s, s.sys_s = us1[0] - us0[0], us1[1] - us0[1]
        s.cluster_bytes = {k: v - bytes0.get(k, 0) for k, v in cluster_bytes(admin_url).items()}
    return s


def bootstrap_for(step: Step, full: Json, ctx: Ctx) -> Json:
    if step.edit is None:
        return bare_envoy_config(ctx.emulator_url)
    b = copy.deepcopy(full if step.sample_ratio is None else ctx.traced[step.sample_ratio])
    step.edit(b, ctx)
    return b


def measure(group: list[Step], full: Json, ctx: Ctx, key: str, body: bytes, tmp: Path,
            args: argparse.Namespace, run: int, client_ssl: ssl.SSLContext) -> list[Sample]:
    """The steps of `group` side by side: one Envoy each, all loaded at once, so the machine's other
    work disturbs them alike (the paired mode compares two such)."""
    with ExitStack() as stack:
        loads = []
        for st in group:
            if st.real:
                assert ctx.real is not None
                url, pid, admin_url = ctx.real
                loads.append((url + st.path, key, pid, admin_url, st))
                continue
            name = f"{run}-{''.join(c if c.isalnum() else '_' for c in st.name)}-{len(loads)}"
            port, admin_url, child = stack.enter_context(envoy(bootstrap_for(st, full, ctx), tmp, name,
                                                               st.concurrency))
            url = f"{'https' if st.tls else 'http'}://127.0.0.1:{port}{st.path}"
            loads.append((url, ctx.emulator_key if st.edit is None else key, child.pid, admin_url, st))

        async def all_at_once() -> list[Sample]:
            return list(await asyncio.gather(*(
                load(url, k, SMALL_BODY if st.small_body else body, pid, admin, args, st.gzip,
                     client_ssl if st.tls else None, st.path != MESSAGES)
                for url, k, pid, admin, st in loads)))
        return asyncio.run(all_at_once())


SERVICES = (resources.EXTAUTH, resources.RATELIMIT, resources.ADAPTER, resources.ACCESSLOG)


def cluster_bytes(admin_url: str) -> dict[str, int]:
    """Bytes Envoy sent to and received from each gRPC service so far."""
    import urllib.request

    with urllib.request.urlopen(admin_url + "/stats?format=json&filter=^cluster\\.ccr_.*upstream_cx_[rt]x_bytes_total$",
                                timeout=5) as r:
        doc = json.loads(r.read())
    return {st["name"]: int(st.get("value", 0)) for st in doc.get("stats", []) if "name" in st}


def print_table(chosen: list[Step], results: dict[str, list[Sample]], paired: dict[str, list[float]]) -> None:
    any_paired = any(paired.values())
    print(f"\n{'step':<38}{'envoy us/req, each run':>24}{'min':>7}{'delta':>7}{'ok':>7}{'err':>6}{'req/s':>7}"
          f"{'sys':>5}{'p50 ms':>7}" + ("   paired delta, each run (median)" if any_paired else ""))
    means: dict[str, float] = {}
    prev: str | None = None
    for st in chosen:
        samples = results[st.name]
        vals = [x.us_per_request for x in samples]
        best = min(vals)  # the run least disturbed by the machine's other work
        means[st.name] = best
        base = st.base if st.base is not None else prev
        delta = f"{best - means[base]:+7.0f}" if base in means else " " * 7
        runs = " ".join(f"{v:5.0f}" for v in vals)
        ok = sum(x.ok for x in samples)
        err = sum(x.errors for x in samples)
        rps = statistics.fmean(x.ok / x.wall for x in samples if x.wall)
        pd = paired.get(st.name) or []
        pcol = f"   {' '.join(f'{v:+5.0f}' for v in pd)} ({statistics.median(pd):+.0f})" if pd else ""
        u, k = sum(x.user_s for x in samples), sum(x.sys_s for x in samples)
        sys_share = f"{k / (u + k):5.0%}" if u + k else "    -"
        lat = sorted(v for x in samples for v in x.lat)
        p50 = f"{statistics.median(lat) * 1000:7.1f}" if lat else "      -"
        print(f"{st.name:<38}{runs:>24}{best:7.0f}{delta}{ok:>7}{err:>6}{rps:>7.0f}{sys_share}{p50}{pcol}")
        if st.cumulative:
            prev = st.name
    print("(min over the runs; delta of mins: ladder steps vs the step above, side steps vs `full`. "
          "Envoy CPU only, from schedstat.)")
    if any_paired:
        print("(paired delta: the step and the one it is compared with ran side by side, loaded at once, "
              "in each run: the machine's other work disturbs both alike)")
    full = results.get("full")
    if full:
        x = full[-1]
        n = x.ok + x.errors
        print("\nfull: bytes per request between Envoy and each service (tx = Envoy sent):")
        for k, v in sorted(x.cluster_bytes.items()):
            if v:
                print(f"  {k.removeprefix('cluster.'):<48}{v / n:10.0f}")
    for st in chosen:
        for x in results[st.name]:
            if x.first_error:
                print(f"first error, {st.name}: {x.first_error}")
                break


def uds_relay(gw: Gateway, tmp: Path, ctx: Ctx) -> Child:
    """bench/_uds_relay.py in front of the four services; fills ctx.uds."""
    rt = gw.runtime
    assert rt is not None
    addresses = {resources.EXTAUTH: rt.extauth, resources.RATELIMIT: rt.ratelimit, resources.ADAPTER: rt.adapter,
                 resources.ACCESSLOG: rt.accesslog}
    d = Path(tempfile.mkdtemp(prefix="uds-", dir=tmp))
    ctx.uds = {name: str(d / f"{name}.sock") for name in addresses}
    child = spawn("uds-relay", [sys.executable, str(REPO / "bench" / "_uds_relay.py"),
                                *(f"{ctx.uds[n]}={a}" for n, a in addresses.items())], d)
    wait_until(child, lambda: all(Path(p).exists() for p in ctx.uds.values()), 30, "relaying")
    return child


def authz_stubs(gw: Gateway, tmp: Path, ctx: Ctx, key: str, body: bytes) -> list[Child]:
    """bench/_authz_stub.py twice: answering what extauth answers for the agent request, and only
    the x-ccr-cluster header of that answer (no other header, no metadata); fills ctx.stubs."""
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.auth.v3 import external_auth_pb2 as pb
    from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc

    from bench._common import check_request
    from ccr.contract import H_CLUSTER

    assert gw.runtime is not None and gw.runtime.extauth
    with grpc.insecure_channel(gw.runtime.extauth) as ch:
        full = pb_grpc.AuthorizationStub(ch).Check(check_request(body, {"x-api-key": key}), timeout=10)
    assert full.status.code == 0, full
    cluster = next(h for h in full.ok_response.headers if h.header.key == H_CLUSTER)
    minimal = pb.CheckResponse(status=full.status, ok_response=pb.OkHttpResponse(headers=[base_pb2.HeaderValueOption(
        header=cluster.header, append_action=cluster.append_action)]))
    children = []
    for name, answer in (("full", full), ("min", minimal)):
        d = Path(tempfile.mkdtemp(prefix=f"stub-{name}-", dir=tmp))
        (d / "answer.bin").write_bytes(answer.SerializeToString())
        child = spawn(f"authz-stub-{name}", [sys.executable, str(REPO / "bench" / "_authz_stub.py"),
                                             str(d / "answer.bin"), str(d / "port")], d)
        children.append(child)
        wait_until(child, lambda d=d: (d / "port").exists() and (d / "port").read_text() != "", 30, "serving")
        ctx.stubs[name] = int((d / "port").read_text())
    return children


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=2.0, help="seconds measured per step and run")
    ap.add_argument("--rate", type=float, default=100.0, help="paced requests per second (the default mode)")
    ap.add_argument("--concurrency", type=int, default=0, help="closed loop with this many workers instead")
    ap.add_argument("--runs", type=int, default=3, help="runs per step, interleaved, to show the noise")
    ap.add_argument("--paired", action="store_true",
                    help="run each step side by side with the step it is compared with (less noise, twice the load)")
    ap.add_argument("--only", default="",
                    help="comma-separated substrings (or =exact names): run only the steps they name")
    ap.add_argument("--list", action="store_true", help="print the steps and exit")
    args = ap.parse_args()
    all_steps = steps()
    if args.list:
        print("\n".join(s.name for s in all_steps))
        return
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    chosen = [s for s in all_steps if not wanted or any(s.name == w[1:] if w.startswith("=") else w in s.name
                                                        for w in wanted)]
    body = fixture_path(AGENT_REQUEST).read_bytes()
    with tempfile.TemporaryDirectory(prefix="ccr-bench-features-") as d:
        tmp = Path(d)
        from tests import pki

        ca = pki.make_ca(tmp / "pki", "bench-ca")
        server = pki.issue(ca, tmp / "pki", "gateway", dns=("localhost",), ips=("127.0.0.1",), server=True)
        client_ssl = ssl.create_default_context(cafile=str(ca.cert_file))
        print("starting the gateway ...", file=sys.stderr)
        gw = Gateway(gateway_config(tmp, spiffe_mode="off"))  # a static bootstrap has no SDS from SPIRE
        cleanup: list[Callable[[], None]] = []
        try:
            gw.start()
            assert gw.runtime is not None and gw.emulator_url and gw.emulator_key
            from extauth.keys import create_key

            _, key = create_key(gw.runtime.postgres_dsn, "bench", ["default"], rpm=10_000_000)
            config = load_config(gw.config_path)
            ctx = Ctx(gw.emulator_key, config.provider(config.models[0].provider).cluster, gw.emulator_url,
                      (str(server.cert_file), str(server.key_file)))
            ctx.real = (gw.url, next(c.pid for c in gw.children if c.name == "envoy"), gw.admin_url)
            if any("stub" in s.name for s in chosen):
                cleanup += [c.stop for c in authz_stubs(gw, tmp, ctx, key, body)]
            if any(s.edit is not None and "unix" in s.name for s in chosen):
                relay = uds_relay(gw, tmp, ctx)
                cleanup.append(relay.stop)
            full = full_bootstrap(gw)
            ratios = {s.sample_ratio for s in chosen if s.sample_ratio is not None}
            if ratios:
                from bench.gateway import otlp_sink

                sink = ExitStack()
                cleanup.append(sink.close)
                address = sink.enter_context(otlp_sink(tmp))
                ctx.traced = {r: full_bootstrap(gw, (address, r)) for r in ratios}
            mode = f"closed loop c={args.concurrency}" if args.concurrency else f"paced {args.rate:g} req/s"
            print(f"{AGENT_REQUEST} ({len(body)} bytes, streamed), {mode}, {args.duration:g}s per step, "
                  f"{args.runs} runs; Envoy --concurrency 1 unless the step says otherwise")
            results: dict[str, list[Sample]] = {s.name: [] for s in chosen}
            paired: dict[str, list[float]] = {s.name: [] for s in chosen}
            by_name = {s.name: s for s in all_steps}
            for run in range(args.runs):
                prev: Step | None = None
                for st in chosen:
                    base = by_name[st.base] if st.base else prev
                    if st.cumulative:
                        prev = st
                    if args.paired and base is not None:
                        b, x = measure([base, st], full, ctx, key, body, tmp, args, run, client_ssl)
                        paired[st.name].append(x.us_per_request - b.us_per_request)
                    else:
                        (x,) = measure([st], full, ctx, key, body, tmp, args, run, client_ssl)
                    results[st.name].append(x)
                    print(f"  run {run + 1} {st.name:<34} {x.us_per_request:7.0f} us/req  ok={x.ok} "
                          f"err={x.errors}", file=sys.stderr)
            print_table(chosen, results, paired)
        finally:
            for stop in cleanup:
                stop()
            gw.stop()


if __name__ == "__main__":
    main()
