"""Fixtures: a real redis-server (pytest-redis, free port), settings per broker, apps and live servers."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from pytest_redis import factories

from quart_sse.settings import Settings
from tests import support
from tests.support import SUITE_HANDOFF, LiveServer, handoff_on, live_server, make_settings
from tests.support_install import build_wheel, install
from tests.tiers import is_fast

# A developer's shell must not change what is tested. STREAM_HANDOFF is the exception: tests/support.py has read it
# already (SUITE_HANDOFF) and make_settings passes it on, so `STREAM_HANDOFF=false make test` runs the generator path.
for _k in list(os.environ):
    if _k.startswith(("REDIS_", "JWT_", "APP_", "PING_", "MAX_CONNECTIONS", "CORS_", "HISTORY_", "SSE_", "STREAM_")):
        del os.environ[_k]


def pytest_report_header(config: pytest.Config) -> str:
    how = "unset: hand-off" if SUITE_HANDOFF is None else str(SUITE_HANDOFF).lower()
    return f"STREAM_HANDOFF: {how} (streams {'hand their connection off' if handoff_on() else 'stay on the generator'})"


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("handoff")
    if marker is not None and not handoff_on():
        pytest.skip(f"needs the connection hand-off (STREAM_HANDOFF=false): {marker.args[0] if marker.args else ''}"
                    .rstrip(": "))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The fast tier is derived from the code (tests/tiers.py); under `-m fast` the heavy helpers refuse to run."""
    for item in items:
        if is_fast(item):
            item.add_marker(pytest.mark.fast)
    if config.getoption("markexpr", "") == "fast":
        support.FAST_TIER = True


def pytest_configure(config: pytest.Config) -> None:
    if shutil.which("redis-server") is None:
        pytest.exit("redis-server not found on PATH: install it (Debian/Ubuntu: apt-get install redis-server; "
                    "macOS: brew install redis) and run make test again", returncode=3)


redis_proc = factories.redis_proc(port=None,  # type: ignore[arg-type]  # None: a free port (pytest-redis)
                                  executable=shutil.which("redis-server") or "redis-server")


@pytest.fixture
def redis_url(redis_proc: Any) -> Iterator[str]:
    """A clean database on the session's redis-server."""
    url = f"redis://{redis_proc.host}:{redis_proc.port}/0"
    client = redis.Redis.from_url(url)
    client.flushall()
    client.close()
    yield url


@pytest.fixture(params=["memory", "redis"])
def broker_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings_factory(broker_kind: str, request: pytest.FixtureRequest) -> Any:
    """Build Settings for the parametrised broker; the Redis URL is filled in for the redis kind."""
    url = request.getfixturevalue("redis_url") if broker_kind == "redis" else None

    def build(**overrides: Any) -> Settings:
        if url:
            overrides.setdefault("redis_url", url)
        return make_settings(**overrides)

    return build


@pytest.fixture
def settings(settings_factory: Any) -> Settings:
    s: Settings = settings_factory()
    return s


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[LiveServer]:
    async with live_server(settings) as srv:
        yield srv


# ------------------------------------------------------------------------------------------------ the built package
@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this checkout, once per session."""
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="session")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], Path]:
    """`installed(python)`: the bin/ of a fresh venv of that Python with the wheel and the pinned requirements,
    made once per Python and session."""
    venvs: dict[Path, Path] = {}

    def get(python: Path) -> Path:
        if python not in venvs:
            venvs[python] = install(python, wheel, tmp_path_factory.mktemp("venv"))
        return venvs[python]

    return get
