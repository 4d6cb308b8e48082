"""Finishing what a crashed predecessor, or a peer that died, left half done.

Claimed files whose delivery had begun (an intent in the work area) are completed; the rest
go through the pipeline again. Before `ready`, this instance's own leftovers and orphaned
temp files; at each rescan, the claims of dead peers sharing the inbox.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, List

from rmbgd.config import PathsConfig
from rmbgd.errors import describe
from rmbgd.intake.filekinds import special_file_reason
from rmbgd.intake.workarea import Claim, WorkArea
from rmbgd.output.fsops import remove_orphan_temps
from rmbgd.output.publisher import Publisher


class Recovery:
    def __init__(self, paths: PathsConfig, work: WorkArea, publisher: Publisher, log: Any,
                 start_job: Callable[[Claim], Any]) -> None:
        self._paths = paths
        self._work = work
        self._publisher = publisher
        self._log = log
        self._start_job = start_job

    def at_start(self) -> None:
        """Before `ready`: finish what a crashed predecessor (or dead peer) left half done."""
        started = time.monotonic()
        try:
            claims = self._work.recover(on_error=self._adopt_failed)
        except OSError as exc:
            # The work area's filesystem failed mid-way: start anyway; what is left in a dead
            # instance's folder is adopted at the next rescan.
            self._log.error("recover_failed", error=describe(exc))
            claims = []
        finished = self._take_over(claims)
        removed = 0
        for root in (self._paths.outbox, self._paths.errors, self._paths.done):
            if root is not None:
                removed += remove_orphan_temps(root, self._work.is_dead)
        if claims or removed:
            self._log.info(
                "recovered",
                files=len(claims),
                finished=finished,
                requeued=len(claims) - finished,
                temp_files_removed=removed,
                ms=round((time.monotonic() - started) * 1000.0, 1),
            )

    def adopt_dead_peers(self) -> None:
        # A peer sharing this inbox died (its lock is free): take over its claimed files now
        # rather than waiting for some instance to restart.
        try:
            adopted = self._work.adopt_dead_peers(on_error=self._adopt_failed)
        except OSError as exc:
            # The work area itself is unreadable right now; the next rescan tries again.
            self._adopt_failed(self._work.root, exc)
            return
        if adopted:
            finished = self._take_over(adopted)
            self._log.info("adopted", files=len(adopted), finished=finished)

    def _take_over(self, claims: List[Claim]) -> int:
        """Complete interrupted deliveries, queue the rest; returns how many were completed."""
        finished = 0
        for claim in claims:
            if special_file_reason(claim.path) is not None:
                # No delivery of ours ever started from a link or a FIFO: its intent, if
                # any, was not written by us; the entry goes to errors/ as it is.
                self._start_job(claim)
                continue
            try:
                delivery = self._publisher.resume(claim)
            except OSError as exc:
                # Folders unusable right now: process it normally; the pipeline retries.
                self._log.warning("resume_failed", input=str(self._paths.inbox / claim.rel), error=str(exc))
                delivery = None
            except Exception:  # per-file boundary: one odd leftover must not stop the start
                self._log.error("resume_failed", input=str(self._paths.inbox / claim.rel), exc_info=True)
                delivery = None
            if delivery is None:
                self._start_job(claim)
                continue
            finished += 1
            self._work.release_dirs(claim)
            self._log.info(
                "file_done",
                input=str(self._paths.inbox / claim.rel),
                output=str(delivery.output),
                original=str(delivery.original) if delivery.original is not None else "deleted",
                **({"also": [str(path) for path in delivery.extra]} if delivery.extra else {}),
                recovered=True,
            )
        return finished

    def _adopt_failed(self, path: Path, exc: OSError) -> None:
        self._log.warning("adopt_failed", path=str(path), error=describe(exc),
                          note="left where it is; tried again at the next rescan")
