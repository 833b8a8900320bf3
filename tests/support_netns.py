"""A client on a network of its own that can vanish: a Linux network namespace joined to the host by a veth pair.

`veth_namespace()` makes a namespace and a veth pair on a private /24 that no route of the host overlaps (host end
`.1`, namespace end `.2`) and removes both on exit, even after a failure. It adds one connected route (the /24 on
the host end) and touches no other interface or route of the host.

`Namespace.blackhole()` sets the namespace's end down: from then on nothing the host sends there is answered,
neither ACK nor RST nor ICMP, which is what a service sees of a phone that changed networks or a pulled cable
(netem would do it too, but `sch_netem` is not always there; deleting the namespace would not: a process still in
it keeps it, and its veth pair, alive). A socket on the host keeps retransmitting into the
void until TCP gives up: after `tcp_retries2` (~15 min by default) or the socket's TCP_USER_TIMEOUT (tcp(7)).

Run as a script (`python tests/support_netns.py HOST PORT PATH TOKEN`, stdlib only, so it runs in the namespace
without the project on its path), this module is a minimal SSE client that opens one stream, keeps reading and
reports on stdout, one line each: `open <status> <X-Connection-Id>`, `ping` per ping event, `end <why>` at the end.

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2; `NamespaceRefused` says when `ip netns add` fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

IP = shutil.which("ip") or "/usr/sbin/ip"
CLIENT = os.path.abspath(__file__)  # run as a script: the SSE client below


class NamespaceRefused(RuntimeError):
    """`ip netns add` failed (not root, no CAP_SYS_ADMIN, a container without namespaces, no iproute2)."""


@dataclass(frozen=True)
class Namespace:
    name: str
    host_if: str  # the veth end on the host
    ns_if: str  # the veth end in the namespace
    host_ip: str  # where a client in the namespace reaches the host's services
    ns_ip: str  # the client's address, as the service sees it

    def argv(self, *cmd: str) -> list[str]:
        """`cmd` run inside the namespace."""
        return [IP, "netns", "exec", self.name, *cmd]

    def blackhole(self) -> None:
        """The namespace vanishes from the host's view: its veth end goes down, nothing is answered any more."""
        _ip("netns", "exec", self.name, IP, "link", "set", self.ns_if, "down")

    async def stream_client(self, port: int, path: str, token: str) -> StreamClient:
        """This module's SSE client, run inside the namespace against the host's `port`."""
        proc = await asyncio.create_subprocess_exec(
            *self.argv(sys.executable, CLIENT, self.host_ip, str(port), path, token),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        return StreamClient(proc)


class StreamClient:
    """The namespace's client process and the lines it reported."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    async def next_line(self, timeout: float) -> str:
        """The client's next report (`open ...`, `ping`, `end ...`); '' when it exited."""
        assert self.proc.stdout is not None
        line = (await asyncio.wait_for(self.proc.stdout.readline(), timeout)).decode().strip()
        self.lines.append(line)
        return line

    async def opened(self, timeout: float = 10.0) -> tuple[int, str]:
        """(status, X-Connection-Id) of the client's stream."""
        line = await self.next_line(timeout)
        kind, _, rest = line.partition(" ")
        assert kind == "open", f"the namespace's client did not open its stream: {line!r} {self.lines}"
        status, _, conn_id = rest.partition(" ")
        return int(status), conn_id

    async def pinged(self, timeout: float = 10.0) -> None:
        """Wait for the next ping event the client read: the stream is live, both ways, across the veth pair."""
        line = await self.next_line(timeout)
        assert line == "ping", f"expected a ping, the namespace's client said {line!r} ({self.lines})"

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


def _ip(*args: str) -> None:
    subprocess.run([IP, *args], check=True, capture_output=True, timeout=10)


def _taken_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 destination the host routes (all tables) and every network it has an address on."""
    routes = json.loads(subprocess.run([IP, "-j", "-4", "route", "show", "table", "all"], check=True,
                                       capture_output=True, timeout=10).stdout or b"[]")
    addrs = json.loads(subprocess.run([IP, "-j", "-4", "addr", "show"], check=True, capture_output=True,
                                      timeout=10).stdout or b"[]")
    taken = [ipaddress.IPv4Network(r["dst"], strict=False) for r in routes if r.get("dst") not in (None, "default")]
    taken += [ipaddress.IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False)
              for link in addrs for a in link.get("addr_info", [])]
    return taken


def _free_subnet(seed: int) -> ipaddress.IPv4Network:
    """A /24 of 10.0.0.0/8 overlapping nothing the host routes, picked from `seed` (runs in parallel differ)."""
    taken = _taken_networks()
    for i in range(4096):
        n = (seed * 7919 + i * 104729) % 65536
        candidate = ipaddress.IPv4Network(f"10.{n >> 8}.{n & 255}.0/24")
        if not any(candidate.overlaps(t) for t in taken):
            return candidate
    raise RuntimeError("no free /24 in 10.0.0.0/8 on this host")


@contextlib.contextmanager
def veth_namespace(tag: str = "qsse") -> Iterator[Namespace]:
    """A namespace joined to the host by a veth pair, both links up; removed on exit. Names carry the pid."""
    pid = os.getpid()
    name, host_if, ns_if = f"{tag}{pid}", f"{tag[:4]}{pid}h", f"{tag[:4]}{pid}n"  # interface names: <= 15 chars
    try:
        _ip("netns", "add", name)
    except (subprocess.CalledProcessError, OSError) as exc:
        err = exc.stderr.decode(errors="replace").strip() if isinstance(exc, subprocess.CalledProcessError) else exc
        raise NamespaceRefused(f"`ip netns add {name}` failed: {err}") from None
    try:
        subnet = _free_subnet(pid)
        host_ip, ns_ip = str(subnet[1]), str(subnet[2])
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", name)
        _ip("addr", "add", f"{host_ip}/24", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("netns", "exec", name, IP, "addr", "add", f"{ns_ip}/24", "dev", ns_if)
        _ip("netns", "exec", name, IP, "link", "set", ns_if, "up")
        _ip("netns", "exec", name, IP, "link", "set", "lo", "up")
        yield Namespace(name, host_if, ns_if, host_ip, ns_ip)
    finally:
        # deleting the namespace destroys its veth end and with it the pair; the host end goes explicitly in
        # case the pair was made but never moved
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("netns", "del", name)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", host_if)


# ------------------------------------------------------------------------------------------------ the client
def _client(host: str, port: int, path: str, token: str) -> str:
    """Open one stream and read it to its end; reports on stdout. Returns why it ended."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.settimeout(None)  # a vanished network must not end the client: the service has to notice alone
        request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
                   f"Authorization: Bearer {token}\r\n\r\n")
        sock.sendall(request.encode("latin-1"))
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                return "closed before the headers"
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        print("open", lines[0].split()[1], headers.get("x-connection-id", "-"), flush=True)
        while True:
            while b"event: ping\n" in buf:
                print("ping", flush=True)
                buf = buf.split(b"event: ping\n", 1)[1]
            chunk = sock.recv(65536)
            if not chunk:
                return "eof"
            buf = buf[-64:] + chunk  # enough to find a ping split across reads


if __name__ == "__main__":
    try:
        why = _client(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
    except OSError as exc:
        why = f"{type(exc).__name__}: {exc}"
    print("end", why, flush=True)
