"""The precision a run computes in: `model.dtype` (the frozen base) and `train.bf16` (autocast),
each a value or 'auto'. 'auto' picks bf16 only where the device runs it natively and fp32
elsewhere, because emulated bf16 is slower than fp32, not faster: on an AVX2-only CPU a 512-square
bf16 matmul ran at 1.2 GFLOP/s against 127 in fp32 (issue #26), so a bf16 demo took hours.

Native bf16 is asked of torch, not measured (a measurement takes time on every start and is noisy
on shared machines):
- CUDA: `torch.cuda.is_bf16_supported(including_emulation=False)` (compute capability 8.0+).
- CPU: all of (1) `torch.backends.cpu.get_cpu_capability()` is an AVX512 level (ATen's own
  kernels: `ATEN_CPU_CAPABILITY=avx2` makes it 'AVX2', and then auto picks fp32), (2) the CPU has
  AVX512-BF16 or AMX instructions (`torch.cpu._is_avx512_bf16_supported()` /
  `_is_amx_tile_supported()`, from cpuinfo; torch 2.13 reports only 'AVX512' as the capability,
  whatever the bf16 support), and (3) oneDNN, which runs the bf16 matmuls, may use bf16
  (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`: False under `ONEDNN_MAX_CPU_ISA=AVX2`, which
  is what really makes bf16 matmuls slow; measured on a Sapphire Rapids core: 562 GFLOP/s bf16
  vs 162 fp32 with `ATEN_CPU_CAPABILITY=avx2` alone, 2.1 vs 149 with `ONEDNN_MAX_CPU_ISA=AVX2`).
- Anything else: fp32.
An explicit bf16 without native support runs, with a warning that measures the cost (`bf16_cost`).
Strategies that write offsets into the base weights need an fp32 base: 'auto' gives them one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

AUTO = "auto"


@dataclass(frozen=True)
class Precision:
    """What a process computes in.

    Attributes:
        dtype: the frozen base weights ('float32' or 'bfloat16').
        bf16: bf16 autocast of the matmuls.
        native: whether the device runs bf16 natively.
        why: what the device reports about bf16.
        reason: one line: the choice, and why (recorded in round 0, printed at the start).
    """

    dtype: str
    bf16: bool
    native: bool
    why: str
    reason: str

    @property
    def slow(self) -> bool:
        """bf16 asked for on a device that only emulates it."""
        return (self.dtype == "bfloat16" or self.bf16) and not self.native


def cpu_bf16(capability: str, instructions: bool, onednn: bool) -> tuple[bool, str]:
    """Whether a CPU runs bf16 natively, from what torch reports (module docstring), and why."""
    if not capability.upper().startswith("AVX512"):
        return False, f"CPU capability {capability}: no native bf16"
    if not instructions:
        return False, f"CPU capability {capability} without AVX512-BF16 or AMX: bf16 is emulated"
    if not onednn:
        return False, "oneDNN may not use bf16 here (ONEDNN_MAX_CPU_ISA?): bf16 matmuls are emulated"
    return True, f"CPU with native bf16 (capability {capability}, AVX512-BF16 / AMX, oneDNN bf16)"


def native_bf16(device: Any) -> tuple[bool, str]:
    """Whether `device` (a torch.device) runs bf16 natively, and why (module docstring)."""
    import torch

    if device.type == "cuda":
        try:
            native = bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # an older torch: no emulation argument
            native = torch.cuda.get_device_capability(device) >= (8, 0)
        name = torch.cuda.get_device_name(device)
        return native, f"{name}: {'native' if native else 'no native'} bf16"
    if device.type == "cpu":
        return cpu_bf16(torch.backends.cpu.get_cpu_capability(), _cpu_has("avx512_bf16", "amx_tile"), _onednn_bf16())
    return False, f"device type {device.type!r}: native bf16 unknown"


def _cpu_has(*features: str) -> bool:
    """Whether cpuinfo (through torch) reports any of these instruction sets."""
    import torch

    return any(bool(getattr(torch.cpu, f"_is_{f}_supported", lambda: False)()) for f in features)


def _onednn_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def choose_precision(
    dtype: str, bf16: bool | str, device: Any, fp32_base: str | None = None, native: tuple[bool, str] | None = None
) -> Precision:
    """Resolve `model.dtype` and `train.bf16` ('auto' or a value) for `device`.

    Args:
        dtype: 'auto', 'float32' or 'bfloat16'.
        bf16: True, False or 'auto'.
        device: the torch device the model runs on.
        fp32_base: why the base must stay fp32 (a strategy that writes offsets into it), or None.
        native: `native_bf16(device)`, if known already.

    'auto' base: bf16 where native, unless `fp32_base` or `train.bf16: false`. 'auto' autocast:
    on where native, and always under a bf16 base (its fp32 adapters need it).
    """
    native_ok, why = native if native is not None else native_bf16(device)
    base = dtype
    if dtype == AUTO:
        base = "bfloat16" if native_ok and fp32_base is None and bf16 is not False else "float32"
    cast = bool(native_ok or base == "bfloat16") if bf16 == AUTO else bool(bf16)
    picked = f"{'bf16' if base == 'bfloat16' else 'fp32'} base{' (auto)' if dtype == AUTO else ''}, "
    picked += f"bf16 autocast {'on' if cast else 'off'}{' (auto)' if bf16 == AUTO else ''}"
    reason = f"{picked} on {device}: {why}"
    if dtype == AUTO and native_ok and fp32_base is not None:
        reason += f"; fp32 base because {fp32_base}"
    return Precision(base, cast, native_ok, why, reason)


def matmul_gflops(dtype: Any, device: Any, n: int = 256, reps: int = 3) -> float:
    """GFLOP/s of an n-square matmul in `dtype` on `device` (best of `reps`, after one warm-up)."""
    import time

    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / max(best, 1e-9) / 1e9


def bf16_cost(device: Any) -> str:
    """The measured cost of bf16 here: a 256-square matmul in bf16 vs fp32 (under 0.2 s even
    where bf16 is emulated at 1 GFLOP/s)."""
    import torch

    if device.type not in ("cpu", "cuda"):
        return "cost not measured on this device"
    bf, fp = matmul_gflops(torch.bfloat16, device), matmul_gflops(torch.float32, device)
    return f"a 256-square bf16 matmul ran at {bf:.1f} GFLOP/s vs {fp:.1f} in fp32 ({fp / bf:.1f}x the time)"


def precision_warning(p: Precision, device: Any) -> str | None:
    """A warning for bf16 set explicitly where it is emulated (with its measured cost), else None."""
    if not p.slow:
        return None
    return (
        f"bf16 is set, but {device} only emulates it ({p.why}): {bf16_cost(device)}; "
        "model.dtype: auto and train.bf16: auto pick fp32 here"
    )
