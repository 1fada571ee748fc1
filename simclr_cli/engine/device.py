"""Where and in which precision a task runs: the device, autocast dtype and memory layout."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from simclr_cli.engine.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """The resolved device and precision of one process."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16

    @property
    def channels_last(self) -> bool:
        """NHWC convolutions: the fast path for reduced precision on CPU (oneDNN) and CUDA (tensor cores)."""
        return self.precision != "fp32" or self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler for fp16 (whose range underflows small gradients); disabled otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then the CPU; an explicit device must exist."""
    if name not in DEVICES:
        raise ConfigError(f"unknown device '{name}'; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps was asked for but this PyTorch has no MPS support; use --device cpu or auto")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` is bf16 where the hardware runs it fast, fp16 on older GPUs, fp32 elsewhere."""
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision '{name}'; choose one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if name == "bf16" and not bf16_ok:
            raise ConfigError("this GPU has no bf16 support; use --precision fp16 or fp32")
        if name == "auto":
            return "bf16" if bf16_ok else "fp16"
        return name
    if name == "fp16" and device.type == "cpu":
        raise ConfigError("fp16 training is not supported on the CPU; use --precision bf16 or fp32")
    if name == "auto":
        return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"
    return name


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN has native bf16 kernels (AVX512-BF16 or AMX).

    Without them bf16 is emulated: on an AVX2-only CPU a ResNet-18 training step ran about 30x
    slower in bf16 than in fp32, so `auto` must not pick it there.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


# DataLoader worker processes any command may start: more only thrash (and a typo must not fork a hundred thousand).
MAX_WORKERS = 256


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def runtime(*, device: str, precision: str) -> Runtime:
    resolved = resolve_device(device)
    return Runtime(device=resolved, precision=resolve_precision(precision, resolved))
