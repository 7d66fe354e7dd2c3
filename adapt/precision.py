"""Whether bf16 pays on a device, and what an `auto` precision choice resolves to.

bf16 only speeds things up where the hardware multiplies bf16 natively: CUDA GPUs that support it,
and CPUs with bf16 dot-product instructions (x86 AVX512_BF16 or AMX, Arm BF16), where oneDNN runs
bf16 matmuls. Elsewhere (an AVX2-only CPU, an AVX512 CPU without the bf16 extension) bf16 is
emulated and a forward pass gets several times slower, so `auto` means fp32 there.

Detection is split into small functions (`cpu_capability`, `cpu_has_hardware_bf16`,
`cuda_has_bf16`) that tests monkeypatch to simulate another machine; the resolvers are pure given
a `Bf16Support`.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any

from adapt.checkpoint import DTYPES as WEIGHT_DTYPES
from adapt.errors import AdaptError

MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass(frozen=True)
class Bf16Support:
    """What one device offers for bf16 math."""

    device: str
    """Device type: cpu, cuda, mps, ..."""
    capability: str
    """CPU: torch's vector ISA (AVX512, AVX2, ...); CUDA: the GPU's name; else the device type."""
    fast: bool
    """bf16 matmuls run in hardware there (so bf16 is expected to beat fp32)."""

    def why(self) -> str:
        """A few words saying why bf16 pays or not: 'CPU AVX512 with hardware bf16'."""
        if self.device == "cpu":
            return f"CPU {self.capability} " + ("with hardware bf16" if self.fast else "has no hardware bf16")
        if self.device == "cuda":
            return f"CUDA {self.capability} " + ("supports bf16" if self.fast else "has no native bf16")
        return f"{self.capability}: bf16 not known to pay"


def cpu_capability() -> str:
    """torch's best vector ISA on this CPU: AVX512, AVX2, DEFAULT, SVE256, ..."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def cpu_has_hardware_bf16() -> bool:
    """oneDNN runs bf16 on this CPU and the CPU has bf16 dot-product instructions.

    oneDNN's own check (`_is_mkldnn_bf16_supported`) is also true on AVX512 CPUs without the bf16
    extension (bf16 emulated there), so on x86 the AVX512_BF16 or AMX flag is required as well.
    """
    import torch

    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (AttributeError, RuntimeError):
        return False
    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i386", "i686"):
        return True  # Arm: oneDNN's check is the hardware BF16 extension itself
    names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    flags = [getattr(torch.cpu, name, None) for name in names]
    return any(bool(f()) for f in flags if callable(f))


def cuda_has_bf16() -> tuple[str, bool]:
    """(GPU name, native bf16 support) of the current CUDA device."""
    import torch

    return torch.cuda.get_device_name(), bool(torch.cuda.is_bf16_supported(including_emulation=False))


def bf16_support(device: Any = "cpu") -> Bf16Support:
    """Detect what `device` (a torch.device or a string such as 'cpu', 'cuda:0') offers for bf16."""
    kind = str(device).split(":")[0]
    if kind == "cpu":
        return Bf16Support("cpu", cpu_capability(), cpu_has_hardware_bf16())
    if kind == "cuda":
        name, fast = cuda_has_bf16()
        return Bf16Support("cuda", name, fast)
    return Bf16Support(kind, kind, False)


def bf16_is_fast(device: Any = "cpu") -> bool:
    """Whether bf16 math is expected to beat fp32 on `device`."""
    return bf16_support(device).fast


def resolve_mixed_precision(
    choice: str, device: Any = "cpu", support: Bf16Support | None = None
) -> tuple[str, str]:
    """training.mixed_precision -> (no|bf16|fp16, reason); auto means bf16 autocast where it pays.

    `support` (default: detected for `device`) is only read for auto.
    """
    if choice not in MIXED_PRECISIONS:
        raise AdaptError(f"mixed precision must be one of {', '.join(MIXED_PRECISIONS)}, got {choice!r}")
    if choice != "auto":
        return choice, "requested"
    support = support or bf16_support(device)
    return ("bf16" if support.fast else "no"), f"auto: {support.why()}"


def resolve_inference_dtype(
    choice: str, device: Any = "cpu", support: Bf16Support | None = None
) -> tuple[str, str]:
    """A weights dtype name for sampling/evaluation -> (float32|bfloat16|float16, reason).

    auto means bfloat16 where bf16 pays on `device`, else float32. `support` as in
    `resolve_mixed_precision`.
    """
    if choice not in WEIGHT_DTYPES:
        raise AdaptError(f"unknown dtype {choice!r}; choose one of {', '.join(WEIGHT_DTYPES)}")
    if choice != "auto":
        return choice, "requested"
    support = support or bf16_support(device)
    return ("bfloat16" if support.fast else "float32"), f"auto: {support.why()}"
