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
import errno
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, List, Optional, Sequence, Tuple

from rmbgd import __version__
from rmbgd.config import PathsConfig
from rmbgd.output.fsops import (
    find_linked,
    fsync_dir,
    link_unique,
    move_unique,
    owner_of_temp,
    place_unique,
    publish_bytes,
    remove_file,
    replace_atomically,
    shorten_name,
    write_temp,
)
from rmbgd.output.files import OutputFile, companion_target, result_target
from rmbgd.intake.workarea import Claim


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


class OutputsGone(FileNotFoundError):
    """The temp files were removed before they got their final names (another instance
    cleaned them up): nothing was published; writing them again fixes it."""


class FinishingFailed(OSError):
    """The outputs are published; a step after that (moving the original to done/, removing
    a temp, syncing the folder) failed. The intent in the work area finishes it on the next
    attempt or start, so such a file is retried for as long as it takes and never sent to
    errors/ (it would then be both there and in the outbox)."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.filename = cause.filename
        self.filename2 = cause.filename2


class Publisher:
    def __init__(self, paths: PathsConfig, owner: str, log: Any = None) -> None:
        self._paths = paths
        self._owner = owner
        self._log = log

    def output_target(self, rel: PurePath, suffix: str = ".png") -> Path:
        return result_target(self._paths.outbox, rel, suffix)

    def roots_usable(self) -> bool:
        """Whether every configured output root is a folder this process may write in.

        When one is not, a permission error below it is the machine's state (an unmounted or
        locked-down share), not the destination's (see backoff.write_error_verdict)."""
        roots = [self._paths.outbox, self._paths.errors] + ([self._paths.done] if self._paths.done else [])
        return all(os.path.isdir(root) and os.access(root, os.W_OK | os.X_OK) for root in roots)

    # -- success ----------------------------------------------------------------------------
    def deliver(self, claim: Claim, files: Optional[Sequence[OutputFile]]) -> Delivery:
        """Publish `files` (the result first, then e.g. its mask) as the claim's outputs and
        retire the original (see module doc).

        An OSError before the outputs have their final names leaves nothing published (a
        result named before its mask failed is withdrawn); FinishingFailed says they are
        published and only the rest remains, which `resume` completes.
        """
        finished = self.resume(claim)
        if finished is not None:
            return finished
        if not files:
            raise ValueError("nothing to deliver")
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
            outputs = self._link_all(target, entries, withdraw_on_error=True)
        except BaseException:
            self._discard(temps)
            raise
        if outputs is None:
            self._discard(temps)
            raise OutputsGone(errno.ENOENT, "the temp files were removed before they were published",
                              os.fsdecode(target.parent))
        return self._finish(claim, target, temps, outputs)

    def resume(self, claim: Claim) -> Optional[Delivery]:
        """Finish a delivery a crash interrupted; None when there is none (or nothing was
        published, in which case the claim is simply processed again)."""
        intent = self._read_intent(claim)
        if intent is None:
            return None
        parsed = self._parse_intent(intent)
        if parsed is None:
            # Treated like a torn intent: it cannot say what was published, and nothing is
            # published under a name it does not hold, so the file is processed again.
            if self._log is not None:
                self._log.warning("intent_malformed", intent=str(claim.intent),
                                  input=os.fsdecode(self._paths.inbox / claim.rel),
                                  note="ignored; the file is processed again")
            claim.intent.unlink(missing_ok=True)
            return None
        target, entries = parsed
        first = entries[0]
        published = find_linked(target, first["ino"], first["dev"]) is not None
        outputs: Optional[List[Path]] = None
        temps = [Path(entry["temp"]) for entry in entries]
        if published:
            try:
                outputs = self._link_all(target, entries, withdraw_on_error=False)
            except OSError as exc:
                raise FinishingFailed(exc) from exc
        elif _is_temp_of(first):
            try:
                outputs = self._link_all(target, entries, withdraw_on_error=True)
            except BaseException:
                self._discard(temps)
                raise
        if not outputs:
            for temp in temps:
                temp.unlink(missing_ok=True)
            claim.intent.unlink(missing_ok=True)
            return None
        return self._finish(claim, target, temps, outputs)

    def _finish(self, claim: Claim, target: Path, temps: List[Path], outputs: List[Path]) -> Delivery:
        """Everything after the outputs got their names; repeated by `resume` until it works."""
        try:
            for temp in temps:
                temp.unlink(missing_ok=True)
            fsync_dir(target.parent)
            original = self._retire(claim)
        except OSError as exc:
            raise FinishingFailed(exc) from exc
        return Delivery(output=outputs[0], original=original, extra=tuple(outputs[1:]))

    def _parse_intent(self, intent: Any) -> Optional[Tuple[Path, List[dict]]]:
        """(target, entries) of an intent, or None when it is not one this version wrote, or
        it names files outside the outbox (the work area is as writable as the inbox, so an
        intent is never trusted to point at anything else)."""
        if not isinstance(intent, dict):
            return None
        entries = intent.get("files")
        if entries is None and "temp" in intent:
            # Written by a version that published one file per input.
            entries = [{"temp": intent.get("temp"), "suffix": "", "ino": intent.get("ino"), "dev": intent.get("dev")}]
        raw_target = intent.get("target")
        if not isinstance(raw_target, str) or not isinstance(entries, list) or not entries:
            return None
        target = Path(os.path.normpath(raw_target))
        if not target.is_relative_to(self._paths.outbox) or target == self._paths.outbox:
            return None
        for entry in entries:
            if not (isinstance(entry, dict) and isinstance(entry.get("temp"), str)
                    and isinstance(entry.get("suffix"), str)
                    and _is_int(entry.get("ino")) and _is_int(entry.get("dev"))):
                return None
            temp = Path(os.path.normpath(entry["temp"]))
            if temp.parent != target.parent or owner_of_temp(temp.name) is None:
                return None
        return target, entries

    @staticmethod
    def _link_all(target: Path, entries: List[dict], withdraw_on_error: bool) -> Optional[List[Path]]:
        """Give each temp its final name; a repeat after a crash finds the names already given.

        The result takes the first free name among x.png, x-1.png, …; the files after it are
        named after the name it got (x-1.png → x-1.mask.png), so they stay recognisably a pair.
        None when a file can no longer be completed (its temp was cleaned up by another
        instance before it was linked): what was published is withdrawn, so the input is
        processed again in full rather than left with half its outputs. An error withdraws
        the names given so far too when `withdraw_on_error` (nothing was published before).
        """
        outputs: List[Path] = []
        try:
            for index, entry in enumerate(entries):
                if index == 0:
                    wanted = target
                else:
                    wanted = companion_target(outputs[0], target.suffix, entry["suffix"])
                found = find_linked(wanted, entry["ino"], entry["dev"])
                if found is None and not _is_temp_of(entry):
                    _withdraw(outputs)
                    return None
                if found is None:
                    found = link_unique(Path(entry["temp"]), wanted)
                outputs.append(found)
        except BaseException:
            if withdraw_on_error:
                _withdraw(outputs)
            raise
        return outputs

    def _discard(self, temps: List[Path]) -> None:
        """Remove temps after a failure; one that cannot be removed now is left for the
        orphan clean-up of the next start (it is hidden and owned by this instance)."""
        for temp in temps:
            try:
                temp.unlink(missing_ok=True)
            except OSError as exc:
                if self._log is not None:
                    self._log.debug("temp_left", temp=str(temp), error=str(exc))

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
        try:
            old_sidecar = _read_json(sidecar_target)
            if isinstance(old_sidecar, dict) and old_sidecar.get("moved_to") == record["moved_to"]:
                # A repeat after a crash: the sidecar for this very file is already there.
                sidecar = sidecar_target
            else:
                sidecar = publish_bytes(data, sidecar_target, self._owner)
        except BaseException:
            # Without its sidecar the errors/ copy would outlive a later success of this
            # input (it stays claimed and may be processed again): take it back, unless it is
            # the only copy (placed by rename where hard links are not supported).
            if os.path.lexists(claim.path):
                self._discard([moved_to])
            raise
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
        replace_atomically(path, json.dumps(intent).encode(), temp=path.with_name(path.name + ".new"))

    @staticmethod
    def _read_intent(claim: Claim) -> Optional[dict]:
        return _read_json(claim.intent)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_temp_of(entry: dict) -> bool:
    """Whether the entry's temp still exists as the very file the intent recorded."""
    try:
        st = os.lstat(entry["temp"])
    except FileNotFoundError:
        return False
    return (st.st_ino, st.st_dev) == (entry["ino"], entry["dev"])


def _withdraw(outputs: List[Path]) -> None:
    for published in reversed(outputs):
        published.unlink(missing_ok=True)


def _read_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (ValueError, RecursionError):
        return None  # torn by a crash before its rename: it never took effect


def _sidecar_name(name: str) -> str:
    # An input name already at NAME_MAX loses the end of its stem, never the suffix.
    return shorten_name(name, ".error.json")
