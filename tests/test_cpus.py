"""Usable CPUs: the affinity mask capped by cgroup v1/v2 CPU quotas, from literal file contents."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

import rmbgd.config as config_mod
from rmbgd.config import cpus
from rmbgd.config import PipelineConfig, effective_workers, parse_config
from rmbgd.config.cpus import available_cpus, cgroup_cpu_dirs, usable_cpus

# /proc/self/mountinfo lines as a pure cgroup v2 host, a hybrid v1 host and a container show them.
V2_MOUNT = "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MOUNTS = (
    "31 23 0:28 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n"
    "32 31 0:29 / /sys/fs/cgroup/unified rw,relatime shared:5 - cgroup2 cgroup2 rw\n"
    "33 31 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct\n"
    "34 31 0:31 / /sys/fs/cgroup/memory rw,relatime shared:10 - cgroup cgroup rw,memory\n"
)


@pytest.mark.parametrize(
    ("affinity", "cpu_max", "cfs", "online", "expected"),
    [
        ({0, 1, 2, 3, 4, 5, 6, 7}, [], [], 64, 8),  # taskset / cpuset: the mask, not the host
        ({0, 1, 2, 3, 4, 5, 6, 7}, ["max 100000\n"], [], 64, 8),  # v2 without a limit
        ({0, 1, 2, 3, 4, 5, 6, 7}, ["200000 100000\n"], [], 64, 2),  # docker --cpus=2
        ({0, 1, 2, 3, 4, 5, 6, 7}, ["150000 100000"], [], 64, 2),  # 1.5 CPUs: round up
        ({0, 1, 2, 3, 4, 5, 6, 7}, ["50000 100000"], [], 64, 1),  # half a CPU: still one
        ({0, 1}, ["800000 100000"], [], 64, 2),  # a quota above the mask: the mask
        # A parent's limit applies to its children: the smallest of the chain counts.
        ({0, 1, 2, 3, 4, 5, 6, 7}, ["max 100000", "300000 100000", "600000 100000"], [], 64, 3),
        ({0, 1, 2, 3, 4, 5, 6, 7}, [], [("-1\n", "100000\n")], 64, 8),  # v1 without a limit
        ({0, 1, 2, 3, 4, 5, 6, 7}, [], [("400000\n", "100000\n")], 64, 4),  # v1 CPUQuota=400%
        ({0, 1, 2, 3}, ["300000 100000"], [("100000", "100000")], 64, 1),  # both: the smallest
        # Junk counts as no limit: a strange kernel must not stop the start.
        ({0, 1, 2}, ["garbage", "", "1 2 3", "0 100000", "100000 0"], [("x", "y"), ("5", "-1")], 64, 3),
        (None, [], [], 12, 12),  # no affinity call (not Linux): the host's count
        (None, ["200000 100000"], [], 12, 2),
        (None, [], [], None, 1),  # nothing known at all
        (set(), [], [], None, 1),
    ],
)
def test_usable_cpus(affinity, cpu_max, cfs, online, expected):
    assert usable_cpus(affinity, cpu_max, cfs, online=online) == expected


def test_cgroup_dirs_of_a_systemd_service_on_cgroup_v2():
    v2, v1 = cgroup_cpu_dirs("0::/system.slice/rmbgd.service\n", V2_MOUNT)
    assert v2 == [
        Path("/sys/fs/cgroup/system.slice/rmbgd.service"),
        Path("/sys/fs/cgroup/system.slice"),
        Path("/sys/fs/cgroup"),
    ]
    assert v1 == []


def test_cgroup_dirs_inside_a_container_with_its_own_cgroup_namespace():
    assert cgroup_cpu_dirs("0::/\n", V2_MOUNT) == ([Path("/sys/fs/cgroup")], [])


def test_cgroup_dirs_when_the_mount_root_is_the_containers_own_cgroup():
    # Without a cgroup namespace the path is the host's, the mount shows the container's part.
    mount = "500 400 0:26 /docker/abc /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw\n"
    assert cgroup_cpu_dirs("0::/docker/abc/sub\n", mount)[0] == [
        Path("/sys/fs/cgroup/sub"),
        Path("/sys/fs/cgroup"),
    ]
    # A path outside what is mounted: the mount point is the closest folder there is.
    assert cgroup_cpu_dirs("0::/elsewhere\n", mount)[0] == [Path("/sys/fs/cgroup")]


def test_cgroup_dirs_on_a_hybrid_cgroup_v1_host():
    proc_cgroup = (
        "12:memory:/user.slice\n"
        "4:cpu,cpuacct:/system.slice/rmbgd.service\n"
        "1:name=systemd:/system.slice/rmbgd.service\n"
        "0::/system.slice/rmbgd.service\n"
    )
    v2, v1 = cgroup_cpu_dirs(proc_cgroup, V1_MOUNTS)
    assert v1 == [
        Path("/sys/fs/cgroup/cpu,cpuacct/system.slice/rmbgd.service"),
        Path("/sys/fs/cgroup/cpu,cpuacct/system.slice"),
        Path("/sys/fs/cgroup/cpu,cpuacct"),
    ]
    assert v2[0] == Path("/sys/fs/cgroup/unified/system.slice/rmbgd.service")


def test_cgroup_dirs_unescape_mount_points_and_skip_junk():
    mount = "1 2 0:3 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\nnot a mountinfo line\n"
    assert cgroup_cpu_dirs("junk\n0::/a\n", mount)[0] == [Path("/mnt/my cgroups/a"), Path("/mnt/my cgroups")]
    assert cgroup_cpu_dirs("", "") == ([], [])


def test_available_cpus_reads_the_quota_of_the_process_cgroup(tmp_path):
    """The reader end to end on a fake /proc/self and cgroup tree: a parent's quota applies."""
    root = tmp_path / "cgroup"
    service = root / "system.slice" / "rmbgd.service"
    service.mkdir(parents=True)
    (service / "cpu.max").write_text("max 100000\n")
    (root / "system.slice" / "cpu.max").write_text("100000 100000\n")
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text("0::/system.slice/rmbgd.service\n")
    (proc / "mountinfo").write_text(f"29 23 0:26 / {root} rw - cgroup2 cgroup2 rw\n")
    assert available_cpus(proc) == 1
    # No cgroup information at all (not Linux, or /proc hidden): the affinity mask alone.
    assert available_cpus(tmp_path / "missing") == usable_cpus(os.sched_getaffinity(0))


def test_regression_worker_counts_use_the_usable_cpus_not_the_hosts(tmp_path, monkeypatch):
    """Finding 8: `pipeline.workers: 0` sized the pools by os.cpu_count(), the host's CPUs."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setattr(cpus, "_read", lambda path: {"cgroup": "0::/\n", "mountinfo": V2_MOUNT,
                                                     "cpu.max": "300000 100000\n"}.get(path.name))
    cfg = parse_config({"paths": {"inbox": "in", "outbox": "out", "errors": "err", "done": None}}, tmp_path)
    cfg = dataclasses.replace(cfg, pipeline=PipelineConfig(workers=0))
    assert effective_workers(cfg) == 3
    assert config_mod.effective_max_in_flight(cfg) == 2 * cfg.batch.size + 3
