"""The installable package: build configuration, one version, dependency ranges that hold the tested pins, and the
built wheel installed in a fresh venv running `quart-sse token` and `quart-sse serve` away from this checkout."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import httpx
import jwt
import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import quart_sse
from tests.support import ROOT, SECRET, ServiceProcess, free_port
from tests.support_install import clean_env

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PYTHONS = ["3.11", "3.12", "3.13"]


def _requirements() -> list[Requirement]:
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    return [Requirement(ln) for ln in lines if ln]


def _applies(marker: Marker | None, python: str) -> bool:
    return marker is None or marker.evaluate({"python_version": python, "python_full_version": f"{python}.0",
                                              "sys_platform": "linux"})


# ------------------------------------------------------------------------------------------------ configuration
def test_version_comes_from_one_place() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "quart_sse.__version__"}
    assert quart_sse.__version__.count(".") == 2 and all(p.isdigit() for p in quart_sse.__version__.split("."))


def test_console_script_and_packages() -> None:
    assert PYPROJECT["project"]["scripts"] == {"quart-sse": "quart_sse.__main__:main"}
    assert PYPROJECT["build-system"]["build-backend"] == "setuptools.build_meta"
    found = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {"quart_sse", "quart_sse.*", "blueprints", "blueprints.*"} <= set(found)
    # setuptools' find (not find_namespace) needs an __init__.py in every package directory
    for pkg in ("quart_sse", "blueprints"):
        for d in (ROOT / pkg).rglob("*"):
            if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py")):
                assert (d / "__init__.py").exists(), f"{d.relative_to(ROOT)} has modules but no __init__.py"


def test_requires_python_is_the_tested_range() -> None:
    """`requires-python` admits exactly the Pythons CI runs (.ci/run: 3.11, 3.12, 3.13)."""
    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert all(f"{v}.0" in spec for v in PYTHONS)
    assert "3.10.13" not in spec and "3.14.0" not in spec
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py311"
    assert PYPROJECT["tool"]["mypy"]["python_version"] == "3.11"


def test_the_supported_pythons_agree_everywhere() -> None:
    """pyproject's classifiers, .ci/pythons (what CI looks for) and the Makefile name the same versions."""
    import re

    classified = [c.rsplit(" ", 1)[1] for c in PYPROJECT["project"]["classifiers"]
                  if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    ci = re.search(r"^SUPPORTED=\(([^)]*)\)", (ROOT / ".ci" / "pythons").read_text(), re.M)
    make = re.search(r"^SUPPORTED := (.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert ci and make
    assert classified == ci.group(1).split() == make.group(1).split() == PYTHONS


@pytest.mark.parametrize("python", PYTHONS)
def test_every_pin_lies_in_the_package_ranges(python: str) -> None:
    """On each Python: requirements.txt pins exactly one version of each dependency, inside pyproject's range."""
    ranges: dict[str, Requirement] = {canonicalize_name(r.name): r
                                      for r in map(Requirement, PYPROJECT["project"]["dependencies"])}
    pins: dict[str, str] = {}
    for req in _requirements():
        if not _applies(req.marker, python):
            continue
        (spec,) = req.specifier  # exactly one `==` specifier
        assert spec.operator == "==", req
        key = canonicalize_name(req.name)
        assert key not in pins, f"{key} pinned twice for Python {python}"
        pins[key] = spec.version
    assert set(pins) == set(ranges), set(pins) ^ set(ranges)
    for name, version in pins.items():
        assert ranges[name].specifier.contains(version), f"{name}=={version} outside {ranges[name]}"
        assert ranges[name].extras == next(r.extras for r in _requirements() if canonicalize_name(r.name) == name)


def test_newest_quart_each_python_allows() -> None:
    """Quart 0.23 needs Python 3.13 (its Requires-Python); the older Pythons keep 0.22, the last before it."""
    quart = {v: next(str(r.specifier) for r in _requirements() if r.name == "quart" and _applies(r.marker, v))
             for v in PYTHONS}
    assert quart == {"3.11": "==0.22.0", "3.12": "==0.22.0", "3.13": "==0.23.1"}


# ------------------------------------------------------------------------------------------------ the wheel
@pytest.fixture(scope="module")
def bin_dir(installed: Callable[[Path], Path]) -> Path:
    return installed(Path(sys.executable))


@pytest.mark.slow
def test_wheel_holds_both_packages_and_the_demo_page(wheel: Path) -> None:
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"quart_sse/__init__.py", "quart_sse/broker/redis.py", "quart_sse/static/demo.html", "quart_sse/py.typed",
            "blueprints/stream.py"} <= names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    assert wheel.name == f"quart_sse-{quart_sse.__version__}-py3-none-any.whl"


@pytest.mark.slow
def test_installed_token(bin_dir: Path, tmp_path: Path) -> None:
    env = clean_env(bin_dir, JWT_SECRET=SECRET)
    where = subprocess.run([str(bin_dir / "python"), "-c", "import quart_sse, blueprints; "
                            "print(quart_sse.__file__); print(blueprints.__file__); print(quart_sse.__version__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True)
    lines = where.stdout.split()
    assert all(ln.startswith(str(bin_dir.parent)) for ln in lines[:2]), lines  # the venv's copy, not the checkout
    assert lines[2] == quart_sse.__version__
    out = subprocess.run([str(bin_dir / "quart-sse"), "--version"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"quart-sse {quart_sse.__version__}", out
    res = subprocess.run([str(bin_dir / "quart-sse"), "token", "--sub", "alice", "--iss", "shop", "--scope",
                          "publish"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    claims = jwt.decode(res.stdout.strip(), SECRET, algorithms=["HS256"])
    assert (claims["sub"], claims["iss"], claims["scope"]) == ("alice", "shop", "publish")
    usage = subprocess.run([str(bin_dir / "quart-sse")], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=60)
    assert usage.returncode == 2 and "usage: quart-sse" in usage.stderr and "serve" in usage.stderr


@pytest.mark.slow
async def test_installed_serve(bin_dir: Path, tmp_path: Path) -> None:
    """`quart-sse serve` from the venv, in an empty directory: health, the demo page (package data), a published
    event, and SIGTERM exits 0."""
    port = free_port()
    svc = ServiceProcess(port, {}, tmp_path / "serve.log", command=[str(bin_dir / "quart-sse"), "serve"],
                         full_env=clean_env(bin_dir, JWT_SECRET=SECRET, APP_PORT=str(port), APP_HOST="127.0.0.1"))
    try:
        await svc.wait_ready()
        async with httpx.AsyncClient(base_url=svc.url) as c:
            assert (await c.get("/health")).json() == {"status": "ok"}
            demo = await c.get("/demo")
            assert demo.status_code == 200 and "/client.js" in demo.text
            client_js = await c.get("/client.js")  # the browser client, shipped in the wheel
            assert client_js.status_code == 200 and "export function connect" in client_js.text
        pub = await asyncio.to_thread(
            subprocess.run, [str(bin_dir / "quart-sse"), "publish", "--app", "shop", "--type", "t", "{}"],
            env=clean_env(bin_dir, JWT_SECRET=SECRET, APP_PORT=str(port)), cwd=tmp_path, capture_output=True,
            text=True, timeout=60)
        assert pub.returncode == 0 and '"id"' in pub.stdout, pub.stderr
        svc.signal(signal.SIGTERM)
        assert svc.proc.wait(10) == 0, svc.log()
        assert "Traceback" not in svc.log()
    finally:
        svc.stop()


def test_ci_finds_each_python_or_says_missing(tmp_path: Path) -> None:
    """.ci/pythons: this interpreter's version is found (an interpreter that runs as that version); with no pyenv
    and nothing on PATH, every version is reported MISSING instead of being skipped."""
    this = f"{sys.version_info.major}.{sys.version_info.minor}"
    out = subprocess.run([str(ROOT / ".ci" / "pythons")], capture_output=True, text=True, timeout=60, check=True)
    found = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert list(found) == PYTHONS
    assert found[this] != "MISSING"
    ran = subprocess.run([found[this], "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert ran.stdout.strip() == this
    empty = tmp_path / "bin"
    empty.mkdir()
    bare = subprocess.run(["/bin/bash", str(ROOT / ".ci" / "pythons")], capture_output=True, text=True, timeout=60,
                          env={"PATH": str(empty), "PYENV_ROOT": str(tmp_path / "no-pyenv"), "HOME": str(tmp_path)})
    assert bare.stdout.splitlines() == [f"{v} MISSING" for v in PYTHONS], bare.stdout + bare.stderr
