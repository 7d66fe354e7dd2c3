"""Whether bf16 pays on a device, and what an `auto` precision choice resolves to.

bf16 only speeds things up where the hardware multiplies bf16 natively: CUDA GPUs that support it,
and CPUs with bf16 dot-product instructions (x86 AVX512_BF16 or AMX, Arm BF16), where oneDNN runs
bf16 matmuls. Elsewhere (an AVX2-only CPU, an AVX512 CPU without the bf16 extension) bf16 is
emulated and a forward pass gets several times slower, so `auto` means fp32 there.

The instructions are not enough on a CPU: one AVX512_BF16 CPU measured bf16 matmuls 3.9x faster than
fp32 (and bf16 autocast training 1.4x), another, with the same flag but no AMX, 0.5x (autocast training
0.8x). So on a CPU with the instructions `auto` also times one matmul in both dtypes (about 0.1 s, once
per process and thread count) and takes bf16 only when it is at least `CPU_BF16_MIN_SPEEDUP` faster.

Detection is split into small functions (`cpu_capability`, `cpu_has_hardware_bf16`,
`cpu_bf16_speedup`, `cuda_has_bf16`) that tests monkeypatch to simulate another machine; the
resolvers are pure given a `Bf16Support`.
"""

from __future__ import annotations

import functools
import platform
import time
from dataclasses import dataclass
from typing import Any

from adapt.core.checkpoint import DTYPES as WEIGHT_DTYPES
from adapt.core.checkpoint import INFERENCE_DTYPES, resolve_dtype
from adapt.core.errors import AdaptError

MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
CPU_BF16_MIN_SPEEDUP = 1.5
"""bf16 matmul speedup over fp32 a CPU must show for `auto` to choose bf16 (autocast's casts and the
non-matmul work keep a model's gain well below the matmul's: 3.9x matmul gave 1.4x training)."""


@dataclass(frozen=True)
class Bf16Support:
    """What one device offers for bf16 math."""

    device: str
    """Device type: cpu, cuda, mps, ..."""
    capability: str
    """CPU: torch's vector ISA (AVX512, AVX2, ...); CUDA: the GPU's name; else the device type."""
    fast: bool
    """bf16 is expected to beat fp32 there (CPU: hardware bf16 and a measured matmul speedup)."""
    speedup: float | None = None
    """CPU with hardware bf16: measured bf16 matmul speedup over fp32 (None where not measured)."""

    def why(self) -> str:
        """A few words saying why bf16 pays or not: 'CPU AVX512 with hardware bf16, bf16 matmul 3.9x fp32'."""
        if self.device == "cpu" and self.speedup is not None:
            return f"CPU {self.capability} with hardware bf16, bf16 matmul {self.speedup:.2f}x fp32"
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


@functools.cache
def cpu_bf16_speedup(threads: int) -> float:
    """fp32 time over bf16 time of a [512 x 1024] @ [1024 x 1024] matmul at `threads` torch threads: the
    best of 5 interleaved runs of each (about 0.1 s in all; cached per thread count)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a32, b32 = torch.randn(512, 1024, generator=g), torch.randn(1024, 1024, generator=g)
        pairs = {torch.float32: (a32, b32), torch.bfloat16: (a32.bfloat16(), b32.bfloat16())}
        best = dict.fromkeys(pairs, float("inf"))
        for a, b in pairs.values():
            a @ b  # warm up: oneDNN builds its kernels on the first call
        for _ in range(5):
            for dtype, (a, b) in pairs.items():
                start = time.perf_counter()
                a @ b
                best[dtype] = min(best[dtype], time.perf_counter() - start)
        return best[torch.float32] / best[torch.bfloat16]
    finally:
        torch.set_num_threads(before)


def cuda_has_bf16() -> tuple[str, bool]:
    """(GPU name, native bf16 support) of the current CUDA device."""
    import torch

    return torch.cuda.get_device_name(), bool(torch.cuda.is_bf16_supported(including_emulation=False))


def bf16_support(device: Any = "cpu") -> Bf16Support:
    """Detect what `device` (a torch.device or a string such as 'cpu', 'cuda:0') offers for bf16."""
    kind = str(device).split(":")[0]
    if kind == "cpu":
        if not cpu_has_hardware_bf16():
            return Bf16Support("cpu", cpu_capability(), False)
        import torch

        speedup = cpu_bf16_speedup(torch.get_num_threads())
        return Bf16Support("cpu", cpu_capability(), speedup >= CPU_BF16_MIN_SPEEDUP, speedup)
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


def weights_dtype(name: str, device: str) -> tuple[Any, str]:
    """A dtype name for loading a model to sample or evaluate -> (torch dtype or "auto", reason).

    auto: bfloat16 where the device multiplies bf16 natively (CUDA with bf16, a CPU with AVX512_BF16 or
    AMX), else float32; checkpoint: the dtype the checkpoint was saved in; or a dtype by name.
    """
    if name == "checkpoint":
        return "auto", "the checkpoint's saved dtype"
    if name not in WEIGHT_DTYPES:
        raise AdaptError(f"unknown dtype {name!r}; choose one of {', '.join(INFERENCE_DTYPES)}")
    chosen, why = resolve_inference_dtype(name, device)
    return resolve_dtype(chosen), why
