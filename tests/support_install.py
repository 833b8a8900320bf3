"""The package as a user gets it: a wheel built from this checkout, installed in a fresh venv of a given Python.

Used by tests/test_package.py (the wheel on the Python running the suite) and tests/test_containers.py (the
Dockerfile's CMD on the Dockerfile's Python). Building and installing take ~15 s, so each is done once per session.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv*", "__pycache__", "*.pyc", "build", "dist", "*.egg-info",
                                     ".mypy_cache", ".pytest_cache", ".ruff_cache", ".hypothesis", "bench", "tests",
                                     ".env")


def python_version(python: Path | str) -> str | None:
    """The full version `python` reports ("3.13.0"), or None when it does not run (a pyenv shim for a version the
    shell has not selected exits 127)."""
    try:
        res = subprocess.run([str(python), "-c", "import sys; print(sys.version.split()[0])"], capture_output=True,
                             text=True, timeout=30)
    except OSError:
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def find_python(version: str) -> Path | None:
    """An interpreter of `version` ("3.13") that runs: this one, pyenv's newest 3.13.x, or `python3.13` on PATH."""
    if f"{sys.version_info.major}.{sys.version_info.minor}" == version:
        return Path(sys.executable)
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    pyenv = sorted(glob.glob(f"{root}/versions/{version}.*/bin/python"),
                   key=lambda p: [int(x) if x.isdigit() else -1 for x in Path(p).parts[-3].split(".")])
    on_path = shutil.which(f"python{version}")
    for candidate in [*reversed(pyenv), *([on_path] if on_path else [])]:
        got = python_version(candidate)
        if got is not None and got.startswith(version + "."):
            return Path(candidate)
    return None


def build_wheel(dest: Path) -> Path:
    """`pip wheel` of a copy of the checkout (the build leaves nothing in the work tree); the wheel's path."""
    src = dest / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE)
    out = dest / "dist"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    wheels = list(out.glob("quart_sse-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def install(python: Path, wheel: Path, dest: Path) -> Path:
    """A fresh venv of `python` with the pinned runtime requirements and the wheel; its bin/ directory."""
    venv = dest / f"venv-{python.name}-{abs(hash(str(python)))}"
    subprocess.run([str(python), "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    res = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                          "--disable-pip-version-check", "-r", str(ROOT / "requirements.txt"), str(wheel)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return venv / "bin"


def clean_env(bin_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a user's shell with the venv activated: no checkout on the import path, none of the
    service's variables but those given."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
           and not k.startswith(("REDIS_", "JWT_", "APP_", "PING_", "MAX_", "CORS_", "HISTORY_", "SSE_", "STREAM_",
                                 "WORKERS", "PROMETHEUS_"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(bin_dir.parent)
    env.update(extra)
    return env
