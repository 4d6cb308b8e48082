"""How many CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota.

`os.cpu_count()` counts the host's CPUs, but a container (`docker --cpus=2`), a systemd unit
(`CPUQuota=200%`) or `taskset` may give rmbgd far fewer; sizing thread pools by the host count
then only adds contention. Both the decode/encode pools (config.effective_workers) and the
model's CPU threads follow this count.

The arithmetic is one pure function of what the kernel reports (usable_cpus); the file reading
is kept apart (available_cpus) so the rules can be tested on literal file contents.
"""

from __future__ import annotations

import math
import os
from pathlib import Path, PurePosixPath
from typing import Collection, Iterable, List, Optional, Tuple

__all__ = ["available_cpus", "cgroup_cpu_dirs", "usable_cpus"]


def usable_cpus(
    affinity: Optional[Collection[int]],
    cpu_max: Iterable[str] = (),
    cfs: Iterable[Tuple[str, str]] = (),
    online: Optional[int] = None,
) -> int:
    """CPUs this process can keep busy at once; always at least 1.

    affinity: the set `os.sched_getaffinity(0)` returns, None where there is none (then
    `online`, the host's count, is used). cpu_max: the text of cgroup v2 `cpu.max` files
    ("max 100000" or "QUOTA PERIOD"), of the process's cgroup and of its ancestors, since a
    parent's limit applies too. cfs: (cpu.cfs_quota_us, cpu.cfs_period_us) texts of cgroup v1
    ("-1" is no limit). A quota of 1.5 CPUs counts as 2: threads that wait part of the time
    still use the half. A file that does not parse counts as no limit: a strange kernel must
    not stop the daemon from starting.
    """
    count = len(affinity) if affinity else (online or 1)
    quotas: List[float] = []
    for text in cpu_max:
        fields = text.split()
        if len(fields) == 2:
            quotas.extend(_ratio(fields[0], fields[1]))
    for quota, period in cfs:
        quotas.extend(_ratio(quota.strip(), period.strip()))
    if quotas:
        count = min(count, math.ceil(min(quotas)))
    return max(1, count)


def _ratio(quota: str, period: str) -> List[float]:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return []  # "max" (v2) or junk: no limit
    return [q / p] if q > 0 and p > 0 else []  # v1 says -1 for none


def cgroup_cpu_dirs(proc_cgroup: str, mountinfo: str) -> Tuple[List[Path], List[Path]]:
    """The folders whose CPU limits apply to this process, innermost first: (v2, v1).

    proc_cgroup: the text of /proc/self/cgroup; mountinfo: of /proc/self/mountinfo. A cgroup
    path is relative to its hierarchy's root, which is mounted at some point with some root of
    its own (inside a container, often the container's cgroup itself), so each folder is the
    mount point plus the path below the mount's root, then every parent up to the mount point.
    """
    v2_path: Optional[str] = None
    v1_path: Optional[str] = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2_path = path
        elif "cpu" in controllers.split(","):
            v1_path = path
    v2: List[Path] = []
    v1: List[Path] = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        after = line.split(" - ", 1)[1].split()
        if len(after) < 3:
            continue
        fstype, options = after[0], after[2].split(",")
        root, mount_point = fields[3], fields[4]
        if fstype == "cgroup2" and v2_path is not None and not v2:
            v2 = _chain(mount_point, root, v2_path)
        elif fstype == "cgroup" and "cpu" in options and v1_path is not None and not v1:
            v1 = _chain(mount_point, root, v1_path)
    return v2, v1


def _chain(mount_point: str, root: str, path: str) -> List[Path]:
    try:
        below = PurePosixPath(path).relative_to(root)
    except ValueError:
        # The process's cgroup lies outside what is mounted here (a container without its
        # own cgroup namespace): the mount point itself is the closest folder we can see.
        below = PurePosixPath(".")
    top = Path(_unescape(mount_point))
    folder = top / below
    chain = [folder]
    while folder != top and top in folder.parents:
        folder = folder.parent
        chain.append(folder)
    return chain


def _unescape(field: str) -> str:
    # mountinfo writes spaces, tabs, newlines and backslashes in paths as octal escapes.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def available_cpus(proc: Path = Path("/proc/self")) -> int:
    """usable_cpus() for this process, read from /proc and the cgroup filesystems."""
    try:
        affinity: Optional[Collection[int]] = os.sched_getaffinity(0)
    except AttributeError:  # no sched_getaffinity off Linux
        affinity = None
    v2, v1 = cgroup_cpu_dirs(_read(proc / "cgroup") or "", _read(proc / "mountinfo") or "")
    cpu_max = [text for text in (_read(folder / "cpu.max") for folder in v2) if text is not None]
    cfs: List[Tuple[str, str]] = []
    for folder in v1:
        quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            cfs.append((quota, period))
    return usable_cpus(affinity, cpu_max, cfs, online=os.cpu_count())


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        # Not Linux, no cgroup filesystem, or a folder without the CPU controller: no limit.
        return None
