"""The WORKERS=N parent (quart_sse.supervisor): its rule as pure logic, then real forked processes."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from quart_sse.supervisor import Action, RestartBudget, WorkerEnd, decide, describe
from tests.support import ROOT


@pytest.mark.parametrize(("exit_code", "end"), [(0, WorkerEnd.CLEAN), (-9, WorkerEnd.KILLED),
                                                 (-15, WorkerEnd.KILLED), (1, WorkerEnd.FAILED)])
def test_worker_end_from_the_exit_code(exit_code: int, end: WorkerEnd) -> None:
    assert WorkerEnd.of(exit_code) is end


def test_describe() -> None:
    assert describe(-9) == "signal 9"
    assert describe(1) == "code 1"


@pytest.mark.parametrize(("end", "stopping", "action"), [
    (WorkerEnd.KILLED, False, Action.REPLACE),
    (WorkerEnd.CLEAN, False, Action.REPLACE),
    (WorkerEnd.FAILED, False, Action.STOP),
    (WorkerEnd.KILLED, True, Action.NOTHING),
    (WorkerEnd.CLEAN, True, Action.NOTHING),
    (WorkerEnd.FAILED, True, Action.NOTHING),
])
def test_the_rule(end: WorkerEnd, stopping: bool, action: Action) -> None:
    assert decide(end, stopping, RestartBudget(), 0.0) is action


def test_the_budget_stops_a_restart_loop_and_refills_with_time() -> None:
    budget = RestartBudget(limit=2, window=60)
    assert decide(WorkerEnd.KILLED, False, budget, 0.0) is Action.REPLACE
    assert decide(WorkerEnd.KILLED, False, budget, 10.0) is Action.REPLACE
    assert decide(WorkerEnd.KILLED, False, budget, 59.9) is Action.STOP  # a third within the minute
    assert decide(WorkerEnd.KILLED, False, budget, 60.0) is Action.REPLACE  # the first left the window


# A supervisor in a process of its own (it installs signal handlers and forks), with workers that print their pid
# and wait for SIGTERM; argv: MODE MARKER. MODE "fail": the first worker exits 3 at once.
SCRIPT = """
import logging, os, signal, sys
from quart_sse.supervisor import RestartBudget, Supervisor
logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(levelname)s %(message)s")
def child():
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGINT))
    if sys.argv[1] == "fail":
        try:
            os.close(os.open(sys.argv[2], os.O_CREAT | os.O_EXCL))
            os._exit(3)
        except FileExistsError:
            pass
    os.write(1, b"worker %d up\\n" % os.getpid())  # one write: the parent's log lines go to the same file
    while True:
        signal.pause()
sys.exit(Supervisor(2, child, lambda pid: os.write(1, b"dead %d\\n" % pid), RestartBudget(2, 60), kill_after=1).run())
"""


class Parent:
    def __init__(self, tmp: Path, mode: str) -> None:
        self.out = tmp / "out.txt"
        self._file = open(self.out, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen([sys.executable, "-c", SCRIPT, mode, str(tmp / "marker")], cwd=ROOT,
                                     stdout=self._file, stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.out.read_text()

    def workers_up(self, n: int, timeout: float = 10) -> list[int]:
        """The pids of the first `n` workers that said they are up, once there are that many."""
        deadline = time.monotonic() + timeout
        while True:
            pids = [int(m[1]) for m in re.finditer(r"^worker (\d+) up$", self.text(), re.M)]
            if len(pids) >= n:
                return pids[:n]
            assert time.monotonic() < deadline and self.proc.poll() is None, self.text()
            time.sleep(0.01)

    def wait(self, timeout: float = 10) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """The parent and every worker it forked (its own session), whatever the test's outcome."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._file.close()


@pytest.fixture
def parents(tmp_path: Path) -> Iterator[Callable[[str], Parent]]:
    made: list[Parent] = []

    def make(mode: str) -> Parent:
        made.append(Parent(tmp_path, mode))
        return made[-1]

    yield make
    for parent in made:
        parent.kill()


def test_a_killed_worker_is_replaced_and_the_stop_is_still_clean(parents: Callable[[str], Parent]) -> None:
    parent = parents("run")
    first, second = parent.workers_up(2)
    os.kill(first, signal.SIGKILL)
    third = parent.workers_up(3)[2]
    assert third not in (first, second)
    os.kill(parent.proc.pid, signal.SIGTERM)
    assert parent.wait() == 0, parent.text()
    out = parent.text()
    assert f"ERROR worker {first} exited with signal 9" in out
    assert f"WARNING worker {first} replaced by worker {third} (signal 9)" in out
    assert {f"dead {pid}" for pid in (first, second, third)} <= set(out.splitlines())  # metrics merged
    assert "stopping the service" not in out


def test_a_restart_loop_stops_the_service(parents: Callable[[str], Parent]) -> None:
    parent = parents("run")
    up = parent.workers_up(2)
    for n in (3, 4):  # two replacements: the budget of this parent
        os.kill(up[0], signal.SIGKILL)
        up = [*up[1:], parent.workers_up(n)[n - 1]]
    os.kill(up[0], signal.SIGKILL)  # a third within the minute
    assert parent.wait() == 1, parent.text()
    assert f"stopping the service: worker {up[0]} exited with signal 9 and 2 workers were replaced within 60 s" \
        in parent.text()


def test_a_failed_worker_stops_the_others(parents: Callable[[str], Parent]) -> None:
    parent = parents("fail")
    assert parent.wait() == 1, parent.text()
    out = parent.text()
    assert "and it failed" in out and "exited with code 3" in out, out
    assert out.count("exited with") == 2, out  # the failed worker's line and the stop line; the other exited 0
    assert "replaced" not in out, out


def test_a_worker_that_does_not_stop_is_killed(parents: Callable[[str], Parent]) -> None:
    """A worker SIGSTOPped (or wedged) when the stop comes: the parent used to wait for it forever; it is killed
    `kill_after` seconds after the stop (1 s here) and the service exits 1."""
    parent = parents("run")
    first, second = parent.workers_up(2)
    os.kill(first, signal.SIGSTOP)
    t0 = time.monotonic()
    os.kill(parent.proc.pid, signal.SIGTERM)
    assert parent.wait() == 1, parent.text()
    assert 0.9 < time.monotonic() - t0 < 5
    out = parent.text()
    assert f"ERROR worker {first} still running 1 s after the stop: killed" in out, out
    assert f"ERROR worker {first} exited with signal 9" in out, out
    assert f"worker {second} exited" not in out, out
