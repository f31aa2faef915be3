"""Run inside a test namespace (`ip netns exec NS python _netprobe.py ...`); stdlib only.

    serve LOG PORT...           listen on 0.0.0.0:PORT for each PORT; every connection is
                                answered with one line "PEER_IP PORT" and closed; the same
                                line is appended to LOG ("ready" first, once listening)
    connect IP PORT TIMEOUT     one TCP connect (at most TIMEOUT seconds, and as long
                                again for a line from the server, printed when it sends
                                one); exit 0 when connected, 1 otherwise (why on stdout)
    http URL DEADLINE           GET URL (3 s per attempt, never a proxy) until it answers
                                200 or DEADLINE seconds have passed; prints the body

Never a test: the integration tests of the network driver start it in the namespaces
they create, so that every probe is a real packet from inside a namespace.
"""

from __future__ import annotations

import selectors
import socket
import sys
import time
import urllib.request


def serve(log: str, ports: list[int]) -> int:
    sel = selectors.DefaultSelector()
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.listen(16)
        sel.register(sock, selectors.EVENT_READ, port)
    with open(log, "a", buffering=1) as out:
        out.write("ready\n")
        while True:
            for key, _ in sel.select():
                try:
                    conn, (peer, _) = key.fileobj.accept()  # type: ignore[union-attr]
                except OSError:
                    continue
                line = f"{peer} {key.data}\n"
                out.write(line)
                try:
                    conn.sendall(line.encode())
                except OSError:
                    pass
                conn.close()


def connect(ip: str, port: int, timeout: float) -> int:
    try:
        sock = socket.create_connection((ip, port), timeout=timeout)
    except OSError as exc:
        print(f"failed: {type(exc).__name__}: {exc}")
        return 1
    data = b""
    with sock:  # connected: that is the success; the server's line when it sends one
        try:
            while not data.endswith(b"\n"):
                chunk = sock.recv(256)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:  # e.g. an HTTP server, which waits for the request
            if not data:
                print(f"connected (no line: {type(exc).__name__})")
                return 0
    print(data.decode(errors="replace").strip())
    return 0


def http(url: str, deadline_s: float) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + deadline_s
    last = "no attempt"
    while True:
        try:
            with opener.open(url, timeout=3) as response:
                body = response.read().decode(errors="replace")
                if response.status == 200:
                    print(body, end="")
                    return 0
                last = f"HTTP {response.status}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            print(f"failed: no answer from {url} within {deadline_s:.0f} s (last: {last})")
            return 1
        time.sleep(0.5)


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "serve":
        return serve(argv[1], [int(p) for p in argv[2:]])
    if len(argv) == 4 and argv[0] == "connect":
        return connect(argv[1], int(argv[2]), float(argv[3]))
    if len(argv) == 3 and argv[0] == "http":
        return http(argv[1], float(argv[2]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
