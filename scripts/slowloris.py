#!/usr/bin/env python3
"""A slow-loris against a running DeliverTrack API: when are slow sockets closed?

    scripts/slowloris.py HOST:PORT [N] [--interval 20] [--give-up 180]

Opens N sockets (default 2000), each sending a request head one byte every --interval
seconds (the first at once), and notes when the server closes each one (end of file,
a reset, or a failed write). Meanwhile it asks `GET /healthz` on a fresh connection
once all are open, to see that a prompt client is still served. Prints one JSON line:
how many were closed, the seconds from connect to close (min, median, p99, max), those
still open after --give-up seconds, and the probe's answer and latency. Exit status 0
when every socket was closed. Needs nothing beyond Python 3's standard library.
"""

import argparse
import asyncio
import json
import resource
import statistics
import sys
import time

HEAD = b"GET /healthz HTTP/1.1\r\nHost: slowloris\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"


async def slow(host, port, interval, closed_at, give_up):
    started = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as error:
        return ("connect_failed", str(error))

    async def trickle():
        for byte in HEAD:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(interval)

    async def watch():
        while True:
            data = await reader.read(1024)
            if not data:
                return

    sender, watcher = asyncio.create_task(trickle()), asyncio.create_task(watch())
    try:
        done, _ = await asyncio.wait({sender, watcher}, timeout=give_up,
                                     return_when=asyncio.FIRST_COMPLETED)
        if not done:
            return ("open", None)
        if sender in done and sender.exception() is None:
            return ("head_sent", None)
        closed_at.append(time.monotonic() - started)
        return ("closed", None)
    except (OSError, ConnectionError):
        closed_at.append(time.monotonic() - started)
        return ("closed", None)
    finally:
        for task in (sender, watcher):
            task.cancel()
        writer.close()


async def probe(host, port):
    started = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
        line = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        return line.decode(errors="replace").strip(), round(time.monotonic() - started, 3)
    except (OSError, asyncio.TimeoutError) as error:
        return f"{type(error).__name__}: {error}", round(time.monotonic() - started, 3)


async def main_async(args):
    host, port = args.addr.rsplit(":", 1)
    closed_at = []
    tasks = []
    for i in range(args.n):
        tasks.append(asyncio.create_task(slow(host, int(port), args.interval, closed_at, args.give_up)))
        if i % 200 == 199:
            await asyncio.sleep(0.05)
    await asyncio.sleep(1)
    status, latency = await probe(host, int(port))
    results = await asyncio.gather(*tasks)
    outcomes = {}
    for outcome, _ in results:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    times = sorted(closed_at)
    summary = {
        "sockets": args.n,
        "interval_s": args.interval,
        "outcomes": outcomes,
        "closed_after_s": {
            "min": round(times[0], 2),
            "median": round(statistics.median(times), 2),
            "p99": round(times[int(len(times) * 0.99) - 1 if len(times) > 1 else 0], 2),
            "max": round(times[-1], 2),
        } if times else None,
        "probe_while_open": {"status": status, "seconds": latency},
    }
    print(json.dumps(summary))
    return 0 if outcomes.get("closed", 0) == args.n else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("addr", help="HOST:PORT of the API")
    parser.add_argument("n", type=int, nargs="?", default=2000)
    parser.add_argument("--interval", type=float, default=20.0, help="seconds between bytes")
    parser.add_argument("--give-up", type=float, default=180.0, help="seconds before a socket counts as open")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.n + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.n + 1000), hard))
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
