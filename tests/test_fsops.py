"""Atomic, non-clobbering publishing and moving."""

import os
import threading
from pathlib import Path

from rmbgd.output.fsops import TEMP_SUFFIX as TEMP_TAG, move_unique, publish_bytes, replace_atomically


def test_publish_writes_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out" / "a" / "x.png"
    final = publish_bytes(b"hello", target, owner="me")
    assert final == target
    assert target.read_bytes() == b"hello"
    assert not [p for p in target.parent.iterdir() if TEMP_TAG in p.name]


def test_publish_never_overwrites(tmp_path):
    target = tmp_path / "x.png"
    target.write_bytes(b"old")
    assert publish_bytes(b"new", target, owner="me") == tmp_path / "x-1.png"
    assert publish_bytes(b"newer", target, owner="me") == tmp_path / "x-2.png"
    assert target.read_bytes() == b"old"
    assert (tmp_path / "x-1.png").read_bytes() == b"new"


def test_concurrent_publishers_each_get_their_own_name(tmp_path):
    target = tmp_path / "x.png"
    results = []
    lock = threading.Lock()

    def publish(i):
        name = publish_bytes(str(i).encode(), target, owner=f"t{i}")
        with lock:
            results.append((name, i))

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    names = [n for n, _ in results]
    assert len(set(names)) == 8
    for name, i in results:
        assert name.read_bytes() == str(i).encode()


def test_move_unique_same_filesystem(tmp_path):
    src = tmp_path / "work" / "x.jpg"
    src.parent.mkdir()
    src.write_bytes(b"data")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "x.jpg").write_bytes(b"earlier")
    final = move_unique(src, tmp_path / "done" / "x.jpg", owner="me")
    assert final == tmp_path / "done" / "x-1.jpg"
    assert final.read_bytes() == b"data"
    assert not src.exists()
    assert (tmp_path / "done" / "x.jpg").read_bytes() == b"earlier"


def test_move_unique_across_filesystems(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        import pytest

        pytest.skip("needs a second filesystem")
    src = tmp_path / "x.jpg"
    src.write_bytes(b"data" * 1000)
    dest_dir = shm / f"rmbgd-test-{os.getpid()}"
    try:
        final = move_unique(src, dest_dir / "x.jpg", owner="me")
        assert final.read_bytes() == b"data" * 1000
        assert not src.exists()
        assert not [p for p in dest_dir.iterdir() if TEMP_TAG in p.name]
    finally:
        for p in dest_dir.glob("*"):
            p.unlink()
        dest_dir.rmdir()


def test_move_symlink_keeps_target_untouched(tmp_path):
    target = tmp_path / "precious.jpg"
    target.write_bytes(b"precious")
    link = tmp_path / "work" / "link.jpg"
    link.parent.mkdir()
    link.symlink_to(target)
    final = move_unique(link, tmp_path / "errors" / "link.jpg", owner="me")
    assert final.is_symlink()
    assert os.readlink(final) == str(target)
    assert target.read_bytes() == b"precious"


def test_regression_remove_file_when_its_emptied_folder_is_removed_at_once(tmp_path, monkeypatch):
    # Seen as a file retried forever: release_dirs (another file of the same work folder)
    # removed the folder between the unlink and its fsync, and the delivery was judged failed.
    from rmbgd.output import fsops

    folder = tmp_path / "work" / "crop"
    folder.mkdir(parents=True)
    victim = folder / "empty.png"
    victim.write_bytes(b"x")
    real_fsync_dir = fsops.fsync_dir

    def fsync_dir_after_rmdir(path):
        if path == folder:
            folder.rmdir()
        return real_fsync_dir(path)

    monkeypatch.setattr(fsops, "fsync_dir", fsync_dir_after_rmdir)
    fsops.remove_file(victim)
    assert not folder.exists()


def test_replace_atomically_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "doc.json"
    path.write_bytes(b"old")
    (tmp_path / f".doc.json.{os.getpid()}.tmp").write_bytes(b"a crashed writer's leftover")
    replace_atomically(path, b"new")
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.json"]


def test_replace_atomically_keeps_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "doc.json"
    path.write_bytes(b"old")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    try:
        replace_atomically(path, b"new", temp=tmp_path / "doc.json.new")
    except OSError as exc:
        assert exc.errno == 28
    else:
        raise AssertionError("the failed rename was not reported")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.json"]
