"""Where `rmbgd process` puts its results: atomically into --out, originals left or moved to --done."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, List, Optional, Sequence

from rmbgd.batching.outcomes import PublishError
from rmbgd.intake.workarea import default_instance_name
from rmbgd.output.files import companion_target, result_target
from rmbgd.output.fsops import NAME_ERRNOS, move_unique, publish_bytes
from rmbgd.output.publisher import Delivery
from rmbgd.runtime.plan import Source

# A write that keeps failing (disk full, a file where a folder should be) fails the file after
# this many tries instead of being retried forever as in the daemon: nobody may be watching.
WRITE_ATTEMPTS = 3

@dataclass(frozen=True)
class Kept:
    """A failed input: left where it was; the reason is in the log and the summary."""

    moved_to: Path
    sidecar: Optional[Path] = None


class WriteFailed(PublishError):
    """Writing a result kept failing: the pipeline fails the file (it retries OSErrors forever)."""


class OneShotPublisher:
    """Results into `out` (mirroring `rel`), originals left alone or moved to `done`.

    Each file appears atomically under a name nothing else holds (x.png, x-1.png, …), so a
    second run, or two inputs x.jpg and x.png, never overwrite a result.
    """

    def __init__(self, out: Path, done: Optional[Path], owner: str) -> None:
        self._out = out
        self._done = done
        self._owner = owner

    def deliver(self, source: Source, files: Sequence[Any]) -> Delivery:
        if not files:
            raise ValueError("nothing to deliver")
        try:
            if source.outputs is None:
                source.outputs = self._publish(source.rel, files)
            original = self._retire(source)
        except OSError as exc:
            source.write_failures += 1
            if exc.errno in NAME_ERRNOS or source.write_failures < WRITE_ATTEMPTS:
                raise  # the pipeline fails a bad name at once and retries the rest
            raise WriteFailed(f"{_describe_os_error(exc)} (tried {WRITE_ATTEMPTS} times)") from exc
        return Delivery(output=source.outputs[0], original=original, extra=tuple(source.outputs[1:]))

    def reject(self, source: Source, *, stage: str, error: str) -> Kept:
        return Kept(moved_to=source.path)

    def _publish(self, rel: PurePath, files: Sequence[Any]) -> List[Path]:
        first = files[0]
        result = publish_bytes(first.data, result_target(self._out, rel, first.suffix), self._owner)
        outputs = [result]
        for item in files[1:]:
            outputs.append(publish_bytes(item.data, companion_target(result, first.suffix, item.suffix), self._owner))
        return outputs

    def _retire(self, source: Source) -> Path:
        if self._done is None:
            return source.path
        return move_unique(source.path, self._done / source.rel, self._owner)


def _describe_os_error(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"cannot write{where}: {exc.strerror or exc}"


def default_owner() -> str:
    # Tags temp files like the daemon's, so a crashed run's leftovers are recognisable.
    return f"process-{default_instance_name()}"
