"""`ccr limits list | set | remove | default`: the limits in force, changed without hand-editing YAML.

Limits live in the gateway config (`limits`, docs/ratelimit.md). A change here edits the running
gateway's config file (comments and layout kept: ruamel.yaml round trip) and goes through
`ccr config apply`'s path: validated as the router will, written atomically, distributed live as a
new config version, and recorded by the router in the admin chain (`config.apply`, with the actor
and the `limits` section before and after). Nothing is written when the result is refused.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from ccr.config import ConfigError, LimitRule, load_config
from ccr.config_sync import CONFIG_DIR, Version, digest_of, load_version, parse_text

RULE_FIELDS = ("per", "value", "metric", "unit", "amount", "algorithm", "burst", "on_redis_down", "shadow_mode")


def _in_force(config_path: str) -> tuple[Any, str]:
    """The limits the running gateway serves (its current version), else the file's."""
    from ccr.config_cli import _run

    try:
        runtime, status = _run(config_path)
    except ConfigError:
        return load_config(config_path).limits, f"{config_path} (no running gateway)"
    v = Version(int(status["seq"]), str(status["digest"]))
    return load_version(runtime.run_dir, v).limits, f"the running gateway, config v{v.seq} ({v.digest[:12]})"


def cmd_list(args: argparse.Namespace) -> int:
    limits, where = _in_force(args.config)
    if args.json:
        print(json.dumps(limits.model_dump(mode="json"), indent=1))
        return 0
    print(f"limits in force ({where}):")
    print(f"  default: {limits.requests_per_minute} requests per minute per principal (a key's own --rpm wins); "
          f"while Redis is down: {limits.on_redis_down}")
    if limits.envoy_config_dir:
        print(f"  envoyproxy/ratelimit files: {limits.envoy_config_dir}")
    if not limits.rules:
        print("  no rules (limits.rules)")
        return 0
    print(f"  {'name':<24} {'per':<10} {'value':<18} {'limit':<24} {'algorithm':<15} notes")
    for r in limits.rules:
        notes = [n for n in (f"burst {r.burst}" if r.burst else "", "shadow" if r.shadow_mode else "",
                             f"redis down: {r.on_redis_down}" if r.on_redis_down else "") if n]
        print(f"  {r.name:<24} {r.per.value:<10} {r.value or '*':<18} {f'{r.amount} {r.metric}/{r.unit}':<24} "
              f"{r.algorithm:<15} {', '.join(notes)}")
    return 0


def edit_limits(text: str, change: Callable[[Any], str]) -> tuple[str, str]:
    """The config text with `change` applied to its `limits` mapping (everything else as it was:
    comments, order, quoting), and what `change` says it did."""
    yaml = YAML()
    yaml.preserve_quotes = True
    doc = yaml.load(text)
    if doc.get("limits") is None:
        doc["limits"] = {}
    what = change(doc["limits"])
    out = io.StringIO()
    yaml.dump(doc, out)
    return out.getvalue(), what


def _edit(args: argparse.Namespace, change: Callable[[Any], str]) -> int:
    """Apply `change` (to the file's `limits` mapping; returns what it did) through `ccr config apply`."""
    from ccr.config_cli import _run, apply

    runtime, status = _run(args.config)
    path = Path(runtime.config_path)
    text = path.read_text()
    serving = str(status["digest"])
    try:
        on_file = digest_of(parse_text(text, str(path)))
    except ConfigError:
        on_file = None
    if on_file != serving:
        raise ConfigError(f"{path} holds edits the gateway does not serve (it serves v{status['seq']}); apply or "
                          "revert them first (`ccr config status`), then change limits")
    edited, what = edit_limits(text, change)
    tmp = Path(runtime.run_dir) / CONFIG_DIR / f".limits-edit.{os.getpid()}.yaml"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(edited)
    try:
        print(what)
        return apply(args.config, str(tmp), args.wait, args.actor)
    finally:
        tmp.unlink(missing_ok=True)


def _rule_fields(args: argparse.Namespace) -> dict[str, Any]:
    got = {f: getattr(args, f) for f in RULE_FIELDS if getattr(args, f, None) is not None}
    if "per" in got:
        got["per"] = str(got["per"])
    return got


def cmd_set(args: argparse.Namespace) -> int:
    fields = _rule_fields(args)

    def change(limits: Any) -> str:
        rules = limits.get("rules")
        if rules is None:
            limits["rules"] = rules = []
        for rule in rules:
            if rule.get("name") == args.name:
                before = dict(rule)
                for k, v in fields.items():
                    rule[k] = v
                for k in args.unset or []:
                    rule.pop(k, None)
                LimitRule.model_validate(dict(rule))  # a clear error before anything is written
                return f"limit {args.name}: {_show(before)} -> {_show(dict(rule))}"
        missing = [f for f in ("per", "amount") if f not in fields]
        if missing:
            need = " and ".join("--" + m for m in missing)
            raise ConfigError(f"no limit named {args.name!r}: a new one needs {need}")
        new = {"name": args.name, **fields}
        LimitRule.model_validate(new)
        rules.append(new)
        return f"limit {args.name}: new, {_show(new)}"

    try:
        return _edit(args, change)
    except ValueError as e:  # the rule's own validation
        raise ConfigError(f"ccr limits set: {e}") from None


def cmd_remove(args: argparse.Namespace) -> int:
    def change(limits: Any) -> str:
        rules = limits.get("rules") or []
        for i, rule in enumerate(rules):
            if rule.get("name") == args.name:
                del rules[i]
                return f"limit {args.name}: removed ({_show(dict(rule))})"
        raise ConfigError(f"no limit named {args.name!r} (ccr limits list)")

    return _edit(args, change)


def cmd_default(args: argparse.Namespace) -> int:
    if args.requests_per_minute is None and args.on_redis_down is None:
        raise ConfigError("ccr limits default: give --requests-per-minute and/or --on-redis-down")

    def change(limits: Any) -> str:
        before = {k: limits.get(k) for k in ("requests_per_minute", "on_redis_down")}
        if args.requests_per_minute is not None:
            limits["requests_per_minute"] = args.requests_per_minute
        if args.on_redis_down is not None:
            limits["on_redis_down"] = args.on_redis_down
        after = {k: limits.get(k) for k in ("requests_per_minute", "on_redis_down")}
        return f"default limits: {_show(before)} -> {_show(after)}"

    return _edit(args, change)


def _show(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items() if v is not None and k != "name") or "(defaults)"


def cmd_limits(args: argparse.Namespace) -> int:
    if args.limits_cmd == "list":
        return cmd_list(args)
    if args.limits_cmd == "set":
        return cmd_set(args)
    if args.limits_cmd == "remove":
        return cmd_remove(args)
    return cmd_default(args)


def add_parsers(sub: argparse._SubParsersAction, actor: Callable[[], str]) -> None:
    lim = sub.add_parser("limits", help="rate limits in force (limits.rules): list, set, remove; applied live "
                                        "and recorded in the admin log")
    lim.set_defaults(func=lambda a: cmd_limits(_with_actor(a, actor)))
    ls = lim.add_subparsers(dest="limits_cmd", required=True)
    lst = ls.add_parser("list", help="the limits the running gateway serves")
    lst.add_argument("--json", action="store_true")
    st = ls.add_parser("set", help="create a limit rule, or change the given fields of one")
    st.add_argument("name")
    st.add_argument("--per", choices=("principal", "key", "user", "group", "tenant", "spiffe_id", "model"))
    st.add_argument("--value", help="only this value of --per (e.g. a group name); default: each value")
    st.add_argument("--metric", choices=("requests", "tokens"))
    st.add_argument("--unit", choices=("minute", "hour", "day"))
    st.add_argument("--amount", type=int)
    st.add_argument("--algorithm", choices=("sliding_window", "token_bucket"))
    st.add_argument("--burst", type=int)
    st.add_argument("--on-redis-down", choices=("closed", "open"))
    st.add_argument("--shadow", dest="shadow_mode", action="store_const", const=True, help="count, never refuse")
    st.add_argument("--enforce", dest="shadow_mode", action="store_const", const=False, help="undo --shadow")
    st.add_argument("--unset", action="append", choices=("value", "burst", "on_redis_down"),
                    help="drop a field of an existing rule (repeatable)")
    rm = ls.add_parser("remove", help="remove a limit rule")
    rm.add_argument("name")
    de = ls.add_parser("default", help="the default per-principal limit and the Redis-down behaviour")
    de.add_argument("--requests-per-minute", type=int)
    de.add_argument("--on-redis-down", choices=("closed", "open"))
    for p in (st, rm, de):
        p.add_argument("--actor", help="who is making the change, for the admin log (default: cli:USER@HOST)")
        p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for every process (default 60)")


def _with_actor(args: argparse.Namespace, actor: Callable[[], str]) -> argparse.Namespace:
    if hasattr(args, "wait") and not getattr(args, "actor", None):
        args.actor = actor()
    return args

