"""Configuration (docs/configuration.md): the seed's variable names, REDIS_URL over host/port, `.env` under the
environment, and every bad value stopped with ConfigError: one line naming the variable (no traceback at start-up)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from quart_sse.settings import EXAMPLE_SECRET, ConfigError, Settings, load_settings
from tests.support import service_env

LONG_SECRET = "p" * 32


@pytest.fixture(autouse=True)
def _clean_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory: the project's own `.env` (if any) must not leak into these tests."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _load(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return load_settings()


def _config_error(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    with pytest.raises(ConfigError) as ei:
        _load(monkeypatch, **env)
    msg = str(ei.value)
    assert "\n" not in msg and "\r" not in msg, msg
    return msg


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _load(monkeypatch, JWT_SECRET="s")
    assert s.app_name == "sse-service"
    assert s.app_port == 8080
    assert s.app_mode == "debug" and s.debug
    assert s.redis_dsn is None  # the in-process broker
    assert s.redis_cluster is False
    assert s.ping_interval == 30
    assert s.max_connections_per_user == 0
    assert s.cors_origins == "*" and s.cors_origin_list == ["*"]
    assert s.jwt_leeway == 0
    assert s.jwt_cookie_name == "access_token_cookie"
    assert s.jwt_algorithm == "HS256"
    assert s.issuer_allow_list == frozenset()
    assert s.max_body_bytes == 64 * 1024
    assert s.jwt_secret.get_secret_value() == "s"


def test_seed_variable_names(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _load(monkeypatch, APP_NAME="notify", APP_PORT="9000", APP_MODE="production", REDIS_HOST="redis.internal",
              REDIS_PORT="6380", JWT_SECRET=LONG_SECRET)
    assert (s.app_name, s.app_port, s.app_mode) == ("notify", 9000, "production")
    assert not s.debug
    assert s.redis_dsn == "redis://redis.internal:6380/0"
    assert s.jwt_secret.get_secret_value() == LONG_SECRET


def test_redis_host_alone_uses_port_6379(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _load(monkeypatch, JWT_SECRET="s", REDIS_HOST="redis").redis_dsn == "redis://redis:6379/0"


def test_redis_url_wins_over_host_and_port(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _load(monkeypatch, JWT_SECRET="s", REDIS_HOST="ignored", REDIS_PORT="1234",
              REDIS_URL="rediss://user:pw@cache.example:6390/2")
    assert s.redis_dsn == "rediss://user:pw@cache.example:6390/2"


def test_contract_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _load(monkeypatch, JWT_SECRET="s", REDIS_URL="redis://n1:7000/0", REDIS_CLUSTER="true", PING_INTERVAL="2.5",
              MAX_CONNECTIONS_PER_USER="3", CORS_ORIGINS="https://a.test, https://b.test", JWT_LEEWAY="10",
              JWT_COOKIE_NAME="sid", JWT_ISSUERS="app1, app2", JWT_AUDIENCE="svc")
    assert s.redis_cluster is True and s.ping_interval == 2.5 and s.max_connections_per_user == 3
    assert s.cors_origin_list == ["https://a.test", "https://b.test"]
    assert (s.jwt_leeway, s.jwt_cookie_name, s.jwt_audience) == (10, "sid", "svc")
    assert s.issuer_allow_list == frozenset({"app1", "app2"})


def test_lower_case_names_read_too(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _load(monkeypatch, jwt_secret="s", app_port="8123").app_port == 8123


def test_dotenv_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("# a comment\nJWT_SECRET=from-dotenv\nAPP_PORT=8181\nAPP_NAME=dotenv-name\n"
                                   "REDIS_HOST=dotenv-redis\n")
    s = load_settings()
    assert s.jwt_secret.get_secret_value() == "from-dotenv"
    assert (s.app_port, s.app_name, s.redis_dsn) == (8181, "dotenv-name", "redis://dotenv-redis:6379/0")


def test_environment_wins_over_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("JWT_SECRET=from-dotenv\nAPP_PORT=8181\n")
    s = _load(monkeypatch, APP_PORT="8282")
    assert s.app_port == 8282 and s.jwt_secret.get_secret_value() == "from-dotenv"


def test_bad_value_in_dotenv_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("JWT_SECRET=s\nAPP_PORT=eighty\n")
    assert "APP_PORT" in _config_error(monkeypatch)


@pytest.mark.parametrize(("env", "variable"), [
    ({"APP_PORT": "eighty"}, "APP_PORT"),
    ({"APP_PORT": "0"}, "APP_PORT"),
    ({"APP_PORT": "70000"}, "APP_PORT"),
    ({"APP_MODE": "bogus"}, "APP_MODE"),
    ({"REDIS_PORT": "six"}, "REDIS_PORT"),
    ({"PING_INTERVAL": "0"}, "PING_INTERVAL"),
    ({"PING_INTERVAL": "-1"}, "PING_INTERVAL"),
    ({"PING_INTERVAL": "often"}, "PING_INTERVAL"),
    ({"MAX_CONNECTIONS_PER_USER": "-1"}, "MAX_CONNECTIONS_PER_USER"),
    ({"JWT_LEEWAY": "-5"}, "JWT_LEEWAY"),
    ({"REDIS_CLUSTER": "maybe"}, "REDIS_CLUSTER"),
    ({"JWT_ALGORITHM": "none"}, "JWT_ALGORITHM"),
])
def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], variable: str) -> None:
    msg = _config_error(monkeypatch, JWT_SECRET="s", **env)
    assert variable in msg, msg


def test_empty_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "JWT_SECRET" in _config_error(monkeypatch, JWT_SECRET="")


def test_missing_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JWT_SECRET", raising=False)
    assert "JWT_SECRET" in _config_error(monkeypatch)


@pytest.mark.parametrize("secret", ["short", "x" * 31, EXAMPLE_SECRET])
def test_production_refuses_weak_secrets(monkeypatch: pytest.MonkeyPatch, secret: str) -> None:
    assert "JWT_SECRET" in _config_error(monkeypatch, APP_MODE="production", JWT_SECRET=secret)


def test_production_counts_secret_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """32 bytes, not characters: 16 two-byte characters pass, 31 ASCII characters do not."""
    assert _load(monkeypatch, APP_MODE="production", JWT_SECRET="é" * 16).app_mode == "production"


def test_debug_accepts_the_example_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """`make run` copies .env.example: it must start in debug mode."""
    assert _load(monkeypatch, JWT_SECRET=EXAMPLE_SECRET).debug


def test_example_file_secret_is_the_refused_one() -> None:
    """The constant production refuses is the one .env.example ships."""
    example = Path(__file__).resolve().parent.parent / ".env.example"
    lines = [ln for ln in example.read_text().splitlines() if ln.startswith("JWT_SECRET=")]
    assert lines == [f"JWT_SECRET={EXAMPLE_SECRET}"]


def test_serve_with_bad_port_exits_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "quart_sse", "serve"], env=service_env({"APP_PORT": "eighty"}),
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "APP_PORT" in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1, out


@pytest.mark.parametrize("url", ["redis://h:6379/0", "rediss://u:p@h:6390/2", "unix:///run/redis.sock?db=1"])
def test_redis_url_schemes_accepted(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    assert _load(monkeypatch, JWT_SECRET="s", REDIS_URL=url).redis_dsn == url


def test_empty_redis_url_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _load(monkeypatch, JWT_SECRET="s", REDIS_URL="", REDIS_HOST="h").redis_dsn == "redis://h:6379/0"


@pytest.mark.parametrize(("url", "shown"), [
    ("http://h:6379", "http://"),
    ("localhost:6379", "no scheme"),
    ("redis:/h", "no scheme"),
    ("REDIS://h", "REDIS://"),  # redis-py's schemes are lower-case
    ("tcp://user:hunter2@h:6379", "tcp://"),
])
def test_redis_url_bad_scheme_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch, url: str,
                                                              shown: str) -> None:
    msg = _config_error(monkeypatch, JWT_SECRET="s", REDIS_URL=url)
    assert msg.startswith("invalid configuration: REDIS_URL: "), msg
    assert "redis://" in msg and "rediss://" in msg and "unix://" in msg and shown in msg
    assert "hunter2" not in msg  # a password in the URL is never echoed


@pytest.mark.parametrize(("url", "part"), [
    ("redis://127.0.0.1:abc/0", "Port"),
    ("redis://:hunter2@h:99999/0", "Port"),
    ("redis://h:6379/0?socket_timeout=soon", "socket_timeout"),
    ("redis://:hunter2@h:6379/0?socket_timout=5", "socket_timout"),  # a typo: redis-py would fail at every call
])
def test_redis_url_that_redis_py_cannot_parse(monkeypatch: pytest.MonkeyPatch, url: str, part: str) -> None:
    msg = _config_error(monkeypatch, JWT_SECRET="s", REDIS_URL=url)
    assert msg.startswith("invalid configuration: REDIS_URL: ") and part in msg, msg
    assert "hunter2" not in msg


def test_redis_cluster_over_a_unix_socket_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    msg = _config_error(monkeypatch, JWT_SECRET="s", REDIS_URL="unix:///run/redis.sock", REDIS_CLUSTER="true")
    assert "REDIS_CLUSTER" in msg


def test_serve_with_bad_redis_url_exits_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "quart_sse", "serve"],
                          env=service_env({"REDIS_URL": "http://localhost:6379", "WORKERS": "2"}),
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2
    assert "REDIS_URL" in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1, out


def test_more_than_one_worker_needs_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process broker lives in one process: with two workers, each would deliver to its own streams only."""
    msg = _config_error(monkeypatch, JWT_SECRET="s", WORKERS="2")
    assert msg.startswith("invalid configuration: WORKERS: ") and "Redis" in msg, msg
    assert _load(monkeypatch, JWT_SECRET="s", WORKERS="2", REDIS_HOST="h").workers == 2
