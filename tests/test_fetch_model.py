"""`rmbgd fetch-model`: what it asks huggingface_hub for, and what it tells the user.

The hub itself is replaced by fakes of the three huggingface_hub calls fetch_model makes;
the failures that need a real process (offline, unreachable, gated) are covered in
test_startup_failures.py.
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import yaml

from rmbgd import cli
from rmbgd.config import ModelConfig
from rmbgd.model.hub import ModelLoadError, fetch_model


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Records snapshot_download calls; the repository holds `files`."""

    class Hub:
        files = ["config.json", "birefnet.py", "BiRefNet_config.py", "model.safetensors",
                 "pytorch_model.bin", "onnx/model.onnx", "README.md"]
        downloads: list[dict] = []
        probed: list[tuple] = []

    def list_repo_files(repo_id, revision=None, **kwargs):
        Hub.probed.append(("list", repo_id, revision))
        return list(Hub.files)

    def snapshot_download(repo_id, **kwargs):
        Hub.downloads.append({"repo_id": repo_id, **kwargs})
        target = kwargs.get("local_dir") or str(tmp_path / "cache" / "snapshots" / "abc")
        Path(target).mkdir(parents=True, exist_ok=True)
        return target

    def metadata(url, **kwargs):
        Hub.probed.append(("head", url))
        return object()

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", metadata)
    return Hub


def test_fetch_into_the_cache_at_the_pinned_revision(fake_hub):
    folder = fetch_model(ModelConfig(name="ZhengPeng7/BiRefNet", revision="v1.1"))
    (download,) = fake_hub.downloads
    assert download["repo_id"] == "ZhengPeng7/BiRefNet"
    assert download["revision"] == "v1.1"
    assert download["local_dir"] is None
    assert folder.name == "abc"
    # The probe and the listing asked for the same revision.
    assert ("list", "ZhengPeng7/BiRefNet", "v1.1") in fake_hub.probed
    assert any(kind == "head" and "/resolve/v1.1/config.json" in what for kind, what, *_ in fake_hub.probed)


def test_fetch_skips_files_rmbgd_never_loads(fake_hub):
    import fnmatch

    fetch_model(ModelConfig(name="briaai/RMBG-2.0"))
    ignored = fake_hub.downloads[0]["ignore_patterns"]
    kept = [f for f in fake_hub.files if not any(fnmatch.fnmatch(f, pattern) for pattern in ignored)]
    assert kept == ["config.json", "birefnet.py", "BiRefNet_config.py", "model.safetensors", "README.md"]


def test_fetch_keeps_bin_weights_when_there_are_no_safetensors(fake_hub):
    import fnmatch

    fake_hub.files = ["config.json", "modeling.py", "pytorch_model.bin"]
    fetch_model(ModelConfig(name="someone/old-model"))
    ignored = fake_hub.downloads[0]["ignore_patterns"]
    assert not any(fnmatch.fnmatch("pytorch_model.bin", pattern) for pattern in ignored)


def test_fetch_of_a_local_directory_is_an_error(tmp_path, fake_hub):
    with pytest.raises(ModelLoadError, match=r"^model\.name: .* is a local directory, not a Hugging Face model id"):
        fetch_model(ModelConfig(name=str(tmp_path)))
    assert fake_hub.downloads == []


def test_download_failure_is_one_line(fake_hub, monkeypatch):
    def full_disk(repo_id, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", full_disk)
    with pytest.raises(ModelLoadError) as info:
        fetch_model(ModelConfig(name="ZhengPeng7/BiRefNet"))
    assert str(info.value) == (
        "model.name: downloading 'ZhengPeng7/BiRefNet' failed: OSError: [Errno 28] No space left on device"
    )


def test_cli_fetch_model_to_a_folder(tmp_path, fake_hub, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "paths": {"inbox": "in", "outbox": "out", "errors": "err", "done": None},
                "model": {"name": "ZhengPeng7/BiRefNet_lite", "revision": "abc123"},
            }
        )
    )
    target = tmp_path / "models" / "BiRefNet_lite"
    assert cli.main(["fetch-model", "--config", str(config), "--to", str(target)]) == 0
    out, err = capsys.readouterr()
    assert (out, err) == (f"{target}\n", "")
    (download,) = fake_hub.downloads
    assert (download["revision"], download["local_dir"]) == ("abc123", str(target))


def test_cli_fetch_model_help():
    with pytest.raises(SystemExit) as info:
        cli.main(["fetch-model", "--help"])
    assert info.value.code == 0
