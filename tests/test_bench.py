"""Smoke runs of the benchmark scripts: they must keep working, whatever they measure.

Untimed on purpose: timings belong in bench/RESULTS.md, not in assertions that a busy CI
machine would break. Each script runs in --quick mode on the session's tiny model; they
run side by side, since most of their time is starting Python, torch and a daemon, and those
that import torch themselves share one Python (tests/support/runscripts.py).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from tests.support.daemon import REPO, subprocess_env
from tests.support.tinymodel import BIREFNET_LITE_CODE

# Each bench's JSON line, field by field (README "Benchmarks", bench/*.py): a field missing,
# of the wrong type or out of its range fails the smoke run, not only a zero figure.
def count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def positive_count(value) -> bool:
    return count(value) and value > 0


def number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def non_negative(value) -> bool:
    return number(value) and value >= 0


def positive(value) -> bool:
    return number(value) and value > 0


def fraction(value) -> bool:
    return number(value) and 0 <= value <= 1


def busy_share(value) -> bool:
    # Model time over wall time: at most the whole wall time, give or take the rounding of both.
    return number(value) and 0 <= value <= 1.05


def alpha_level(value) -> bool:
    return number(value) and 0 <= value <= 255


def image_size(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(positive_count(side) for side in value)


def text(value) -> bool:
    return isinstance(value, str) and value != ""


def flag(value) -> bool:
    return isinstance(value, bool)


def iso_date(value) -> bool:
    try:
        return text(value) and datetime.datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


def histogram(value) -> bool:
    # {"<images in a model call>": <how many calls>}, as JSON gives it.
    return isinstance(value, dict) and bool(value) and all(
        key.isdigit() and int(key) > 0 and positive_count(calls) for key, calls in value.items())


def optional(check):
    return lambda value: value is None or check(value)


MACHINE = {"cpus": positive_count, "python": text, "platform": text, "loadavg_1m_at_start": non_negative, "date": iso_date}

CPU_PATH_SIZE = {
    "size": image_size, "repeats": positive_count,
    "naive_ms": positive, "rmbgd_ms": positive, "speedup": positive,
    "naive_wall_ms": positive, "rmbgd_wall_ms": positive, "wall_speedup": positive,
    "naive_bytes": positive_count, "rmbgd_bytes": positive_count,
    "rmbgd_stages_ms": {"decode+resize": non_negative, "model+pre/post": non_negative, "alpha+encode": non_negative},
    "alpha_max_diff": alpha_level, "alpha_mean_diff": alpha_level,
    "transparent_fraction": fraction, "rgb_equal_where_visible": flag,
}

PIPELINE_STAGES = {name: optional(non_negative) for name in ("decode_ms", "wait_ms", "infer_ms", "encode_ms", "write_ms")}

PIPELINE_DAEMON = {
    "wall_s": positive, "images_per_s": positive, "model_busy": busy_share,
    "cpu_ms_per_image": non_negative, "batches": positive_count, "mean_batch": positive,
    "first_done_s": non_negative, "median_ms": PIPELINE_STAGES, "output_bytes_mean": positive,
    "batch_histogram": histogram,
}

PIPELINE_IDLE_DROP = {
    "drops": positive_count, "p50_ms": positive, "p95_ms": positive, "max_ms": positive,
    "model_ms": non_negative, "bound_ms": positive,
}

REFINE_CASE = {
    "size": image_size, "repeats": positive_count, "cpu_ms": positive, "wall_ms": positive,
    "partial_fraction": fraction, "error_before": non_negative, "error_after": non_negative,
    "error_reduction": positive,
}

HTTP_PHASE = {
    "requests": positive_count, "failed": count, "wall_s": positive, "images_per_s": positive,
    "p50_ms": positive, "p99_ms": positive, "batch_histogram": histogram,
}

FIELDS = {
    "cpu_path": {"bench": text, "machine": MACHINE, "input_size": positive_count, "sizes": {"quick": CPU_PATH_SIZE}},
    "pipeline": {
        "bench": text, "machine": MACHINE, "photos": positive_count, "photo_size": image_size,
        "photo_bytes_mean": positive, "input_size": positive_count, "batch_size": positive_count,
        "max_wait_ms": count, "workers": count, "max_in_flight": count,
        "simulated_ms_per_image": non_negative, "simulated_ms_per_call": non_negative,
        "daemon": {**PIPELINE_DAEMON, "sleep_busy": busy_share},
        "loop": {"wall_s": positive, "images_per_s": positive, "cpu_ms_per_image": non_negative, "output_bytes_mean": positive},
        "speedup": positive,
        "idle_drop": PIPELINE_IDLE_DROP,
    },
    "burst": {
        "bench": text, "machine": MACHINE, "files": positive_count, "side": positive_count,
        "input_size": positive_count, "batch_size": positive_count, "max_wait_ms": count,
        "workers": count, "max_in_flight": count,
        "simulated_ms_per_image": non_negative, "simulated_ms_per_call": non_negative,
        "drop_s": non_negative, "wall_s": positive, "images_per_s": positive, "model_busy": busy_share,
        "model_calls": positive_count, "fewest_calls": positive_count, "full_batches": count,
        "batch_histogram": histogram, "median_wait_ms": optional(non_negative),
    },
    "flood": {
        "bench": text, "machine": MACHINE, "files": positive_count, "file_bytes_mean": positive,
        "failed": count, "events_lost": count, "wall_s": positive, "drop_s": non_negative,
        "files_per_s": positive, "batches": positive_count,
        "rss_mib": {"ready": positive, "peak": positive, "first_quarter_max": positive, "last_quarter_max": positive},
    },
    "http_api": {
        "bench": text, "machine": MACHINE, "clients": positive_count, "side": positive_count,
        "input_size": positive_count, "batch_size": positive_count, "max_wait_ms": count, "priority": text,
        "simulated_ms_per_image": non_negative, "simulated_ms_per_call": non_negative,
        "http_only": HTTP_PHASE,
        "mixed": {**HTTP_PHASE, "burst_files": count, "burst_s": non_negative},
        "rss_mib_peak": positive,
    },
    "refine": {
        "bench": text, "machine": MACHINE, "torch_threads": positive_count,
        "cases": {"quick border": REFINE_CASE, "quick all soft": REFINE_CASE},
    },
}


def field_problems(value, schema, where: str = "") -> list:
    if not isinstance(schema, dict):
        return [] if schema(value) else [f"{where}: {value!r}"]
    if not isinstance(value, dict):
        return [f"{where}: {value!r} is not an object"]
    problems = [f"{where}.{key}: missing" for key in schema if key not in value]
    for key, check in schema.items():
        if key in value:
            problems += field_problems(value[key], check, f"{where}.{key}")
    return problems


# Beyond types and ranges: what each --quick run is known to produce.
CHECKS = {
    "cpu_path": lambda r: r["sizes"]["quick"]["rgb_equal_where_visible"] and r["sizes"]["quick"]["alpha_max_diff"] <= 2,
    "pipeline": lambda r: r["idle_drop"]["drops"] == 2 and r["daemon"]["batches"] <= r["photos"]
    and sum(int(size) * calls for size, calls in r["daemon"]["batch_histogram"].items()) == r["photos"]
    and sum(r["daemon"]["batch_histogram"].values()) == r["daemon"]["batches"],
    # Every file in exactly one model call of at most batch.size images, and the counts agree.
    "burst": lambda r: r["files"] == 24 and r["batch_size"] == 8
    and sum(int(size) * calls for size, calls in r["batch_histogram"].items()) == r["files"]
    and all(1 <= int(size) <= r["batch_size"] for size in r["batch_histogram"])
    and sum(r["batch_histogram"].values()) == r["model_calls"] >= r["fewest_calls"] == 3
    and r["full_batches"] == r["batch_histogram"].get("8", 0),
    "flood": lambda r: r["files"] == 50 and r["failed"] == 0 and r["rss_mib"]["ready"] <= r["rss_mib"]["peak"],
    # Every request answered 200, each image in one model call (the mixed run's with the burst's).
    "http_api": lambda r: r["http_only"]["requests"] == 6 and r["http_only"]["failed"] == 0
    and r["mixed"]["failed"] == 0 and r["mixed"]["burst_files"] == 6
    and sum(int(size) * calls for size, calls in r["http_only"]["batch_histogram"].items()) == 6
    and sum(int(size) * calls for size, calls in r["mixed"]["batch_histogram"].items()) <= 12,
    "refine": lambda r: r["cases"]["quick border"]["error_reduction"] > 3
    and all(case["error_after"] < case["error_before"] for case in r["cases"].values()),
}


# The scripts that import torch themselves run one after another in one Python
# (tests/support/runscripts.py): one torch import instead of four. The others only start a
# daemon, and run beside them as `python bench/x.py`.
IN_ONE_PYTHON = ("cpu_path", "refine", "pipeline")
REAL = "pipeline --real"


def real_lite_missing() -> str | None:
    """Why `pipeline --real lite` cannot run here (None when it can)."""
    if not BIREFNET_LITE_CODE.is_dir():
        return f"the real BiRefNet_lite code is not here ({BIREFNET_LITE_CODE})"
    for package in ("timm", "kornia", "einops"):
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed (the birefnet extra)"
    return None


def test_bench_scripts_run(tiny_model, tmp_path):
    def argv(name):
        return [str(REPO / "bench" / f"{name}.py"), "--quick", "--model", str(tiny_model)]

    def start(command, name):
        # Each its own Hugging Face cache: loaders copy the model's code into it.
        return subprocess.Popen(command, cwd=REPO, env=subprocess_env(tmp_path / f"hf-{name}"),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    in_one_python = {name: argv(name) for name in IN_ONE_PYTHON}
    if real_lite_missing() is None:
        # Its own model cache: the run builds the random-weight folder as a first run on a GPU does.
        in_one_python[REAL] = [str(REPO / "bench" / "pipeline.py"), "--real", "lite", "--device", "cpu",
                               "--quick", "--cache", str(tmp_path / "cache")]
    runs = {name: start([sys.executable, *argv(name)], name) for name in CHECKS if name not in IN_ONE_PYTHON}
    runs["one python"] = start([sys.executable, "-m", "tests.support.runscripts",
                                json.dumps(list(in_one_python.values()))], "one-python")
    outputs = {}
    try:
        for name, proc in runs.items():
            outputs[name] = proc.communicate(timeout=300)
    finally:
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    stdout, stderr = outputs.pop("one python")
    assert runs["one python"].returncode == 0, stderr[-3000:]
    for name, result in zip(in_one_python, json.loads(stdout)):
        assert result["code"] == 0, f"{name}: {result['stderr'][-3000:]}"
        outputs[name] = (result["stdout"], result["stderr"])
    real = outputs.pop(REAL, None)
    assert sorted(outputs) == sorted(CHECKS)
    for name, (stdout, stderr) in outputs.items():
        first, *summary = stdout.splitlines()
        result = json.loads(first)
        assert result["bench"] == name
        assert summary, f"{name}: no human summary after the JSON line"
        assert field_problems(result, FIELDS[name], name) == [], first
        assert CHECKS[name](result), f"{name}: {first}"
    if real is None:
        pytest.skip(f"pipeline --real lite not run: {real_lite_missing()} (the other scripts passed)")
    check_pipeline_real(real[0])


# pipeline.py --real: the real model's figures, model-only against end to end.
MODEL_ONLY_TIMING = {"calls": positive_count, "median_ms": positive, "min_ms": positive, "images_per_s": positive}
GPU = {"name": text, "memory_gib": positive, "capability": text, "cuda": text, "cudnn": optional(positive_count)}
PIPELINE_REAL = {
    "bench": text, "real": text, "device": text,
    "machine": {**MACHINE, "torch": text, "transformers": text,
                "gpu": lambda value: value is None or field_problems(value, GPU, "gpu") == []},
    "photos": positive_count, "photo_size": image_size, "photo_bytes_mean": positive,
    "input_size": positive_count, "batch_size": positive_count, "max_wait_ms": count, "workers": count,
    "max_in_flight": count,
    "model_only": {"forward": MODEL_ONLY_TIMING, "model_call": MODEL_ONLY_TIMING, "dtype": text, "precision": text},
    "daemon": PIPELINE_DAEMON, "idle_drop": PIPELINE_IDLE_DROP,
    "end_to_end_vs_model_only": positive, "end_to_end_vs_model_call": positive, "goal": fraction, "goal_met": flag,
}


def check_pipeline_real(stdout: str) -> None:
    """`pipeline.py --real lite --device cpu --quick`'s output (run by test_bench_scripts_run)."""
    first, *summary = stdout.splitlines()
    result = json.loads(first)
    assert field_problems(result, PIPELINE_REAL, "pipeline --real") == [], first
    assert summary and summary[0].startswith("pipeline --real lite:"), stdout
    assert (result["real"], result["device"], result["machine"]["gpu"]) == ("lite", "cpu", None)
    assert (result["photos"], result["batch_size"], result["idle_drop"]["drops"]) == (2, 2, 1)
    assert sum(int(size) * calls for size, calls in result["daemon"]["batch_histogram"].items()) == 2
    assert (result["model_only"]["dtype"], result["model_only"]["precision"]) == ("float32", "weights")
    assert result["goal_met"] == (result["end_to_end_vs_model_only"] >= result["goal"])


def _fake_shared_models(root):
    # Where the model code is looked for; the refusals only ask whether it is there.
    (root / BIREFNET_LITE_CODE.name).mkdir(parents=True)
    return root


# case: (arguments, environment changes, the start of the one line expected on stderr)
REAL_REFUSALS = {
    "no cuda": (["--real", "full", "--device", "cuda"], {"CUDA_VISIBLE_DEVICES": ""},
                "pipeline: --device cuda, but this torch ("),
    "no model code": (["--real", "lite", "--device", "cpu"], {},
                      "pipeline: --real lite needs the BiRefNet model code at "),
    "no packages": (["--real", "lite", "--device", "cpu"], {},
                    "pipeline: --real lite needs timm, kornia, einops: pip install 'rmbgd[birefnet]'"),
}


@pytest.mark.parametrize("case", REAL_REFUSALS)
def test_bench_pipeline_real_refuses_in_one_line(tmp_path, case):
    argv, env_change, expected = REAL_REFUSALS[case]
    env = subprocess_env(tmp_path / "hf")
    env.update(env_change)
    env["RMBGD_SHARED_MODELS"] = str(tmp_path / "nowhere" if case == "no model code" else _fake_shared_models(tmp_path / "models"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "bench"), str(REPO), env.get("PYTHONPATH")]))
    # The packages hidden whether or not this machine has them, so every case runs everywhere.
    hide = ["-m", "tests.support.hidepkgs", "timm,kornia,einops", "--"] if case == "no packages" else []
    command = [sys.executable, *hide, "-m", "pipeline", *argv]
    proc = subprocess.run(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith(expected), line
