"""Smoke runs of the benchmark scripts: they must keep working, whatever they measure.

Untimed on purpose: timings belong in bench/RESULTS.md, not in assertions that a busy CI
machine would break. Each script runs in --quick mode on the session's tiny model; they
run side by side, since most of their time is starting Python, torch and a daemon.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.daemon import REPO, subprocess_env

CHECKS = {
    "cpu_path": lambda r: r["sizes"]["quick"]["rgb_equal_where_visible"] and r["sizes"]["quick"]["alpha_max_diff"] <= 2,
    "pipeline": lambda r: r["daemon"]["images_per_s"] > 0 and r["idle_drop"]["drops"] == 2 and r["speedup"] > 0
    and sum(int(size) * calls for size, calls in r["daemon"]["batch_histogram"].items()) == r["photos"]
    and sum(r["daemon"]["batch_histogram"].values()) == r["daemon"]["batches"],
    # Every file in exactly one model call of at most batch.size images, and the counts agree.
    "burst": lambda r: r["files"] == 24 and r["batch_size"] == 8
    and sum(int(size) * calls for size, calls in r["batch_histogram"].items()) == r["files"]
    and all(1 <= int(size) <= r["batch_size"] for size in r["batch_histogram"])
    and sum(r["batch_histogram"].values()) == r["model_calls"] >= r["fewest_calls"] == 3
    and r["full_batches"] == r["batch_histogram"].get("8", 0) and r["median_wait_ms"] >= 0,
    "flood": lambda r: r["files"] == 50 and r["failed"] == 0 and r["rss_mib"]["peak"] > 0,
    "refine": lambda r: r["cases"]["quick border"]["error_reduction"] > 3,
}


def test_bench_scripts_run(tiny_model, tmp_path):
    runs = {}
    for name in CHECKS:
        # Each its own Hugging Face cache: loaders copy the model's code into it.
        env = subprocess_env(tmp_path / f"hf-{name}")
        runs[name] = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / f"{name}.py"), "--quick", "--model", str(tiny_model)],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    outputs = {}
    try:
        for name, proc in runs.items():
            outputs[name] = proc.communicate(timeout=300)
    finally:
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    for name, (stdout, stderr) in outputs.items():
        assert runs[name].returncode == 0, f"{name}: {stderr[-3000:]}"
        first, *summary = stdout.splitlines()
        result = json.loads(first)
        assert result["bench"] == name
        assert summary, f"{name}: no human summary after the JSON line"
        assert CHECKS[name](result), f"{name}: {first}"
