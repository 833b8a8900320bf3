"""N open streams held by plain sockets in a child process, for measurements that must not count the clients.

`start(port, n, token)` returns the child once every stream has its first bytes. Each line then written to its
stdin is a command: `watch` waits until every stream has ended and answers `<seconds> <closing comments seen>`;
`quit` closes everything and exits.
"""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = r"""
import selectors, socket, sys, time
port, n, tok = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"GET /sse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n\r\n".encode())
    socks.append(s)
    if i % 200 == 199:
        time.sleep(0.05)
for s in socks:
    s.recv(65536)
print("ready", flush=True)
if sys.stdin.readline().strip() != "watch":
    sys.exit(0)
sel = selectors.DefaultSelector()
for s in socks:
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
t0 = time.monotonic()
left, closing = n, 0
while left:
    for key, _ in sel.select(60):
        try:
            data = key.fileobj.recv(65536)
        except ConnectionError:
            data = b""
        closing += b": closing " in data
        if not data:
            sel.unregister(key.fileobj)
            left -= 1
print(f"{time.monotonic() - t0:.3f} {closing}", flush=True)
"""


def start(port: int, n: int, token: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, str(port), str(n), token], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    if not proc.stdout.readline().startswith(b"ready"):
        proc.kill()
        raise RuntimeError("the clients could not open their streams")
    return proc


def command(proc: subprocess.Popen[bytes], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line.encode() + b"\n")
    proc.stdin.flush()
