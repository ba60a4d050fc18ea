"""Cheaper calls from Python into a compiled policy's WASM exports.

wasmtime-py's `Func.__call__` reads the function's type again on every call and converts each
argument through it: ~10 us for a call without arguments, ~35 us for `opa_eval`'s seven, on this
machine. opa-py-wasm makes five such calls per evaluation (heap reset, malloc, heap pointer,
opa_eval, heap reset), which was over half of an uncached decision on the 84 KB request
(bench/policy_decision.py). Every OPA ABI export takes and returns only i32s, so here each
export's arity is read once and a call goes straight to wasmtime's C API, inside the same
`enter_wasm` guard `Func.__call__` uses (traps, and errors raised by host builtins, surface as
before). What is evaluated, and how, is unchanged: opa-py-wasm still writes the input, calls
`opa_eval` and reads the result.

This reaches into both libraries' internals (wasmtime's ctypes bindings, opa-py-wasm's instance
factory), so it is installed only for the versions it was written against (pyproject.toml pins
them) and otherwise left out, with a log line: decisions are the same either way, only slower.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

log = logging.getLogger("extauth.policy")

_SUPPORTED = {"wasmtime": "46.", "opa-py-wasm": "1.2."}  # version prefixes this was written against


def _supported() -> bool:
    try:
        return all(version(pkg).startswith(prefix) for pkg, prefix in _SUPPORTED.items())
    except PackageNotFoundError:
        return False


def install(policy: Any) -> bool:
    """Make every instance `policy` (an opapywasm.OpaWasmPolicy) creates from now on use direct calls.
    Call right after creating the policy, before its first evaluation. False: not installed."""
    if not _supported():
        log.info("wasm fast calls not installed: written for wasmtime %s* and opa-py-wasm %s*",
                 _SUPPORTED["wasmtime"], _SUPPORTED["opa-py-wasm"])
        return False
    pool = getattr(policy, "_pool", None)
    factory = getattr(pool, "_factory", None)
    if factory is None:
        return False

    def fast_factory() -> Any:
        instance = factory()
        speed_up(instance.abi)
        return instance

    pool._factory = fast_factory  # noqa: SLF001 (see the module docstring)
    return True


def speed_up(abi: Any) -> None:
    """Route one instance's OpaAbi export calls (opapywasm/abi.py) through direct i32 calls."""
    from wasmtime import WasmtimeError
    from wasmtime import _ffi as ffi
    from wasmtime._func import enter_wasm

    rt = abi._rt  # noqa: SLF001
    store = rt.store
    context = store._context  # noqa: SLF001
    call_c = ffi.wasmtime_func_call
    val_t = ffi.wasmtime_val_t
    i32 = ffi.WASMTIME_I32
    byref = ctypes.byref
    funcs: dict[str, tuple[Any, int, int]] = {}

    def call(name: str, *args: int) -> int:
        f = funcs.get(name)
        if f is None:
            func = rt.get_func(name)
            ty = func.type(store)
            params, results = ty.params, ty.results
            if any(str(t) != "i32" for t in (*params, *results)) or len(results) > 1:
                raise WasmtimeError(f"OPA export {name!r} is not an i32 function")
            f = funcs[name] = (func, len(params), len(results))
        func, n_params, n_results = f
        if len(args) != n_params:
            raise WasmtimeError(f"{name}: {len(args)} argument(s) given, {n_params} expected")
        params = (val_t * n_params)()
        for i, a in enumerate(args):
            params[i].kind = i32
            params[i].of.i32 = a
        results = (val_t * n_results)()
        with enter_wasm(store) as trap:
            error = call_c(context(), byref(func._func), params, n_params, results, n_results, trap)  # noqa: SLF001
            if error:
                raise WasmtimeError._from_ptr(error)  # noqa: SLF001
        return results[0].of.i32 if n_results else 0

    def no_result(name: str) -> Callable[[int], None]:
        def f(addr: int) -> None:
            call(name, addr)
        return f

    abi._call = call  # noqa: SLF001
    abi.opa_heap_ptr_set = no_result("opa_heap_ptr_set")
    abi.opa_free = no_result("opa_free")
