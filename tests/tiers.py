"""The fast tier (`make test-fast`, `pytest -m fast`): tests that need no server, no Redis and no child process.

Nobody maintains a list: conftest marks a test `fast` when nothing it runs can reach one of those. That is read
from the code, not guessed from names: the test function, the fixtures it requests (their whole closure) and every
function or class of the tests' own modules they call, transitively, must not name a helper that starts a server,
a Redis or a process (HEAVY_NAMES), nor request a fixture that does (HEAVY_FIXTURES); a test parametrised onto
the Redis broker (the `broker_kind` parameter, which `settings_factory` turns into a Redis by
`getfixturevalue`), or marked `slow`, is never fast. What this scan cannot see (a library that starts a server
itself) is caught when it runs: under `-m fast` the suite's own server and Redis helpers refuse to start
(tests/support.py, `fast_tier_guard`), so a misclassified test fails loudly instead of making the tier slow.
"""

from __future__ import annotations

import inspect
import os
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

#: Fixtures that start a redis-server, a service or a build.
HEAVY_FIXTURES = frozenset({"redis_proc", "redis_url", "server", "wheel", "installed"})

#: Names whose use means a server, a Redis, a socket to one, or a child process.
HEAVY_NAMES = frozenset({
    "live_server", "LiveServer", "ServiceProcess", "RedisServer", "RedisCluster", "Cluster", "open_stream",
    "open_connection", "create_connection", "sock_connect", "subprocess", "create_subprocess_exec", "Popen",
    "AsyncClient", "from_url", "run_cli", "hypercorn_serve",
})

#: Where the code the scan follows lives (elsewhere are libraries: their names are judged where they are used).
_OWN = tuple(str(Path(__file__).resolve().parent.parent / d) + os.sep for d in ("tests", "bench"))


def _own(obj: Any) -> bool:
    path = getattr(inspect.getmodule(obj), "__file__", None) or ""
    return path.startswith(_OWN)


def _code_names(code: types.CodeType) -> Iterator[str]:
    """Global and attribute names a code object uses, nested functions, lambdas and comprehensions included."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_names(const)


def _is_heavy(obj: Any, namespace: dict[str, Any], seen: set[int]) -> bool:
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if inspect.isclass(obj):
        return any(_is_heavy(member, namespace, seen) for member in vars(obj).values()
                   if inspect.isfunction(member) or isinstance(member, staticmethod | classmethod | property))
    if isinstance(obj, staticmethod | classmethod):
        obj = obj.__func__
    if isinstance(obj, property):
        return any(_is_heavy(f, namespace, seen) for f in (obj.fget, obj.fset) if f is not None)
    obj = inspect.unwrap(obj)
    code = getattr(obj, "__code__", None)
    if code is None:
        return False
    names = set(_code_names(code))
    if names & HEAVY_NAMES:
        return True
    scope = {**namespace, **getattr(obj, "__globals__", {})}
    for name in names:
        target = scope.get(name)
        if (inspect.isfunction(target) or inspect.isclass(target)) and _own(target) \
                and _is_heavy(target, vars(inspect.getmodule(target) or types.ModuleType("_")), seen):
            return True
    return False


def is_fast(item: pytest.Item) -> bool:
    """True when `item` needs no server, Redis or child process (see the module's docstring)."""
    if not isinstance(item, pytest.Function) or item.get_closest_marker("slow") is not None:
        return False
    if set(item.fixturenames) & HEAVY_FIXTURES:
        return False
    params = getattr(item, "callspec", None)
    if params is not None and params.params.get("broker_kind") == "redis":
        return False
    seen: set[int] = set()
    namespace = vars(item.module) if item.module is not None else {}
    if _is_heavy(item.function, namespace, seen):
        return False
    for name in item.fixturenames:
        for fixturedef in item._fixtureinfo.name2fixturedefs.get(name, ()):
            func = fixturedef.func
            if _own(func) and _is_heavy(func, vars(inspect.getmodule(func) or types.ModuleType("_")), seen):
                return False
    return True
