"""Where finished work goes: results to the outbox, originals to done/, failures to errors/.

Delivering a result is journalled so that a crash at any point (SIGKILL, power loss) can
be finished on restart without a duplicate output and without losing the original:

1. the PNG is written to a hidden temp file in the target folder and fsynced;
2. an intent (the temp's name and inode) is written next to the claim in the work area;
3. the temp is hard-linked to its final name (x.png, or x-1.png if taken) and unlinked;
4. the original leaves the work area (to done/, or deleted);
5. the intent is removed.

On restart `resume` reads a left-over intent: if the final name already holds the temp's
inode, only steps 4–5 remain; if the temp still exists, steps 3–5; if neither, nothing was
published and the file is simply processed again.
"""

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
from rmbgd.fsops import (
    find_linked,
    fsync_dir,
    link_unique,
    move_unique,
    place_unique,
    publish_bytes,
    remove_file,
    shorten_name,
    write_file_durably,
    write_temp,
)
from rmbgd.workarea import Claim


@dataclass(frozen=True)
class Delivery:
    output: Path
    original: Optional[Path]  # where the original went; None when deleted


@dataclass(frozen=True)
class Rejection:
    moved_to: Path
    sidecar: Path


class OutboxMissing(FileNotFoundError):
    """A configured root folder vanished (unmounted, deleted): wait for it, do not recreate it
    on whatever filesystem lies underneath."""


class Publisher:
    def __init__(self, paths: PathsConfig, owner: str) -> None:
        self._paths = paths
        self._owner = owner

    def output_target(self, rel: PurePath, suffix: str = ".png") -> Path:
        # A name at NAME_MAX with a short or no extension would outgrow it as .png.
        return self._paths.outbox / rel.parent / shorten_name(PurePath(rel.name).stem, suffix)

    # -- success ----------------------------------------------------------------------------
    def deliver(self, claim: Claim, data: bytes, suffix: str = ".png") -> Delivery:
        """Publish `data` as the claim's output and retire the original (see module doc)."""
        finished = self.resume(claim)
        if finished is not None:
            return finished
        target = self.output_target(claim.rel, suffix)
        self._require_root(self._paths.outbox)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = write_temp(data, target.parent, self._owner)
        try:
            st = os.stat(temp)
            self._write_intent(claim, {"temp": os.fsdecode(temp), "target": os.fsdecode(target),
                                       "ino": st.st_ino, "dev": st.st_dev})
            output = link_unique(temp, target)
        finally:
            temp.unlink(missing_ok=True)
        fsync_dir(output.parent)
        return Delivery(output=output, original=self._retire(claim))

    def resume(self, claim: Claim) -> Optional[Delivery]:
        """Finish a delivery a crash interrupted; None when there is none (or nothing was
        published, in which case the claim is simply processed again)."""
        intent = self._read_intent(claim)
        if intent is None:
            return None
        temp, target = Path(intent["temp"]), Path(intent["target"])
        output = find_linked(target, intent["ino"], intent["dev"])
        if output is None and os.path.lexists(temp):
            output = link_unique(temp, target)
            fsync_dir(output.parent)
        temp.unlink(missing_ok=True)
        if output is None:
            claim.intent.unlink(missing_ok=True)
            return None
        return Delivery(output=output, original=self._retire(claim))

    def _retire(self, claim: Claim) -> Optional[Path]:
        if self._paths.done is None:
            remove_file(claim.path)
            original = None
        else:
            self._require_root(self._paths.done)
            original = move_unique(claim.path, self._paths.done / claim.rel, self._owner)
        claim.intent.unlink(missing_ok=True)
        return original

    # -- failure ----------------------------------------------------------------------------
    def reject(self, claim: Claim, *, stage: str, error: str) -> Rejection:
        """Move the input unchanged to errors/ and write the sidecar next to it.

        The input gets its errors/ name first, then the sidecar, and only then leaves the
        work area, so a crash in between repeats the step instead of leaving an input
        without its reason (placing the same file again reuses its name).
        """
        self._require_root(self._paths.errors)
        moved_to = place_unique(claim.path, self._paths.errors / claim.rel, self._owner)
        record = {
            "input": os.fsdecode(self._paths.inbox / claim.rel),
            "error": error,
            "stage": stage,
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
            "moved_to": os.fsdecode(moved_to),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "rmbgd_version": __version__,
        }
        data = (json.dumps(record, indent=2, ensure_ascii=True) + "\n").encode()
        sidecar_target = moved_to.with_name(_sidecar_name(moved_to.name))
        old_sidecar = _read_json(sidecar_target)
        if old_sidecar is not None and old_sidecar.get("moved_to") == record["moved_to"]:
            # A repeat after a crash: the sidecar for this very file is already there.
            sidecar = sidecar_target
        else:
            sidecar = publish_bytes(data, sidecar_target, self._owner)
        remove_file(claim.path)
        claim.intent.unlink(missing_ok=True)
        return Rejection(moved_to=moved_to, sidecar=sidecar)

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _require_root(root: Path) -> None:
        if not root.is_dir():
            raise OutboxMissing(f"{root} does not exist (deleted or unmounted?)")

    def _write_intent(self, claim: Claim, intent: dict) -> None:
        path = claim.intent
        temp = path.with_name(path.name + ".new")
        temp.unlink(missing_ok=True)
        write_file_durably(temp, json.dumps(intent).encode())
        os.replace(temp, path)
        fsync_dir(path.parent)

    @staticmethod
    def _read_intent(claim: Claim) -> Optional[dict]:
        return _read_json(claim.intent)


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # torn by a crash before its rename: it never took effect


def _sidecar_name(name: str) -> str:
    # An input name already at NAME_MAX loses the end of its stem, never the suffix.
    return shorten_name(name, ".error.json")
