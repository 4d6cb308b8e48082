"""Where finished work goes: results to the outbox, originals to done/, failures to errors/."""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Optional

from rmbgd import __version__
from rmbgd.config import PathsConfig
from rmbgd.fsops import move_unique, publish_bytes, remove_file


@dataclass(frozen=True)
class Rejection:
    moved_to: Path
    sidecar: Path


class Publisher:
    def __init__(self, paths: PathsConfig, owner: str) -> None:
        self._paths = paths
        self._owner = owner

    def output_target(self, rel: PurePath, suffix: str = ".png") -> Path:
        return self._paths.outbox / rel.with_suffix(suffix)

    def publish(self, rel: PurePath, data: bytes, suffix: str = ".png") -> Path:
        return publish_bytes(data, self.output_target(rel, suffix), self._owner)

    def retire(self, rel: PurePath, claimed: Path) -> Optional[Path]:
        """Move the original to done/ (returns where) or delete it when done is null (None)."""
        if self._paths.done is None:
            remove_file(claimed)
            return None
        return move_unique(claimed, self._paths.done / rel, self._owner)

    def reject(self, rel: PurePath, claimed: Path, *, stage: str, error: str) -> Rejection:
        """Move the input unchanged to errors/ and write the sidecar next to it."""
        moved_to = move_unique(claimed, self._paths.errors / rel, self._owner)
        record = {
            "input": str(self._paths.inbox / rel),
            "error": error,
            "stage": stage,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
            "moved_to": str(moved_to),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "rmbgd_version": __version__,
        }
        data = (json.dumps(record, indent=2, ensure_ascii=True) + "\n").encode()
        sidecar_target = moved_to.with_name(moved_to.name + ".error.json")
        # The moved file's name is ours alone, so its sidecar name is free unless a stale one
        # was left by hand; publish_bytes then picks a -N name rather than replacing it.
        sidecar = publish_bytes(data, sidecar_target, self._owner)
        return Rejection(moved_to=moved_to, sidecar=sidecar)
