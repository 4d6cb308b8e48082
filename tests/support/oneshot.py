"""`rmbgd process` in the test process, with the fake model of tests/support/inprocess.py.

What is real: the settings (`oneshot.load_settings`, so `--config`, `--model` and `--device`
apply as on the command line), the plan of inputs and outputs (`oneshot.plan`), the
`oneshot.Runner` with its pipeline, pools and publisher, on real folders. What is fake: the
segmenter (`FakeSegmenter`: the tiny model's mask without torch) and the retry delays
(milliseconds instead of seconds). What it leaves to the subprocess tests in test_process.py:
the command line itself, the JSON lines on stdout, the terminal, signals.

    result = process_inprocess(photos, out=tmp_path / "out", config=config)
    assert result.code == 1
    (failed,) = result.events("file_failed")
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, List, Optional
from unittest import mock

from rmbgd.batching.pipeline import Pipeline
from rmbgd.runtime import oneshot
from tests.support.inprocess import FakeSegmenter, LogCapture, fast_retry_delay


class _TestRunner(oneshot.Runner):
    def __init__(self, cfg: Any, work: oneshot.Plan, log: Any, report: oneshot.Report, segmenter: Any) -> None:
        super().__init__(cfg, work, log, report)
        self._segmenter = segmenter

    def _load_model(self) -> Any:
        self._report.loading(self.cfg.model.name)
        return self._segmenter


class ProcessResult:
    """The exit code and the log's event dicts of one run (as test_process.Result has them)."""

    def __init__(self, code: int, records: List[dict]) -> None:
        self.code = code
        self.records = records

    def events(self, name: str) -> List[dict]:
        return [r for r in self.records if r.get("event") == name]

    @property
    def summary(self) -> dict:
        (summary,) = self.events("summary")
        return summary

    def __repr__(self) -> str:
        return f"exit {self.code}\nevents:\n" + "\n".join(repr(r) for r in self.records[-30:])


def process_inprocess(*paths: Path, out: Path, done: Optional[Path] = None, config: Optional[Path] = None,
                      model: Optional[str] = None, device: Optional[str] = None, segmenter: Any = None,
                      retry_delay: Callable[[int], float] = fast_retry_delay) -> ProcessResult:
    """`rmbgd process PATH... --out OUT [--done DONE] [--config ...]` run here; the result."""
    cfg = oneshot.load_settings(None if config is None else str(config), model=model, device=device)
    work = oneshot.plan([str(p) for p in paths], out=str(out), done=None if done is None else str(done))
    log = LogCapture()
    runner = _TestRunner(cfg, work, log.logger, oneshot.Report(), segmenter or FakeSegmenter())
    with mock.patch.object(oneshot, "Pipeline", functools.partial(Pipeline, retry_delay=retry_delay)):
        code = runner.run()
    return ProcessResult(code, log.snapshot())
