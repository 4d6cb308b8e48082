"""`rmbgd doctor`: is this installation ready? One line per check, exit 0 or 1.

Nothing of the user's is processed or changed: the model is looked for (a local folder, or
the Hugging Face cache) but never downloaded, the folders are looked at but not created, and
the pipeline runs on generated images with a built-in stand-in model (rmbgd.model.standin) into a
temporary folder. torch is imported only by the checks that need it, so `--help` and a
failing config stay quick.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Tuple

from rmbgd.errors import describe

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"

# What rmbgd itself imports, as (module, distribution). isal is optional (a faster zlib).
CORE_PACKAGES = (
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("huggingface_hub", "huggingface-hub"),
    ("safetensors", "safetensors"),
    ("numpy", "numpy"),
    ("PIL", "pillow"),
    ("pillow_heif", "pillow-heif"),
    ("yaml", "pyyaml"),
    ("structlog", "structlog"),
    ("watchdog", "watchdog"),
)
# What model code commonly imports beyond torch; looked for in the model's own .py files.
MODEL_CODE_PACKAGES = ("timm", "kornia", "einops", "torchvision")
# Without the model's code at hand (a hub model not yet cached), its name decides.
_BIREFNET_NAME_RE = re.compile(r"birefnet|rmbg", re.IGNORECASE)
_IMPORT_RE = re.compile(r"^\s*(?:import|from)\s+([A-Za-z_]\w*)", re.MULTILINE)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_INOTIFY = Path("/proc/sys/fs/inotify")
_NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")

# The generated images of the pipeline run: a red square (opaque for the stand-in) on blue.
PIPELINE_IMAGES = 12
_IMAGE_SIZE = (320, 240)


@dataclass(frozen=True)
class Result:
    status: str  # OK, WARN, FAIL or SKIP
    name: str
    text: str

    def line(self) -> str:
        return f"{self.status:<4} {self.name}: {self.text}"


# --------------------------------------------------------------------------- entry point


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
    if _importable("torch"):
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
    if _importable("torch") and _importable("transformers"):
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


# --------------------------------------------------------------------------- packages


def check_packages(model_cfg: Any) -> Result:
    from rmbgd.model.hub import missing_packages_hint

    found, missing = [], []
    needed = [module for module, _ in CORE_PACKAGES] + list(model_code_packages(model_cfg))
    for module in needed:
        if _importable(module):
            found.append(f"{module} {_version(module)}")
        else:
            missing.append(_DISTRIBUTION.get(module, module))
    if missing:
        return Result(FAIL, "packages", f"missing {', '.join(missing)}: {missing_packages_hint(missing)}")
    return Result(OK, "packages", ", ".join(found))


_DISTRIBUTION = dict(CORE_PACKAGES)


def model_code_packages(model_cfg: Any) -> Tuple[str, ...]:
    """The packages the model's own code imports, of those rmbgd does not install itself."""
    folder = _model_code_folder(model_cfg)
    if folder is not None:
        imported = set()
        for code in folder.glob("*.py"):
            try:
                imported.update(_IMPORT_RE.findall(code.read_text(encoding="utf-8", errors="replace")))
            except OSError:
                continue
        return tuple(name for name in MODEL_CODE_PACKAGES if name in imported)
    if _BIREFNET_NAME_RE.search(model_cfg.name):
        from rmbgd.model.hub import BIREFNET_EXTRA_PACKAGES

        return tuple(BIREFNET_EXTRA_PACKAGES) + ("torchvision",)
    return ()


def _model_code_folder(model_cfg: Any) -> Optional[Path]:
    from rmbgd.model.hub import is_local_path

    if is_local_path(model_cfg.name):
        path = Path(model_cfg.name).expanduser()
        return path if path.is_dir() else None
    cached = _cached_file(model_cfg, "config.json")
    return Path(cached).parent if cached else None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _version(module: str) -> str:
    try:
        return importlib.metadata.version(_DISTRIBUTION.get(module, module))
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


# --------------------------------------------------------------------------- device


def cuda_unavailable_reason(
    *, cuda_build: Optional[str], visible_devices: Optional[str], driver: Optional[str], error: Optional[str]
) -> str:
    """Why torch sees no GPU, and what to do, from the facts `_cuda_facts` gathers.

    `cuda_build` is torch.version.cuda (None for a CPU-only wheel), `visible_devices` the
    CUDA_VISIBLE_DEVICES variable (None when unset), `driver` the NVIDIA driver's version
    (None when no driver is loaded) and `error` what initialising CUDA said.
    """
    if cuda_build is None:
        return (
            "this torch is a CPU-only build; for the GPU, install a CUDA build of torch "
            "(PyTorch's install selector gives the command)"
        )
    if visible_devices is not None and visible_devices.strip() in ("", "-1", "none", "NoDevFiles"):
        return f"CUDA_VISIBLE_DEVICES is {visible_devices!r}, which hides every GPU; unset it or name a GPU"
    if driver is None:
        return (
            f"no NVIDIA driver is loaded ({_NVIDIA_DRIVER} is missing); install the driver, "
            "or in a container give it the GPU (e.g. docker run --gpus all)"
        )
    detail = f": {error}" if error else ""
    return f"NVIDIA driver {driver} is loaded but CUDA {cuda_build} (torch's build) did not start{detail}"


def _cuda_facts(torch: Any) -> Dict[str, Optional[str]]:
    driver = None
    try:
        match = re.search(r"Kernel Module\s+(\S+)", _NVIDIA_DRIVER.read_text())
        driver = match.group(1) if match else "(unknown version)"
    except OSError:
        pass
    error = None
    if torch.version.cuda is not None:
        try:
            torch.cuda.init()
        except Exception as exc:  # noqa: BLE001 - whatever CUDA says is the reason shown
            error = " ".join(str(exc).split())[:300]
    return {
        "cuda_build": torch.version.cuda,
        "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "driver": driver,
        "error": error,
    }


def check_device(spec: str) -> Tuple[Result, Optional[str], Optional[Result]]:
    """(the device line, the device the pipeline run should use, the GPU line or None)."""
    import torch

    build = f"torch {torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only build'})"
    wanted = spec.strip().lower()
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        index = int(wanted.split(":")[1]) if wanted.startswith("cuda:") else 0
        if index >= count:
            return (
                Result(FAIL, "device", f"{build}; model.device: {wanted} but only {count} GPU(s) are visible"),
                "cpu",
                None,
            )
        device = "cpu" if wanted == "cpu" else f"cuda:{index}"
        return Result(OK, "device", f"{build}; using {device} (model.device: {wanted})"), device, _gpu_line(torch, index)
    reason = cuda_unavailable_reason(**_cuda_facts(torch))
    if wanted.startswith("cuda"):
        return Result(FAIL, "device", f"{build}; model.device: {wanted} but CUDA is not available: {reason}"), "cpu", None
    status = OK if wanted == "cpu" else WARN
    return Result(status, "device", f"{build}; using the CPU (CUDA is not available: {reason})"), "cpu", None


def _gpu_line(torch: Any, index: int) -> Result:
    props = torch.cuda.get_device_properties(index)
    capability = (props.major, props.minor)
    # fp16 arithmetic at full speed from compute capability 5.3 on; tensor cores from 7.0.
    fp16 = "fp16 yes" + (" (tensor cores)" if capability >= (7, 0) else "") if capability >= (5, 3) else "fp16 no"
    bf16 = "bf16 yes" if torch.cuda.is_bf16_supported() else "bf16 no"
    free, total = torch.cuda.mem_get_info(index)
    return Result(
        OK,
        "gpu",
        f"{props.name}, {total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free), compute capability "
        f"{props.major}.{props.minor}, {fp16}, {bf16}",
    )


# --------------------------------------------------------------------------- model


def check_model(model_cfg: Any) -> Result:
    from rmbgd.model.hub import is_local_path

    name = model_cfg.name
    if is_local_path(name):
        problem = local_model_problem(Path(name).expanduser(), model_cfg.trust_remote_code)
        if problem:
            return Result(FAIL, "model", f"model.name: {name}: {problem}")
        return Result(OK, "model", f"local folder {name} (config.json, code and weights present)")
    cached = _cached_file(model_cfg, "config.json")
    if cached:
        folder = Path(cached).parent
        problem = local_model_problem(folder, model_cfg.trust_remote_code)
        if problem:
            return Result(FAIL, "model", f"{name} in this machine's Hugging Face cache ({folder}): {problem}")
        return Result(OK, "model", f"{name} is in this machine's Hugging Face cache ({folder})")
    from rmbgd.model.hub import cache_dir, offline_mode

    fetch = (
        f"run `rmbgd fetch-model --config PATH` on a machine that can reach the Hugging Face hub, then "
        f"copy its cache to {cache_dir()} here, or use `--to DIR` and set model.name to that folder"
    )
    missing = f"{name} is not in this machine's Hugging Face cache ({cache_dir()})"
    if offline_mode():
        return Result(FAIL, "model", f"{missing} and HF_HUB_OFFLINE is set: {fetch}")
    from rmbgd.model.hub import ModelLoadError, probe_hub

    # One quick request for config.json's metadata, as `rmbgd run` makes first; nothing is downloaded.
    try:
        unreachable = probe_hub(name, getattr(model_cfg, "revision", None))
    except ModelLoadError as exc:
        return Result(FAIL, "model", str(exc))
    if unreachable is not None:
        return Result(FAIL, "model", f"{missing} and the hub is out of reach ({unreachable}): {fetch}")
    return Result(WARN, "model", f"{missing}; `rmbgd run` will download it from the hub at its first start")


def local_model_problem(folder: Path, trust_remote_code: bool) -> Optional[str]:
    """What is missing for rmbgd to load the model folder, or None when it looks complete."""
    if not folder.is_dir():
        return "the folder does not exist" if not folder.exists() else "not a folder"
    config_file = folder / "config.json"
    if not config_file.is_file():
        return "no config.json (not a transformers model folder; `rmbgd fetch-model --to DIR` makes one)"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"config.json cannot be read: {exc}"
    if not isinstance(config, dict):
        return "config.json is not a JSON object"
    auto_map = config.get("auto_map")
    if isinstance(auto_map, dict) and auto_map:
        if not trust_remote_code:
            return "the model ships its own code (auto_map) but model.trust_remote_code is false"
        for reference in auto_map.values():
            reference = reference[0] if isinstance(reference, list) and reference else reference
            if isinstance(reference, str) and "--" not in reference:
                module = reference.rsplit(".", 1)[0]
                if not (folder / f"{module}.py").is_file():
                    return f"config.json's auto_map names {module}.py, which is missing"
    elif not config.get("model_type"):
        return "config.json has neither auto_map nor model_type: transformers cannot tell which model it is"
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        return f"no weights ({' or '.join(_WEIGHT_FILES[::2])})"
    return None


def _cached_file(model_cfg: Any, filename: str) -> Optional[str]:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(model_cfg.name, filename, revision=getattr(model_cfg, "revision", None))
    except (HFValidationError, ValueError, OSError):
        return None
    return found if isinstance(found, str) else None


# --------------------------------------------------------------------------- folders and inotify


def check_folders(cfg: Any) -> List[Result]:
    from rmbgd.config import check_folders as config_folder_problems

    problems = config_folder_problems(cfg)
    if problems:
        return [Result(FAIL, "folders", problem) for problem in problems]
    inbox = cfg.paths.inbox
    foreign = _other_filesystems(inbox)
    if foreign:
        return [
            Result(
                FAIL,
                "folders",
                f"paths.inbox: {foreign} is on another filesystem than the inbox, whose work area "
                f"({inbox / '.rmbgd' / 'work'}) files are renamed into: files there would fail to be claimed; "
                "keep the whole inbox on one filesystem",
            )
        ]
    missing = [f"{key} ({path})" for key, path in _folder_items(cfg) if not path.exists()]
    text = "writable, none inside another; the inbox and its work area on one filesystem"
    if missing:
        return [Result(OK, "folders", f"{text}; to be created at start: {', '.join(missing)}")]
    return [Result(OK, "folders", text)]


def _folder_items(cfg: Any) -> List[Tuple[str, Path]]:
    paths = cfg.paths
    items = [("paths.inbox", paths.inbox), ("paths.outbox", paths.outbox), ("paths.errors", paths.errors)]
    if paths.done is not None:
        items.append(("paths.done", paths.done))
    return items


def _inbox_folders(inbox: Path) -> Iterator[Tuple[Path, int]]:
    """(folder, st_dev) for the inbox and every folder below it, links not followed."""
    try:
        yield inbox, os.stat(inbox).st_dev
    except OSError:
        return
    stack = [inbox]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                    yield Path(entry.path), entry.stat(follow_symlinks=False).st_dev
            except OSError:
                continue


def _other_filesystems(inbox: Path) -> Optional[Path]:
    root_dev = None
    for folder, dev in _inbox_folders(inbox):
        if root_dev is None:
            root_dev = dev
        elif dev != root_dev:
            return folder
    return None


def check_inotify(cfg: Any, limits: Path = _INOTIFY) -> Result:
    if cfg.watch.polling:
        return Result(OK, "inotify", "not used (watch.polling: true)")
    if not sys.platform.startswith("linux"):
        return Result(SKIP, "inotify", "not Linux")
    watches = _read_int(limits / "max_user_watches")
    instances = _read_int(limits / "max_user_instances")
    folders = sum(1 for _ in _inbox_folders(cfg.paths.inbox))
    return inotify_verdict(folders, watches, instances)


def inotify_verdict(folders: int, watches: Optional[int], instances: Optional[int]) -> Result:
    """One watch per inbox folder; the limits are per user, shared with every other program."""
    if watches is None:
        return Result(WARN, "inotify", f"cannot read the limits in {_INOTIFY}; the inbox has {folders} folder(s)")
    text = f"the inbox has {folders} folder(s), one watch each; fs.inotify.max_user_watches = {watches}"
    if instances is not None:
        text += f", max_user_instances = {instances}"
    fix = (
        f"raise it, e.g. `sysctl fs.inotify.max_user_watches={max(524288, 4 * folders)}` (and in "
        "/etc/sysctl.d/ to keep it), or set watch.polling: true"
    )
    if folders >= watches:
        return Result(FAIL, "inotify", f"{text}: too few; {fix}")
    if instances is not None and instances < 1:
        return Result(FAIL, "inotify", f"{text}: no inotify instance allowed; raise fs.inotify.max_user_instances")
    if folders > watches // 2:
        return Result(WARN, "inotify", f"{text}: other programs share that limit; {fix}")
    return Result(OK, "inotify", text)


def _read_int(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- the pipeline


def check_pipeline(cfg: Any, device: str) -> Result:
    """Generated images through the real pipeline with the stand-in model, in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="rmbgd-doctor-") as scratch:
        try:
            return _run_pipeline(cfg, device, Path(scratch))
        except Exception as exc:  # noqa: BLE001 - the check's boundary: any failure is its result
            return Result(FAIL, "pipeline", describe(exc, limit=300))


def _run_pipeline(cfg: Any, device: str, scratch: Path) -> Result:
    from rmbgd.model import standin
    from rmbgd.ops import logs
    from rmbgd.runtime import oneshot
    from rmbgd.runtime.daemon import StartupError

    inputs = _generate_images(scratch / "in", PIPELINE_IMAGES)
    model_dir = standin.build(scratch / "model")
    model = dataclasses.replace(
        cfg.model, name=str(model_dir), device=device, revision=None, trust_remote_code=True, backend="torch",
        compile=False,
    )
    if device == "cpu" and model.dtype == "float16":
        model = dataclasses.replace(model, dtype="auto")
    run_cfg = dataclasses.replace(cfg, model=model)
    records: List[Dict[str, Any]] = []
    logs.configure("info", stream=_RecordSink(records.append))
    log = logs.get_logger()
    work = oneshot.plan([str(scratch / "in")], out=str(scratch / "out"))
    runner = oneshot.Runner(run_cfg, work, log, oneshot.Report())
    try:
        code = runner.run()
    except StartupError as exc:
        return Result(FAIL, "pipeline", f"the stand-in model did not load: {exc}")
    summary = next((r for r in records if r.get("event") == "summary"), {})
    failed = [r for r in records if r.get("event") == "file_failed"]
    if code != 0 or failed or summary.get("processed") != len(inputs):
        why = failed[0].get("error") if failed else f"exit {code}, {summary.get('processed')} of {len(inputs)} done"
        return Result(FAIL, "pipeline", f"the run on {len(inputs)} generated images failed: {why}")
    wrong = _wrong_result(run_cfg, scratch / "out")
    if wrong:
        return Result(FAIL, "pipeline", wrong)
    return Result(
        OK,
        "pipeline",
        f"{len(inputs)} generated images (JPEG, PNG, HEIC) decoded, batched, segmented by a stand-in model "
        f"on {device}, encoded and published in {summary.get('seconds')} s: {summary.get('images_per_s')} images/s "
        f"(batch.size {cfg.batch.size}; the real model is much slower)",
    )


def _generate_images(folder: Path, count: int) -> List[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    width, height = _IMAGE_SIZE
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:] = (10, 60, 200)
    rgb[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = (250, 40, 20)
    image = Image.fromarray(rgb)
    formats = [("jpg", {"quality": 95}), ("png", {})]
    if _importable("pillow_heif"):
        import pillow_heif

        pillow_heif.register_heif_opener()
        formats.append(("heic", {"quality": 90}))
    paths = []
    for index in range(count):
        suffix, params = formats[index % len(formats)]
        path = folder / f"doctor-{index:02d}.{suffix}"
        image.save(path, **params)
        paths.append(path)
    return paths


def _wrong_result(cfg: Any, out: Path) -> Optional[str]:
    """Why the first result does not show the stand-in's mask, or None (only for plain RGBA outputs)."""
    from PIL import Image

    output = cfg.output
    if output.format not in ("png", "webp") or output.background is not None or output.crop or output.max_size:
        return None
    if cfg.profiles or output.mask != "none":
        return None
    results = sorted(out.glob("doctor-00.*"))
    if not results:
        return f"no result written for doctor-00 in {out}"
    with Image.open(results[0]) as im:
        if im.size != _IMAGE_SIZE or im.mode != "RGBA":
            return f"result is {im.mode} {im.size[0]}x{im.size[1]}, expected RGBA {_IMAGE_SIZE[0]}x{_IMAGE_SIZE[1]}"
        inside = im.getpixel((_IMAGE_SIZE[0] // 2, _IMAGE_SIZE[1] // 2))[3]
        outside = im.getpixel((4, 4))[3]
    if inside < 200 or outside > 55:
        return f"the result's mask is wrong (alpha {inside} on the subject, {outside} on the background)"
    return None


class _RecordSink:
    """A text stream for the JSON log that hands each record to `on_record` instead of printing it."""

    def __init__(self, on_record: Callable[[Dict[str, Any]], None]) -> None:
        self._on_record = on_record

    def write(self, text: str) -> int:
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                self._on_record(record)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


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
