"""Tests of devices.py: --device (auto's order, and a clear line for a device this machine lacks),
mixed precision on CUDA only, moving a batch, and a device's name."""
import contextlib

import pytest
import torch

import devices
from devices import autocast, describe_device, pick_device, to_device

CPU = torch.device("cpu")


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine that says it has two CUDA devices (nothing is run on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


# ---------------------------------------------------------------------------------------------
# pick_device


def test_pick_device_auto_falls_back_to_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device() == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")


def test_pick_device_auto_is_cpu_on_this_machine():
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has an accelerator")
    assert pick_device("auto").type == "cpu"


def test_pick_device_cuda_without_cuda_raises_a_clear_value_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as error:
        pick_device("cuda")
    assert "--device cuda" in str(error.value) and "CUDA is not available" in str(error.value)
    assert "--device cpu" in str(error.value)


def test_pick_device_mps_without_mps_raises_value_error(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device mps"):
        pick_device("mps")


def test_pick_device_unknown_name_raises_value_error():
    with pytest.raises(ValueError) as error:
        pick_device("banana")
    assert "--device banana" in str(error.value) and "unknown device" in str(error.value)


def test_pick_device_auto_prefers_cuda_then_mps(monkeypatch, two_gpus):
    assert pick_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("mps")


def test_pick_device_cuda_index_must_be_one_of_the_machines(two_gpus):
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\)"):
        pick_device("cuda:2")


def test_pick_device_refuses_a_torch_device_that_is_not_cpu_cuda_or_mps():
    with pytest.raises(ValueError, match="--device meta: unsupported device type"):
        pick_device("meta")


# ---------------------------------------------------------------------------------------------
# autocast and to_device


def test_autocast_is_off_on_the_cpu_and_when_disabled():
    assert isinstance(autocast(CPU), contextlib.nullcontext)
    assert isinstance(autocast(torch.device("cuda"), enabled=False), contextlib.nullcontext)
    with autocast(CPU):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.parametrize("bf16, dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_autocast_on_cuda_uses_bf16_where_the_gpu_has_it_else_fp16(monkeypatch, bf16, dtype):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    monkeypatch.setattr(devices.torch, "autocast", lambda device_type, dtype: calls.append((device_type, dtype)))
    autocast(torch.device("cuda"))
    assert calls == [("cuda", dtype)]


def test_to_device_on_the_cpu_gives_a_contiguous_batch_of_the_same_values():
    images = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    moved = to_device(images, CPU)
    assert moved.device == CPU and moved.is_contiguous() and torch.equal(moved, images)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_device_on_cuda_gives_a_channels_last_batch():
    images = torch.randn(2, 3, 8, 8)
    moved = to_device(images, torch.device("cuda"))
    assert moved.is_cuda and moved.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(moved.cpu(), images)


# ---------------------------------------------------------------------------------------------
# describe_device


def test_describe_device_names_the_cpu_threads(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert describe_device(CPU) == describe_device("cpu") == "cpu (1 thread)"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 6)
    assert describe_device(CPU) == "cpu (6 threads)"


def test_describe_device_names_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    assert describe_device(torch.device("cuda", 0)) == "cuda:0 (NVIDIA H100 80GB HBM3)"
    assert describe_device("mps") == "mps"
