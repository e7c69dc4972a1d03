"""FLOPs of a training step, the GPUs' peak rates and the model FLOPs utilisation (MFU).

The throughput benchmark (:mod:`mfm.throughput`) times the steps; this module turns their
FLOP counts and times into achieved TFLOP/s and, on a GPU whose peak is known (or given),
the MFU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch.utils import flop_counter

# Dense (no sparsity) peak TFLOP/s from NVIDIA's datasheets: bf16 and tf32 on the tensor
# cores, fp32 on the CUDA cores. Keyed by the model as ``known_gpu`` names it.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H200": {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}
MFU_KEYS = ("step_gflop", "achieved_tflops", "peak_tflops", "peak_precision", "mfu")
SUPERVISED_MFU_KEYS = ("supervised_step_gflop", "supervised_achieved_tflops", "supervised_mfu")


class CountedStep(Protocol):
    """A timed step with its FLOP count (``mfm.throughput.StepTiming``)."""

    seconds: float
    flops: int | None


# -- the peak table --------------------------------------------------------------------------


def known_gpu(name: str) -> str | None:
    """The ``PEAK_TFLOPS`` key of a CUDA device name, or None for a GPU not in the table.

    ``NVIDIA H100 80GB HBM3`` is the SXM part; NVL variants have other clocks, so they are
    left out rather than matched to the wrong row.
    """
    upper = name.upper()
    if "NVL" in upper:
        return None
    if "H200" in upper:
        return "H200"
    if "H100" in upper:
        return "H100 PCIe" if "PCIE" in upper else "H100 SXM"
    if "A100" in upper:
        return "A100"
    return None


def peak_tflops(name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of the GPU called ``name`` at ``precision`` (bf16, tf32, fp32)."""
    model = known_gpu(name)
    return None if model is None else PEAK_TFLOPS[model][precision]


# -- counting ----------------------------------------------------------------------------------


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def _extra_flop_formulas() -> dict[Any, Any]:
    """Fused attention on the CPU, which FlopCounterMode does not count by itself (the CUDA
    kernels it does): the same formulas as for the CUDA kernels."""
    aten = torch.ops.aten
    formulas = {
        "_scaled_dot_product_flash_attention_for_cpu": _cpu_attention_flops,
        "_scaled_dot_product_flash_attention_for_cpu_backward": _cpu_attention_backward_flops,
    }
    return {getattr(aten, op): f for op, f in formulas.items() if hasattr(aten, op)}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (run it once) as ``FlopCounterMode`` counts them.

    Matmuls, convolutions and attention, forward and backward when ``fn`` runs a backward
    pass; a multiply-add counts as 2 FLOPs. FFTs, element-wise ops and the optimiser's
    update are not counted.
    """
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas()) as c:
        fn()
    return int(c.get_total_flops())


# -- utilisation -----------------------------------------------------------------------------


def _peak(
    device: torch.device, name: str, amp_on: bool, given: float | None
) -> tuple[float | None, str | None, str | None]:
    """(peak TFLOP/s, its precision, a note when there is none) for this device."""
    if given is not None:
        return given, "given", None
    if device.type != "cuda":
        note = f"no peak table for {device.type}: achieved TFLOP/s only (--peak-tflops sets one)"
        return None, None, note
    tf32 = torch.backends.cuda.matmul.allow_tf32
    precision = "bf16" if amp_on else ("tf32" if tf32 else "fp32")
    peak = peak_tflops(name, precision)
    if peak is None:
        return None, precision, f"{name} is not in the peak table: pass --peak-tflops for an MFU"
    return peak, precision, None


def _rates(step: CountedStep, peak: float | None) -> tuple[float, float, float | None]:
    """GFLOP per step, achieved TFLOP/s and the MFU (None without a peak)."""
    flops = float(step.flops or 0)
    achieved = flops / step.seconds / 1e12
    return flops / 1e9, achieved, (achieved / peak if peak else None)


def mfu_figures(
    mfm: CountedStep | None = None,
    sup: CountedStep | None = None,
    device: torch.device | None = None,
    name: str = "",
    amp_on: bool = False,
    peak: float | None = None,
) -> dict[str, Any]:
    """The MFU keys of the benchmark for the MFM and the supervised step; all null when not
    asked for (no steps given). ``peak`` (TFLOP/s) overrides the table."""
    out: dict[str, Any] = dict.fromkeys((*MFU_KEYS, *SUPERVISED_MFU_KEYS, "mfu_note"))
    if mfm is None or sup is None or device is None:
        return out
    peak, precision, note = _peak(device, name, amp_on, peak)
    gflop, achieved, mfu = _rates(mfm, peak)
    sup_gflop, sup_achieved, sup_mfu = _rates(sup, peak)
    out.update(
        step_gflop=gflop,
        achieved_tflops=achieved,
        peak_tflops=peak,
        peak_precision=precision,
        mfu=mfu,
        supervised_step_gflop=sup_gflop,
        supervised_achieved_tflops=sup_achieved,
        supervised_mfu=sup_mfu,
        mfu_note=note,
    )
    return out


# -- the training stages ------------------------------------------------------------------
def training_utilisation(
    local_step_flops: int,
    images_per_second: float,
    global_batch: int,
    device: torch.device,
    amp_on: bool,
) -> dict[str, Any]:
    """MFU keys for a training stage's metrics: one process's FLOPs per step times the steps
    a second the whole run made (every process steps together), over one GPU's peak."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    peak, precision, _ = _peak(device, name, amp_on, None)
    achieved = local_step_flops * images_per_second / global_batch / 1e12
    return {
        "step_gflop": local_step_flops / 1e9,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "peak_precision": precision,
        "mfu": achieved / peak if peak else None,
        "device_name": name,
    }
