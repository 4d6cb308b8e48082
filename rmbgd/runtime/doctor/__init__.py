"""`rmbgd doctor`: is this installation ready? One line per check, exit 0 or 1.

Nothing of the user's is processed or changed: the model is looked for (a local folder, or
the Hugging Face cache) but never downloaded, the folders are looked at but not created, and
the pipeline runs on generated images with a built-in stand-in model (rmbgd.model.standin) into a
temporary folder. torch is imported only by the checks that need it, so `--help` and a
failing config stay quick.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, Any, Callable, List, Optional

from rmbgd.runtime.doctor.device import check_device, cuda_unavailable_reason
from rmbgd.runtime.doctor.folders import check_folders, check_inotify, inotify_verdict
from rmbgd.runtime.doctor.model import check_model, local_model_problem
from rmbgd.runtime.doctor.packages import check_packages, importable, model_code_packages
from rmbgd.runtime.doctor.pipeline import check_pipeline
from rmbgd.runtime.doctor.result import FAIL, OK, SKIP, Result


def main(config_path: Optional[str], out: IO[str] = sys.stdout) -> int:
    """Run every check, printing each line as it is known; 0 when none failed, else 1."""
    results: List[Result] = []

    def report(result: Result) -> None:
        results.append(result)
        out.write(result.line() + "\n")
        out.flush()

    cfg = _load(config_path, report)
    if cfg is None:
        return 1
    report(check_packages(cfg.model))
    device = None
    if importable("torch"):
        device_result, device, gpu = check_device(cfg.model.device)
        report(device_result)
        if gpu is not None:
            report(gpu)
    else:
        report(Result(SKIP, "device", "torch is not installed"))
    report(check_model(cfg.model))
    if config_path:
        for result in check_folders(cfg):
            report(result)
        report(check_inotify(cfg))
    else:
        report(Result(SKIP, "folders", "no --config given"))
    if importable("torch") and importable("transformers"):
        report(check_pipeline(cfg, device or "cpu"))
    else:
        report(Result(SKIP, "pipeline", "torch and transformers are needed"))
    failed = [r for r in results if r.status == FAIL]
    out.write(f"{len(failed)} problem(s) found\n" if failed else "everything needed is in place\n")
    return 1 if failed else 0


def _load(config_path: Optional[str], report: Callable[[Result], None]) -> Any:
    from rmbgd.config import ConfigError, load_config, parse_config

    if not config_path:
        report(Result(SKIP, "config", "no --config given: checking the defaults (model.name, model.device)"))
        return parse_config({}, Path.cwd(), with_paths=False)
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        report(Result(FAIL, "config", f"{'; '.join(exc.problems)} (see `rmbgd check --config {config_path}`)"))
        return None
    report(Result(OK, "config", f"{config_path}"))
    return cfg


__all__ = [
    "Result",
    "check_device",
    "check_inotify",
    "check_model",
    "check_packages",
    "check_pipeline",
    "cuda_unavailable_reason",
    "inotify_verdict",
    "local_model_problem",
    "main",
    "model_code_packages",
]
