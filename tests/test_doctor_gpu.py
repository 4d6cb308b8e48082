"""`rmbgd doctor`'s device and GPU lines on a host with CUDA, with torch's CUDA API faked.

The CI machines have no GPU, so the branch of `check_device` that sees one runs here against
a stand-in for the few torch.cuda calls it makes; on a lent GPU the real ones answer.
"""

from __future__ import annotations

import sys
import types

import pytest

from rmbgd.runtime import doctor

GIB = 2**30


def fake_cuda_torch(*, count=1, name="NVIDIA H200", major=9, minor=0, bf16=True, free=120 * GIB, total=139 * GIB):
    props = types.SimpleNamespace(name=name, major=major, minor=minor)
    cuda = types.SimpleNamespace(
        is_available=lambda: True,
        device_count=lambda: count,
        get_device_properties=lambda index: props,
        is_bf16_supported=lambda: bf16,
        mem_get_info=lambda index: (free, total),
    )
    return types.SimpleNamespace(__version__="2.99.0", version=types.SimpleNamespace(cuda="12.8"), cuda=cuda)


@pytest.fixture
def cuda_torch(monkeypatch):
    def install(**kwargs):
        fake = fake_cuda_torch(**kwargs)
        monkeypatch.setitem(sys.modules, "torch", fake)
        return fake

    return install


def test_a_modern_gpu_is_used_and_described(cuda_torch):
    cuda_torch()
    device_line, device, gpu = doctor.check_device("auto")
    assert device == "cuda:0"
    assert device_line.status == doctor.OK
    assert "torch 2.99.0 (CUDA 12.8)" in device_line.text and "using cuda:0" in device_line.text
    assert gpu is not None and gpu.name == "gpu" and gpu.status == doctor.OK
    assert gpu.text == (
        "NVIDIA H200, 139.0 GiB (120.0 GiB free), compute capability 9.0, fp16 yes (tensor cores), bf16 yes"
    )


@pytest.mark.parametrize(
    "major, minor, bf16, expected",
    [
        (6, 1, False, "compute capability 6.1, fp16 yes, bf16 no"),
        (5, 2, False, "compute capability 5.2, fp16 no, bf16 no"),
        (7, 5, False, "compute capability 7.5, fp16 yes (tensor cores), bf16 no"),
    ],
)
def test_older_gpus_say_what_they_lack(cuda_torch, major, minor, bf16, expected):
    cuda_torch(name="Old GPU", major=major, minor=minor, bf16=bf16, free=GIB, total=8 * GIB)
    _, _, gpu = doctor.check_device("cuda")
    assert gpu is not None and gpu.text == f"Old GPU, 8.0 GiB (1.0 GiB free), {expected}"


def test_second_gpu_named_in_the_config(cuda_torch):
    cuda_torch(count=2)
    device_line, device, gpu = doctor.check_device("cuda:1")
    assert (device, device_line.status) == ("cuda:1", doctor.OK) and gpu is not None


def test_a_gpu_index_beyond_those_visible_fails(cuda_torch):
    cuda_torch(count=1)
    device_line, device, gpu = doctor.check_device("cuda:3")
    assert device_line.status == doctor.FAIL and device == "cpu" and gpu is None
    assert "model.device: cuda:3 but only 1 GPU(s) are visible" in device_line.text


def test_cpu_chosen_on_a_gpu_host_keeps_the_gpu_line(cuda_torch):
    cuda_torch()
    device_line, device, gpu = doctor.check_device("cpu")
    assert device == "cpu" and device_line.status == doctor.OK and gpu is not None
