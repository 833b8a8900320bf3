"""A port for a service that a test stops and starts again on the same port.

`free_port()` hands out ports of the kernel's ephemeral range (it binds port 0). While a service is down between a
kill and its restart, any outgoing connection on the machine (other test runs, the client under test reconnecting)
may be given that very port as its local end, and the restart then fails with EADDRINUSE. A port below the
ephemeral range (/proc/sys/net/ipv4/ip_local_port_range) is never handed out that way.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

from tests.support import _handed_out

RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def restart_port() -> int:
    """A free port below the ephemeral range (on Linux; elsewhere any free port), never the same twice."""
    try:
        low = int(RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(1000):
        port = rng.randint(max(1024, low - 12000), low - 1)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")
