"""A flood of small files through the real daemon: total time, files/s and memory.

    .venv/bin/python bench/flood.py            # 10,000 files, about a minute
    .venv/bin/python bench/flood.py --quick    # 50 files: checks that it runs

The files (small JPEGs) are staged in a hidden folder of the inbox and then renamed into it
as fast as Python can, while the daemon runs: the watcher, the readiness rules, claiming,
batching, publishing and the done/ moves all see the whole flood at once, and the kernel's
inotify queue may overflow (counted as `events_lost`). The model is the tiny test network at
a 64-pixel input, with no simulated delay, so the figure is the daemon's own per-file cost.

Memory is the daemon's resident set, sampled from /proc every 50 ms: at `ready`, its peak
over the run (the kernel's high-water mark), and the highest sample in the first and the
last quarter of the files, which must be alike if memory stays bounded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import _support as support


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 files: a smoke run")
    parser.add_argument("--count", type=int, default=10_000, help="files in the flood (default 10000)")
    parser.add_argument("--model", help="an already built tiny-model folder to use")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and print its path")
    args = parser.parse_args(argv)
    if args.quick:
        args.count = 50

    root = Path(tempfile.mkdtemp(prefix="rmbgd-bench-flood-"))
    try:
        result = run(root, args.count, args.model)
    finally:
        if args.keep:
            print(f"work folder kept: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)

    rss = result["rss_mib"]
    support.emit(
        result,
        [
            f"flood: {result['files']} files of {result['file_bytes_mean']} bytes "
            f"({result['failed']} failed, {result['events_lost']} inotify overflows)",
            f"  {result['wall_s']:.1f} s, {result['files_per_s']:.0f} files/s "
            f"(moving them in took {result['drop_s']:.2f} s)",
            f"  RSS MiB: ready {rss['ready']:.0f}, peak {rss['peak']:.0f}, "
            f"first quarter max {rss['first_quarter_max']:.0f}, last quarter max {rss['last_quarter_max']:.0f}",
        ],
    )
    return 0


def run(root: Path, count: int, model: str | None) -> dict:
    machine = support.machine()
    model_dir = support.tiny_model(root, model)
    staging = root / "inbox" / ".bench-staging"
    files = support.write_photos(staging, count, (64, 48))
    config = support.daemon_config(
        root,
        model_dir,
        batch={"size": 8, "max_wait_ms": 200},
        model={"input_size": 64},
        pipeline={"workers": 0},
        watch={"settle_seconds": 1.0, "rescan_seconds": 30.0},
    )
    daemon = support.TimedDaemon(config, support.subprocess_env(root / "hf-home"))
    try:
        daemon.wait_for("ready", timeout=180)
        pid = daemon.proc.pid
        ready_rss, _ = support.rss_kib(pid)
        samples: list[tuple[int, int]] = []  # (files finished so far, RSS KiB)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    current, _ = support.rss_kib(pid)
                except OSError:
                    return
                samples.append((_finished(daemon), current))
                stop.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        inbox = root / "inbox"
        started = time.monotonic()
        for path in files:
            os.rename(path, inbox / path.name)
        dropped = time.monotonic()
        finished = daemon.wait_count(("file_done", "file_failed"), count, timeout=1800)
        ended = max(r["_arrived"] for r in finished)
        _, peak_rss = support.rss_kib(pid)
        stop.set()
        sampler.join(5)
        code = daemon.stop(timeout=120)
        if code != 0:
            raise SystemExit(f"the daemon exited with {code}: {daemon.stderr_lines[-5:]}")
    finally:
        daemon.kill()

    wall = ended - started
    quarter = max(1, count // 4)
    first = [rss for done, rss in samples if done <= quarter] or [ready_rss]
    last = [rss for done, rss in samples if done >= count - quarter] or [peak_rss]
    return {
        "bench": "flood",
        "machine": machine,
        "files": count,
        "file_bytes_mean": round(sum(p.stat().st_size for p in (root / "done").iterdir()) / count)
        if (root / "done").is_dir()
        else None,
        "failed": sum(1 for r in finished if r["event"] == "file_failed"),
        "events_lost": len(daemon.events("events_lost")),
        "wall_s": round(wall, 2),
        "drop_s": round(dropped - started, 2),
        "files_per_s": round(count / wall, 1),
        "batches": len(daemon.events("batch_done")),
        "rss_mib": {
            "ready": round(ready_rss / 1024, 1),
            "peak": round(peak_rss / 1024, 1),
            "first_quarter_max": round(max(first) / 1024, 1),
            "last_quarter_max": round(max(last) / 1024, 1),
        },
    }


def _finished(daemon: support.TimedDaemon) -> int:
    return sum(1 for r in list(daemon.records) if r.get("event") in ("file_done", "file_failed"))


if __name__ == "__main__":
    sys.exit(main())
