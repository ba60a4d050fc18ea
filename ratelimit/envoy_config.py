"""envoyproxy/ratelimit's YAML config files, loaded unchanged, and its descriptor matching.

A file holds one domain and a tree of descriptors:

    domain: edge
    descriptors:
      - key: remote_address
        rate_limit: {unit: second, requests_per_unit: 10}
      - key: path
        value: /login*                 # wildcard: a value prefix
        shadow_mode: true
        descriptors:
          - key: user
            rate_limit: {name: per-user, unit: minute, requests_per_unit: 5, replaces: [{name: base}]}

Matching, per request descriptor, entry by entry down the tree: the exact `key`/`value` first,
then a wildcard value (`foo*`) whose prefix matches, then the key alone (any value); the limit
is the one of the node the last entry reached. Unknown keys, duplicate descriptors and
duplicate domains are errors naming the file and the path in it. A directory of such files
(RUNTIME_ROOT/<subdir>/config/*.yaml) is one config, reloaded when a file changes; a bad
edit is logged and the last good config stays in force.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

log = logging.getLogger("ccr.ratelimit")

# Units as envoyproxy/ratelimit spells them (case-insensitive there too), in seconds.
UNITS: dict[str, int] = {"second": 1, "minute": 60, "hour": 3600, "day": 86400,
                         "week": 7 * 86400, "month": 30 * 86400, "year": 365 * 86400}

_ROOT_KEYS = {"domain", "descriptors"}
_DESCRIPTOR_KEYS = {"key", "value", "rate_limit", "descriptors", "shadow_mode", "detailed_metric", "value_to_metric"}
_LIMIT_KEYS = {"requests_per_unit", "unit", "unlimited", "name", "replaces"}


class RuleConfigError(Exception):
    """A config file that cannot be used: file, path inside it, reason."""


@dataclass(frozen=True, slots=True)
class YamlLimit:
    unit: str  # "" when unlimited
    requests_per_unit: int
    unlimited: bool = False
    shadow_mode: bool = False
    name: str = ""
    replaces: tuple[str, ...] = ()
    detailed_metric: bool = False
    where: str = ""  # file:path, for messages and logs

    @property
    def period_s(self) -> int:
        return UNITS[self.unit]


@dataclass(slots=True)
class _Node:
    limit: YamlLimit | None = None
    children: dict[str, _Node] = field(default_factory=dict)  # "key_value" or "key"
    wildcards: list[tuple[str, str]] = field(default_factory=list)  # (prefix "key_foo", child key "key_foo*")


class RuleSet:
    """Every domain's descriptor tree."""

    def __init__(self, domains: dict[str, _Node] | None = None, files: tuple[str, ...] = ()) -> None:
        self.domains = domains or {}
        self.files = files

    def match(self, domain: str, entries: Iterable[tuple[str, str]]) -> YamlLimit | None:
        node = self.domains.get(domain)
        if node is None:
            return None
        entries = list(entries)
        last = len(entries) - 1
        for i, (k, v) in enumerate(entries):
            exact = f"{k}_{v}"
            nxt = node.children.get(exact)
            if nxt is None:
                for prefix, child in node.wildcards:
                    if exact.startswith(prefix):
                        nxt = node.children[child]
                        break
            if nxt is None:
                nxt = node.children.get(k)
            if nxt is None:
                return None
            if i == last:
                return nxt.limit
            if not nxt.children:
                return None
            node = nxt
        return None


def _fail(where: str, msg: str) -> RuleConfigError:
    return RuleConfigError(f"{where}: {msg}")


def _check_keys(obj: object, allowed: set[str], where: str) -> dict:
    if not isinstance(obj, dict):
        raise _fail(where, f"expected a mapping, got {type(obj).__name__}")
    unknown = sorted(str(k) for k in obj if k not in allowed)
    if unknown:
        raise _fail(where, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    return obj


def _bool(d: dict, k: str, where: str) -> bool:
    v = d.get(k, False)
    if not isinstance(v, bool):
        raise _fail(f"{where}.{k}", f"expected true or false, got {v!r}")
    return v


def _limit(raw: object, where: str, shadow: bool, detailed: bool) -> YamlLimit:
    d = _check_keys(raw, _LIMIT_KEYS, where)
    unlimited = _bool(d, "unlimited", where)
    unit = str(d.get("unit", "")).lower()
    rpu = d.get("requests_per_unit", 0)
    if not isinstance(rpu, int) or isinstance(rpu, bool) or rpu < 0 or rpu > 2**32 - 1:
        raise _fail(f"{where}.requests_per_unit", f"expected an integer 0..4294967295, got {rpu!r}")
    if unlimited:
        if unit:
            raise _fail(where, "an unlimited rate_limit must not name a unit")
    elif unit not in UNITS:
        raise _fail(f"{where}.unit", f"invalid unit {d.get('unit')!r}; one of {list(UNITS)}")
    name = d.get("name", "")
    if not isinstance(name, str):
        raise _fail(f"{where}.name", "expected a string")
    replaces_raw = d.get("replaces", []) or []
    if not isinstance(replaces_raw, list):
        raise _fail(f"{where}.replaces", "expected a list of {name: ...}")
    replaces = []
    for i, r in enumerate(replaces_raw):
        rd = _check_keys(r, {"name"}, f"{where}.replaces[{i}]")
        if not isinstance(rd.get("name"), str) or not rd["name"]:
            raise _fail(f"{where}.replaces[{i}].name", "a replaced limit must be named")
        replaces.append(rd["name"])
    return YamlLimit(unit, rpu, unlimited, shadow, name, tuple(replaces), detailed, where)


def _descriptors(raw: object, where: str, into: _Node, file: str) -> None:
    if raw is None:
        return
    if not isinstance(raw, list):
        raise _fail(where, "expected a list of descriptors")
    for i, item in enumerate(raw):
        here = f"{where}[{i}]"
        d = _check_keys(item, _DESCRIPTOR_KEYS, here)
        key = d.get("key")
        if not isinstance(key, str) or not key:
            raise _fail(here, "descriptor has an empty or missing key")
        value = d.get("value", "")
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise _fail(f"{here}.value", f"expected a string, got {value!r}")
        value = str(value)
        composite = f"{key}_{value}" if value else key
        if composite in into.children:
            raise _fail(here, f"duplicate descriptor {key}={value or '(any)'} at this level")
        shadow = _bool(d, "shadow_mode", here)
        detailed = _bool(d, "detailed_metric", here)
        _bool(d, "value_to_metric", here)
        node = _Node()
        if d.get("rate_limit") is not None:
            node.limit = _limit(d["rate_limit"], f"{file}: {here}.rate_limit", shadow, detailed)
        _descriptors(d.get("descriptors"), f"{here}.descriptors", node, file)
        into.children[composite] = node
        if value.endswith("*"):
            into.wildcards.append((composite[:-1], composite))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently;
    the Go service's YAML parser refuses it): a config must not mean something its reader did not see."""


def _no_duplicate_keys(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"key {key!r} appears twice in one mapping", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def parse_file(text: str, file: str, domains: dict[str, _Node]) -> None:
    try:
        doc = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise RuleConfigError(f"{file}: not valid YAML: {e}") from None
    root = _check_keys(doc, _ROOT_KEYS, f"{file}: (top level)")
    domain = root.get("domain")
    if not isinstance(domain, str) or not domain:
        raise RuleConfigError(f"{file}: domain: a config file must name a non-empty domain")
    if domain in domains:
        raise RuleConfigError(f"{file}: domain: duplicate domain {domain!r} (already in another file)")
    node = _Node()
    try:
        _descriptors(root.get("descriptors"), "descriptors", node, file)
    except RuleConfigError as e:
        msg = str(e)
        raise RuleConfigError(msg if msg.startswith(file) else f"{file}: {msg}") from None
    domains[domain] = node


def config_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()
                  and not p.name.startswith("."))


def load_dir(directory: Path) -> RuleSet:
    domains: dict[str, _Node] = {}
    files = config_files(directory)
    for p in files:
        parse_file(p.read_text(), str(p), domains)
    return RuleSet(domains, tuple(str(p) for p in files))


class RuleDir:
    """A directory of config files, polled for changes; `current` is the last good RuleSet."""

    def __init__(self, directory: Path, interval_s: float = 1.0,
                 on_change: Callable[[RuleSet], None] | None = None) -> None:
        self.directory = directory
        self.interval_s = interval_s
        self.on_change = on_change
        self.current = RuleSet()
        self.last_error: str | None = None
        self.generation = 0  # bumped on every successful load
        self._seen: object = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.poll()  # at start, a bad directory leaves no rules in force and is logged

    def _signature(self) -> object:
        try:
            return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in config_files(self.directory))
        except OSError as e:
            return ("error", str(e))

    def poll(self) -> None:
        sig = self._signature()
        if sig == self._seen:
            return
        self._seen = sig
        try:
            rules = load_dir(self.directory)
        except (RuleConfigError, OSError) as e:
            self.last_error = str(e)
            log.error("rate limit config in %s not loaded, keeping the last good one: %s", self.directory, e)
            return
        self.current = rules
        self.last_error = None
        self.generation += 1
        log.info("rate limit config loaded from %s: %d file(s), domains %s", self.directory,
                 len(rules.files), sorted(rules.domains))
        if self.on_change is not None:
            self.on_change(rules)

    def start(self) -> RuleDir:
        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                self.poll()
        self._thread = threading.Thread(target=loop, name="ratelimit-config", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
