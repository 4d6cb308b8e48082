"""HTTP clients against the daemon's API, alone and mixed with a folder burst.

    .venv/bin/python bench/http_api.py            # 8 clients, 200 requests of 512x512 JPEGs, then mixed
    .venv/bin/python bench/http_api.py --quick    # 2 clients, 6 requests: checks that it runs

(Not bench/http.py: the scripts run with bench/ first on sys.path, where a file of that name
would stand in for the standard library's `http` package in every one of them.)

The daemon (`python -m rmbgd run`, a subprocess) runs the simulated accelerator of
bench/pipeline.py (5 ms per call + 40 ms per image, no CPU) with the HTTP API on a free
127.0.0.1 port; nothing else is ever contacted. N client threads each send POST /v1/remove
(the raw JPEG body) one after the other until the request count or the time bound is reached.
Measured: requests/s (images/s), latency p50/p99 (send to last byte, this process's clock),
the model calls' sizes (requests arriving together share calls), and the daemon's RSS.

The mixed run does the same while a folder burst (`--burst` files) is moved into the inbox at
its start: with `http.priority: interactive` the requests go ahead of the burst's files
waiting for the model, so their latency stays near the HTTP-only figure while the burst
drains behind them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import _support as support
import httpx
import yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 clients, 6 requests of 64x64, burst 6: a smoke run")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--requests", type=int, default=200, help="requests in all, per run (default 200)")
    parser.add_argument("--duration", type=float, default=120.0, help="most seconds per run (default 120)")
    parser.add_argument("--side", type=int, default=512, help="width and height of each image (default 512)")
    parser.add_argument("--burst", type=int, default=200, help="files in the mixed run's folder burst (default 200)")
    parser.add_argument("--priority", default="interactive", choices=["interactive", "fair"], help="http.priority")
    support.add_daemon_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.requests, args.side, args.burst, args.input_size = 2, 6, 64, 6, 64
    if min(args.clients, args.requests) < 1 or args.duration <= 0:
        parser.error("--clients and --requests must be at least 1, --duration above 0")

    root = Path(tempfile.mkdtemp(prefix="rmbgd-bench-http-"))
    try:
        result = run(root, args)
    finally:
        if args.keep:
            print(f"work folder kept: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)

    def line(name: str, phase: dict) -> str:
        return (f"  {name}: {phase['requests']} requests ({phase['failed']} failed) in {phase['wall_s']:.2f} s, "
                f"{phase['images_per_s']:.1f} img/s, p50 {phase['p50_ms']:.0f} ms, p99 {phase['p99_ms']:.0f} ms, "
                f"calls {support.show_histogram(phase['batch_histogram'])}")

    mixed = result["mixed"]
    support.emit(result, [
        f"http: {args.clients} clients, {args.side}x{args.side} JPEGs, batch.size {args.batch}, "
        f"priority {args.priority}, simulated accelerator {result['simulated_ms_per_image']:g} ms/image "
        f"+ {result['simulated_ms_per_call']:g} ms/call",
        line("http only", result["http_only"]),
        line("mixed", mixed),
        f"  mixed folder burst: {mixed['burst_files']} files done in {mixed['burst_s']:.2f} s; "
        f"daemon RSS peak {result['rss_mib_peak']:.0f} MiB",
    ])
    return 0


def run(root: Path, args: argparse.Namespace) -> dict:
    machine = support.machine()
    _, config, (per_call, per_image) = support.simulated_daemon(root, args)
    data = yaml.safe_load(config.read_text())
    data["http"] = {"port": 0, "address": "127.0.0.1", "priority": args.priority, "busy_wait_seconds": 30}
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    image = support.photo_jpeg(args.side, args.side, seed=7)
    burst = support.write_photos(root / "burst", args.burst, (args.side, args.side), seed=100)
    daemon = support.TimedDaemon(config, support.subprocess_env(root / "hf-home"))
    try:
        daemon.wait_for("ready", timeout=180)
        port = daemon.events("http_listening")[0]["port"]
        url = f"http://127.0.0.1:{port}/v1/remove"
        http_only = phase(daemon, url, image, args)
        moved = []

        def drop_burst() -> None:
            for path in burst:
                path.rename(root / "inbox" / path.name)
                moved.append(time.monotonic())

        dropper = threading.Thread(target=drop_burst)
        before = len(daemon.events("file_done"))
        dropper.start()
        mixed = phase(daemon, url, image, args)
        dropper.join()
        done = daemon.wait_count(("file_done", "file_failed"), before + len(burst), timeout=600)
        mixed["burst_files"] = len(burst)
        mixed["burst_s"] = round(max(r["_arrived"] for r in done) - moved[0], 3) if burst else 0.0
        _, peak = support.rss_kib(daemon.proc.pid)
        code = daemon.stop(timeout=120)
        if code != 0:
            raise SystemExit(f"the daemon exited with {code}: {daemon.stderr_lines[-5:]}")
    finally:
        daemon.kill()
    return {
        "bench": "http_api", "machine": machine, "clients": args.clients, "side": args.side,
        "input_size": args.input_size, "batch_size": args.batch, "max_wait_ms": args.max_wait_ms,
        "priority": args.priority, "simulated_ms_per_image": per_image, "simulated_ms_per_call": per_call,
        "http_only": http_only, "mixed": mixed, "rss_mib_peak": round(peak / 1024.0, 1),
    }


def phase(daemon: support.TimedDaemon, url: str, image: bytes, args: argparse.Namespace) -> dict:
    """`args.requests` requests from `args.clients` threads (or fewer, at `args.duration`)."""
    first_batch = len(daemon.events("batch_done"))
    lock = threading.Lock()
    left = [args.requests]
    latencies: list[float] = []
    statuses: list[int] = []
    deadline = time.monotonic() + args.duration

    def client() -> None:
        with httpx.Client(timeout=args.duration + 60, trust_env=False) as session:
            while time.monotonic() < deadline:
                with lock:
                    if left[0] == 0:
                        return
                    left[0] -= 1
                sent = time.monotonic()
                try:
                    status = session.post(url, content=image, headers={"content-type": "image/jpeg"}).status_code
                except httpx.HTTPError:
                    status = 0
                with lock:
                    latencies.append((time.monotonic() - sent) * 1000.0)
                    statuses.append(status)

    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    ok = statuses.count(200)
    # The phase's model calls: batch_done lines logged since it started (inbox files included).
    sizes = [r["size"] for r in daemon.events("batch_done")[first_batch:]]
    return {
        "requests": len(statuses), "failed": len(statuses) - ok, "wall_s": round(wall, 3),
        "images_per_s": round(ok / wall, 2),
        "p50_ms": round(support.percentile(latencies, 50), 1), "p99_ms": round(support.percentile(latencies, 99), 1),
        "batch_histogram": support.batch_histogram(sizes),
    }


if __name__ == "__main__":
    sys.exit(main())
