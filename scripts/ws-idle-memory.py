#!/usr/bin/env python3
"""Measures the server's resident memory per idle `/ws/track` WebSocket connection.

    scripts/ws-idle-memory.py BINARY [N]                 (default N: 5000)
    scripts/ws-idle-memory.py URL N --pid PID --token ADMIN_TOKEN

With a binary, starts `BINARY demo` on a free loopback port (a small fleet, so that the
state hardly grows while measuring), reads the admin token from its banner and stops it
at the end. With a URL, measures the running server whose process id is PID.

It creates one delivery (as an admin, for a random customer: nothing moves it, so no
session is closed by its end), lets the server settle, reads its VmRSS from
/proc/PID/status, opens N tracking sessions for that delivery (each waits for its
snapshot, and answers the server's pings, so every one stays open and idle), lets the
server settle again, reads VmRSS again and prints both and their difference divided by N.
Raises this process's descriptor limit (and the spawned server's) to the hard limit.
Needs nothing beyond Python 3's standard library.
"""

import argparse
import asyncio
import base64
import json
import os
import re
import resource
import subprocess
import sys
import time
import urllib.request
import uuid


def raise_fd_limit(needed):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft < needed:
        sys.exit(f"the descriptor limit is {soft}; {needed} are needed (raise `ulimit -Hn`)")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def start_demo(binary):
    process = subprocess.Popen(
        [binary, "demo", "--listen", "127.0.0.1:0", "--couriers", "10",
         "--deliveries-per-minute", "1", "--zones", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "RUST_LOG": "warn"})
    addr = token = None
    deadline = time.time() + 60
    while (addr is None or token is None) and time.time() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if match := re.search(r"operations map:\s+http://([\d.:]+)/", line):
            addr = match.group(1)
        if match := re.search(r"admin token:\s+(\S+)", line):
            token = match.group(1)
    if addr is None or token is None:
        process.kill()
        sys.exit("the demo printed no address or token")
    return process, f"http://{addr}", token


def create_delivery(base, token):
    body = json.dumps({"pickup": {"lat": 52.52, "lon": 13.40},
                       "dropoff": {"lat": 52.50, "lon": 13.45},
                       "customer_id": str(uuid.uuid4())}).encode()
    request = urllib.request.Request(
        f"{base}/deliveries", data=body, method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["id"]


async def read_frame(reader):
    head = await reader.readexactly(2)
    opcode, length = head[0] & 0x0F, head[1] & 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    elif length == 127:
        length = int.from_bytes(await reader.readexactly(8), "big")
    return opcode, await reader.readexactly(length)


def frame(opcode, payload):
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


class Session:
    """One tracking session: connected once its snapshot arrived; answers pings."""

    def __init__(self):
        self.ready = asyncio.Event()
        self.closed = None
        self.writer = None

    async def run(self, host, port, path, token):
        try:
            reader, self.writer = await asyncio.open_connection(host, port)
            key = base64.b64encode(os.urandom(16)).decode()
            self.writer.write(
                (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n").encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if b" 101 " not in head.split(b"\r\n", 1)[0]:
                self.closed = head.split(b"\r\n", 1)[0].decode(errors="replace")
                return
            while True:
                opcode, payload = await read_frame(reader)
                if opcode == 0x1:
                    self.ready.set()
                elif opcode == 0x9:
                    self.writer.write(frame(0xA, payload))
                elif opcode == 0x8:
                    self.closed = f"close {int.from_bytes(payload[:2], 'big') if payload else ''}"
                    return
        except (OSError, asyncio.IncompleteReadError) as error:
            self.closed = f"{type(error).__name__}: {error}"
        finally:
            self.ready.set()

    def close(self):
        if self.writer is not None:
            self.writer.close()


async def connect_all(base, token, delivery, n):
    host, port = base.removeprefix("http://").rsplit(":", 1)
    sessions, tasks = [], []
    started = time.time()
    for i in range(n):
        session = Session()
        sessions.append(session)
        tasks.append(asyncio.create_task(session.run(host, int(port), f"/ws/track/{delivery}", token)))
        if i % 100 == 99:
            await asyncio.gather(*(s.ready.wait() for s in sessions[-100:]))
    await asyncio.gather(*(s.ready.wait() for s in sessions))
    return sessions, tasks, time.time() - started


async def measure(base, token, pid, n, settle):
    delivery = create_delivery(base, token)
    await asyncio.sleep(settle)
    before = rss_kib(pid)
    sessions, tasks, took = await connect_all(base, token, delivery, n)
    await asyncio.sleep(settle)
    after = rss_kib(pid)
    failed = [s.closed for s in sessions if s.closed is not None]
    open_now = n - len(failed)
    for session in sessions:
        session.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    per = (after - before) / max(open_now, 1)
    print(json.dumps({"connections": n, "open": open_now, "connect_seconds": round(took, 1),
                      "rss_before_kib": before, "rss_after_kib": after,
                      "kib_per_connection": round(per, 2),
                      "failures": sorted(set(failed))[:5]}))
    return 0 if not failed else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="the delivertrack binary, or the URL of a running server")
    parser.add_argument("n", type=int, nargs="?", default=5000)
    parser.add_argument("--pid", type=int, help="the server's process id (with a URL)")
    parser.add_argument("--token", help="an admin token (with a URL)")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to wait before each reading")
    args = parser.parse_args()
    raise_fd_limit(args.n + 100)
    process = None
    if args.target.startswith("http"):
        if args.pid is None or args.token is None:
            sys.exit("with a URL, give --pid and --token")
        base, token, pid = args.target.rstrip("/"), args.token, args.pid
    else:
        process, base, token = start_demo(args.target)
        pid = process.pid
    try:
        return asyncio.run(measure(base, token, pid, args.n, args.settle))
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
