"""Device and precision resolution, autocast, loss scaling and the memory-layout rule."""

from __future__ import annotations

import pytest
import torch

from simclr_cli.engine import device
from simclr_cli.engine.device import Runtime, resolve_device, resolve_precision, runtime
from simclr_cli.engine.errors import ConfigError

CPU = torch.device("cpu")


@pytest.fixture
def no_gpu(monkeypatch):
    """A CPU-only machine, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


# --- resolve_device --------------------------------------------------------------------------------


def test_auto_is_cpu_without_accelerators(no_gpu):
    assert resolve_device("auto") == CPU


def test_auto_prefers_mps_over_cpu(no_gpu, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")


def test_cpu_is_always_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # even with a GPU, an explicit cpu is honoured
    assert resolve_device("cpu") == CPU


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:0", "tpu", ""])
def test_unknown_device(name):
    with pytest.raises(ConfigError) as err:
        resolve_device(name)
    assert str(err.value) == f"unknown device '{name}'; choose one of auto, cpu, cuda, mps"


def test_cuda_requested_but_absent(no_gpu):
    with pytest.raises(ConfigError) as err:
        resolve_device("cuda")
    assert str(err.value) == "--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu or auto"


def test_mps_requested_but_absent(no_gpu):
    with pytest.raises(ConfigError) as err:
        resolve_device("mps")
    assert str(err.value) == "--device mps was asked for but this PyTorch has no MPS support; use --device cpu or auto"


# --- resolve_precision -----------------------------------------------------------------------------


def test_auto_precision_on_cpu_is_bf16_when_the_cpu_runs_it_natively(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", CPU) == "bf16"


def test_auto_precision_on_cpu_is_fp32_when_bf16_would_be_emulated(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto", CPU) == "fp32"


def test_auto_precision_on_mps_is_fp32(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)  # the CPU's bf16 says nothing about MPS
    assert resolve_precision("auto", torch.device("mps")) == "fp32"


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_explicit_precision_on_cpu_is_kept(monkeypatch, name, fast):
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: fast)
    assert resolve_precision(name, CPU) == name


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ConfigError) as err:
        resolve_precision("fp16", CPU)
    assert str(err.value) == "fp16 training is not supported on the CPU; use --precision bf16 or fp32"


@pytest.mark.parametrize("name", ["fp64", "bfloat16", "half", "FP32", "amp"])
def test_unknown_precision(name):
    with pytest.raises(ConfigError) as err:
        resolve_precision(name, CPU)
    assert str(err.value) == f"unknown precision '{name}'; choose one of auto, fp32, bf16, fp16"


@pytest.mark.parametrize(("bf16_ok", "auto"), [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_cuda_follows_bf16_support(monkeypatch, bf16_ok, auto):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_ok)
    assert resolve_precision("auto", torch.device("cuda")) == auto
    assert resolve_precision("fp16", torch.device("cuda")) == "fp16"


def test_bf16_on_a_cuda_gpu_without_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    with pytest.raises(ConfigError) as err:
        resolve_precision("bf16", torch.device("cuda"))
    assert str(err.value) == "this GPU has no bf16 support; use --precision fp16 or fp32"


def test_cpu_has_fast_bf16_is_a_bool():
    assert isinstance(device.cpu_has_fast_bf16(), bool)


def test_cpu_has_fast_bf16_without_onednn(monkeypatch):
    def missing():
        raise RuntimeError("no mkldnn in this build")

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", missing)
    assert device.cpu_has_fast_bf16() is False


# --- runtime ---------------------------------------------------------------------------------------


def test_runtime_resolves_both(no_gpu, monkeypatch):
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    assert runtime(device="auto", precision="auto") == Runtime(device=CPU, precision="fp32")
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    assert runtime(device="cpu", precision="auto") == Runtime(device=CPU, precision="bf16")
    with pytest.raises(ConfigError, match="^fp16 training is not supported on the CPU"):
        runtime(device="cpu", precision="fp16")


def test_fp32_runs_without_autocast():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with Runtime(device=CPU, precision="fp32").autocast():
        assert not torch.is_autocast_enabled("cpu")
        y = layer(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, layer(x))


def test_bf16_on_cpu_autocasts_a_linear_layer():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with Runtime(device=CPU, precision="bf16").autocast():
        assert torch.is_autocast_enabled("cpu")
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert layer.weight.dtype == torch.float32  # autocast casts on the fly; the parameters stay fp32
    assert not torch.is_autocast_enabled("cpu")
    assert torch.allclose(y.float(), layer(x), atol=0.05, rtol=0.02)


@pytest.mark.parametrize(("precision", "enabled"), [("fp32", False), ("bf16", False), ("fp16", True)])
def test_grad_scaler_only_for_fp16(precision, enabled):
    scaler = Runtime(device=CPU, precision=precision).grad_scaler()
    assert isinstance(scaler, torch.amp.GradScaler)
    assert scaler.is_enabled() is enabled


@pytest.mark.parametrize(
    ("device_type", "precision", "channels_last"),
    [
        ("cpu", "fp32", False),
        ("cpu", "bf16", True),
        ("cuda", "fp32", True),
        ("cuda", "bf16", True),
        ("cuda", "fp16", True),
        ("mps", "fp32", False),
    ],
)
def test_channels_last_rule(device_type, precision, channels_last):
    assert Runtime(device=torch.device(device_type), precision=precision).channels_last is channels_last
