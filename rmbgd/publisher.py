"""Where finished work goes: results to the outbox, originals to done/, failures to errors/.

Delivering a result is journalled so that a crash at any point (SIGKILL, power loss) can
be finished on restart without a duplicate output and without losing the original:

1. each output (the result, and its mask when asked for) is written to a hidden temp file
   in the target folder and fsynced;
2. an intent (the temps' names and inodes) is written next to the claim in the work area;
3. each temp is hard-linked to its final name (x.png, or x-1.png if taken; x-1.mask.png
   after it) and unlinked;
4. the original leaves the work area (to done/, or deleted);
5. the intent is removed.

On restart `resume` reads a left-over intent: if the result's final name already holds its
temp's inode, or the temp still exists, the rest of step 3 (names already given are found
by inode, not given twice) and steps 4–5 remain; if neither, nothing was published and the
file is simply processed again.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import List, Optional, Sequence, Tuple

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
from rmbgd.render import OutputFile
from rmbgd.workarea import Claim


@dataclass(frozen=True)
class Delivery:
    output: Path
    original: Optional[Path]  # where the original went; None when deleted
    extra: Tuple[Path, ...] = ()  # files published next to the output (its mask)


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
    def deliver(self, claim: Claim, files: Sequence[OutputFile]) -> Delivery:
        """Publish `files` (the result first, then e.g. its mask) as the claim's outputs and
        retire the original (see module doc)."""
        if not files:
            raise ValueError("nothing to deliver")
        finished = self.resume(claim)
        if finished is not None:
            return finished
        target = self.output_target(claim.rel, files[0].suffix)
        self._require_root(self._paths.outbox)
        target.parent.mkdir(parents=True, exist_ok=True)
        temps: List[Path] = []
        try:
            for item in files:
                temps.append(write_temp(item.data, target.parent, self._owner))
            entries = []
            for item, temp in zip(files, temps):
                st = os.stat(temp)
                entries.append({"temp": os.fsdecode(temp), "suffix": item.suffix,
                                "ino": st.st_ino, "dev": st.st_dev})
            self._write_intent(claim, {"target": os.fsdecode(target), "files": entries})
            outputs = self._link_all(target, entries)
            assert outputs is not None, "the temps were written just now"
        finally:
            for temp in temps:
                temp.unlink(missing_ok=True)
        fsync_dir(target.parent)
        return Delivery(output=outputs[0], original=self._retire(claim), extra=tuple(outputs[1:]))

    def resume(self, claim: Claim) -> Optional[Delivery]:
        """Finish a delivery a crash interrupted; None when there is none (or nothing was
        published, in which case the claim is simply processed again)."""
        intent = self._read_intent(claim)
        if intent is None:
            return None
        target = Path(intent["target"])
        entries = intent.get("files")
        if entries is None:
            # Written by a version that published one file per input.
            entries = [{"temp": intent["temp"], "suffix": "", "ino": intent["ino"], "dev": intent["dev"]}]
        first = entries[0]
        published = find_linked(target, first["ino"], first["dev"]) is not None
        outputs: Optional[List[Path]] = None
        if published or os.path.lexists(first["temp"]):
            outputs = self._link_all(target, entries)
        for entry in entries:
            Path(entry["temp"]).unlink(missing_ok=True)
        if not outputs:
            claim.intent.unlink(missing_ok=True)
            return None
        fsync_dir(target.parent)
        return Delivery(output=outputs[0], original=self._retire(claim), extra=tuple(outputs[1:]))

    @staticmethod
    def _link_all(target: Path, entries: List[dict]) -> Optional[List[Path]]:
        """Give each temp its final name; a repeat after a crash finds the names already given.

        The result takes the first free name among x.png, x-1.png, …; the files after it are
        named after the name it got (x-1.png → x-1.mask.png), so they stay recognisably a pair.
        None when a file can no longer be completed (its temp was cleaned up by another
        instance before it was linked): what was published is withdrawn, so the input is
        processed again in full rather than left with half its outputs.
        """
        outputs: List[Path] = []
        for index, entry in enumerate(entries):
            if index == 0:
                wanted = target
            else:
                name = outputs[0].name
                stem = name[: len(name) - len(target.suffix)] if target.suffix else name
                wanted = outputs[0].with_name(shorten_name(stem, entry["suffix"]))
            found = find_linked(wanted, entry["ino"], entry["dev"])
            if found is None and not os.path.lexists(entry["temp"]):
                for published in outputs:
                    published.unlink(missing_ok=True)
                return None
            if found is None:
                found = link_unique(Path(entry["temp"]), wanted)
            outputs.append(found)
        return outputs

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
