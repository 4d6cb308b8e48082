"""A burst of small files dropped the way rsync delivers them: how full are the model calls?

    .venv/bin/python bench/burst.py            # 300 files of 256x256, batch.size 8, ~30 s
    .venv/bin/python bench/burst.py --quick    # 24 files: checks that it runs

Each file is written under a hidden temporary name in the inbox and renamed into place at
once, one after the other, as rsync does (the daemon ignores hidden names). The daemon runs
the simulated accelerator of bench/pipeline.py (5 ms per call + 40 ms per image, no CPU).
Small files decode much faster than the model runs, so a backlog forms at once: what the
batching rule does with it shows in the number of model calls and their sizes. With the
batch window counted from the claim, decode queueing alone used it up and images went out
in ones and twos; counted from when an image is decoded (issue 12), they fill whole batches.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _support as support



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="24 files of 64x64: a smoke run")
    parser.add_argument("--count", type=int, default=300, help="files in the burst (default 300)")
    parser.add_argument("--side", type=int, default=256, help="width and height of each file (default 256)")
    support.add_daemon_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.side, args.input_size = 24, 64, 64

    root = Path(tempfile.mkdtemp(prefix="rmbgd-bench-burst-"))
    try:
        result = run(root, args)
    finally:
        if args.keep:
            print(f"work folder kept: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)

    support.emit(
        result,
        [
            f"burst: {result['files']} files of {args.side}x{args.side}, batch.size {args.batch}, "
            f"max_wait_ms {args.max_wait_ms}, simulated accelerator {result['simulated_ms_per_image']:g} ms/image "
            f"+ {result['simulated_ms_per_call']:g} ms/call",
            f"  {result['model_calls']} model calls (fewest possible {result['fewest_calls']}), "
            f"sizes {support.show_histogram(result['batch_histogram'])}, "
            f"{result['full_batches']} full",
            f"  {result['wall_s']:.2f} s, {result['images_per_s']:.1f} img/s, model call busy "
            f"{result['model_busy']:.0%}, median wait {result['median_wait_ms']} ms",
        ],
    )
    return 0


def run(root: Path, args: argparse.Namespace) -> dict:
    machine = support.machine()
    _, config, (per_call, per_image) = support.simulated_daemon(root, args)
    sources = root / "sources"
    files = support.write_photos(sources, args.count, (args.side, args.side))
    contents = [path.read_bytes() for path in files]
    inbox = root / "inbox"
    daemon = support.TimedDaemon(config, support.subprocess_env(root / "hf-home"))
    try:
        daemon.wait_for("ready", timeout=180)
        started = time.monotonic()
        for path, data in zip(files, contents):
            # rsync's way: a hidden temporary name in the destination folder, then a rename.
            temporary = inbox / f".{path.name}.tmp"
            temporary.write_bytes(data)
            os.rename(temporary, inbox / path.name)
        dropped = time.monotonic()
        finished = daemon.wait_count(("file_done", "file_failed"), len(files), timeout=600)
        ended = max(r["_arrived"] for r in finished)
        code = daemon.stop(timeout=120)
        if code != 0:
            raise SystemExit(f"the daemon exited with {code}: {daemon.stderr_lines[-5:]}")
    finally:
        daemon.kill()

    failed = [r for r in finished if r["event"] == "file_failed"]
    if failed:
        raise SystemExit(f"the daemon failed {len(failed)} files, e.g. {failed[0]}")
    sizes = [r["size"] for r in daemon.events("batch_done")]
    wall = ended - started
    waits = [r["wait_ms"] for r in finished if isinstance(r.get("wait_ms"), (int, float))]
    return {
        "bench": "burst",
        "machine": machine,
        "files": len(files),
        "side": args.side,
        "input_size": args.input_size,
        "batch_size": args.batch,
        "max_wait_ms": args.max_wait_ms,
        "workers": args.workers,
        "max_in_flight": args.max_in_flight,
        "simulated_ms_per_image": per_image,
        "simulated_ms_per_call": per_call,
        "drop_s": round(dropped - started, 3),
        "wall_s": round(wall, 3),
        "images_per_s": round(len(files) / wall, 2),
        "model_busy": round(sum(r["ms"] for r in daemon.events("batch_done")) / 1000.0 / wall, 3),
        "model_calls": len(sizes),
        "fewest_calls": -(-len(files) // args.batch),
        "full_batches": sum(1 for size in sizes if size == args.batch),
        "batch_histogram": support.batch_histogram(sizes),
        "median_wait_ms": round(statistics.median(waits), 1) if waits else None,
    }


if __name__ == "__main__":
    sys.exit(main())
