"""`WORKERS=N`: the parent process, which forks the workers, forwards stop signals and replaces a killed worker.

What the parent does when a worker ends (docs/operations.md, "Workers"):

- killed by a signal (the OOM killer, `kill -9`), or exited 0 by itself (a SIGTERM sent to it alone): a new worker
  takes its place, at most `RESTARTS` times in `WINDOW` seconds; beyond that the service stops (exit 1);
- exited non-zero (it failed; its traceback is in the log): the service stops, the other workers get SIGTERM,
  exit 1;
- after SIGTERM/SIGINT to the service: nothing is replaced; a worker still there `kill_after` seconds later
  (stopped, wedged) is killed; exit 0 when every worker exited 0, else 1.

A worker that fails is not restarted: what failed it (a bad setting, an unreachable dependency at start-up) would
fail the next one too, and the orchestrator that restarts the service is the one place that can back off and
alert. A worker that was killed is replaced: its clients reconnect within their `retry:` to any worker of the port.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

log = logging.getLogger("quart_sse.server")

#: the signals that stop the service; blocked while a worker is forked, so none is lost between the fork and
#: the child's own handler (quart_sse.server.EarlySignals)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RESTARTS = 5  #: replacements allowed within WINDOW seconds before the service gives up
WINDOW = 60.0


class WorkerEnd(enum.Enum):
    """How a worker process ended, from its wait status."""

    CLEAN = "clean"  # exit 0
    KILLED = "killed"  # ended by a signal
    FAILED = "failed"  # exit status > 0

    @classmethod
    def of(cls, exit_code: int) -> WorkerEnd:
        """`exit_code` as `os.waitstatus_to_exitcode` gives it (negative: the signal's number)."""
        if exit_code == 0:
            return cls.CLEAN
        return cls.KILLED if exit_code < 0 else cls.FAILED


class Action(enum.Enum):
    """What the parent does about a worker that ended."""

    NOTHING = "nothing"  # the service is stopping anyway
    REPLACE = "replace"  # fork a new worker in its place
    STOP = "stop"  # stop the service: SIGTERM to the other workers, exit 1


class RestartBudget:
    """At most `limit` replacements within any `window` seconds (monotonic clock)."""

    def __init__(self, limit: int = RESTARTS, window: float = WINDOW) -> None:
        self.limit = limit
        self.window = window
        self._times: deque[float] = deque()

    def take(self, now: float) -> bool:
        """True (and counted) when one more replacement fits in the window ending at `now`."""
        while self._times and now - self._times[0] >= self.window:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return False
        self._times.append(now)
        return True


def decide(end: WorkerEnd, stopping: bool, budget: RestartBudget, now: float) -> Action:
    """The rule of the module's table, for one worker that ended."""
    if stopping:
        return Action.NOTHING
    if end is WorkerEnd.FAILED or not budget.take(now):
        return Action.STOP
    return Action.REPLACE


def describe(exit_code: int) -> str:
    """`signal 9` or `code 1`, as the log lines say it."""
    return f"signal {-exit_code}" if exit_code < 0 else f"code {exit_code}"


class Supervisor:
    """Forks `workers` processes that each run `child` (which must end with `os._exit`), then waits for them.

    `on_exit(pid)` runs for every worker that ended (the metrics of a dead process are merged, see
    quart_sse.metrics). `run()` returns the service's exit status: 0 when every worker ended cleanly after a stop
    signal, 1 when one failed, was cut after the stop, or the restart budget ran out.
    """

    def __init__(self, workers: int, child: Callable[[], NoReturn], on_exit: Callable[[int], None],
                 budget: RestartBudget | None = None, kill_after: float = 10.0) -> None:
        self.workers = workers
        self.child = child
        self.on_exit = on_exit
        self.budget = budget or RestartBudget()
        self.kill_after = kill_after  # seconds from the stop to SIGKILL for a worker still there (stopped, wedged)
        self.children: list[int] = []
        self.stopping = False
        self.code = 0

    def run(self) -> int:
        with self._signals_held():
            for _ in range(self.workers):
                self._fork()
            signal.signal(signal.SIGTERM, self._forward)
            signal.signal(signal.SIGINT, self._forward)
        while self.children:
            try:
                pid, status = os.wait()  # retried by Python after a signal handler ran (PEP 475)
            except ChildProcessError:  # pragma: no cover - every child is in self.children
                break
            if pid not in self.children:  # pragma: no cover - a child not forked here
                continue
            self.children.remove(pid)
            self.on_exit(pid)
            self._ended(pid, os.waitstatus_to_exitcode(status))
        signal.setitimer(signal.ITIMER_REAL, 0)  # every worker ended: no kill is due
        return self.code

    def _ended(self, pid: int, exit_code: int) -> None:
        end = WorkerEnd.of(exit_code)
        if end is not WorkerEnd.CLEAN:
            log.error("worker %d exited with %s", pid, describe(exit_code))
            if self.stopping:
                self.code = 1
        action = decide(end, self.stopping, self.budget, time.monotonic())
        if action is Action.REPLACE:
            with self._signals_held():
                new = self._fork()
            log.warning("worker %d replaced by worker %d (%s)", pid, new, describe(exit_code))
        elif action is Action.STOP:
            self.code = 1
            why = ("it failed" if end is WorkerEnd.FAILED
                   else f"{self.budget.limit} workers were replaced within {self.budget.window:.0f} s")
            log.error("stopping the service: worker %d exited with %s and %s", pid, describe(exit_code), why)
            self._stop(signal.SIGTERM)

    def _fork(self) -> int:
        pid = os.fork()
        if pid == 0:
            self.child()  # never returns
        self.children.append(pid)
        return pid

    def _forward(self, signum: int, _frame: Any) -> None:
        self._stop(signum)

    def _stop(self, signum: int) -> None:
        if not self.stopping:  # a worker that has not ended by then (SIGSTOPped, wedged) is killed
            signal.signal(signal.SIGALRM, self._kill_remaining)
            signal.setitimer(signal.ITIMER_REAL, self.kill_after)
        self.stopping = True
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _kill_remaining(self, _signum: int, _frame: Any) -> None:
        for pid in self.children:
            log.error("worker %d still running %.0f s after the stop: killed", pid, self.kill_after)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # a stopped process takes it too

    @staticmethod
    @contextlib.contextmanager
    def _signals_held() -> Iterator[None]:
        """Stop signals wait while a worker is forked and listed: each then reaches every worker, and a child
        inherits the blocked mask until its own handler is in place."""
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
