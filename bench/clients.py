"""The parent's handle on the client processes: fork them, hand out streams, broadcast commands, gather replies."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from multiprocessing.connection import Connection
from typing import Any

from bench.sse_client import WorkerConfig, worker_main

# fork: the children need nothing but their config, start in milliseconds, and see `bench` without sys.path games.
CTX = mp.get_context("fork")


class ClientPool:
    """K worker processes, each holding its share of the streams; every command goes to all of them."""

    def __init__(self, cfgs: list[WorkerConfig]) -> None:
        self.procs: list[mp.process.BaseProcess] = []
        self.conns: list[Connection] = []
        for cfg in cfgs:
            parent, child = CTX.Pipe()
            proc = CTX.Process(target=worker_main, args=(cfg, child), name=f"bench-client-{cfg.index}", daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def ask(self, cmd: str | tuple[Any, ...], timeout: float) -> list[Any]:
        """Send `cmd` to every worker and wait for all replies; a worker's exception comes back as an error."""
        return self.ask_each([cmd] * len(self.conns), timeout)

    def ask_each(self, cmds: list[str | tuple[Any, ...]], timeout: float) -> list[Any]:
        """Send `cmds[i]` to worker i and wait for all replies."""
        for conn, cmd in zip(self.conns, cmds, strict=True):
            conn.send(cmd)
        replies = []
        for i, conn in enumerate(self.conns):
            if not conn.poll(timeout):
                raise TimeoutError(f"client {i} did not answer {str(cmds[i])[:60]} within {timeout:.0f}s")
            _, reply = conn.recv()
            if isinstance(reply, dict) and "error" in reply:
                raise RuntimeError(f"client {i} failed on {str(cmds[i])[:60]}: {reply['error']}")
            replies.append(reply)
        return replies

    def close(self) -> None:
        with contextlib.suppress(OSError, EOFError, TimeoutError, RuntimeError):
            self.ask("close", 10)
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def split_streams(users: list[str], k: int) -> list[list[str]]:
    """Round-robin, so each worker gets every user's streams spread evenly, not a contiguous block."""
    return [users[i::k] for i in range(k)]
