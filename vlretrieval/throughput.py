"""How much of the chip a run uses: FLOPs per step from XLA's cost analysis of the compiled step,
achieved TFLOP/s per device, and model FLOPs utilisation (MFU) where the chip's peak is known.

The FLOPs are XLA's count for the program each device runs (after SPMD partitioning), so they
include the backward pass, recomputation (remat) and the optimizer update: what the chip
executes, which is what MFU divides by the peak.
"""

from __future__ import annotations

import time
from typing import Any

# Dense peak TFLOP/s per chip, (bfloat16, float32). GPUs' float32 figure is TF32 on the tensor
# cores, which XLA uses for float32 matmuls at the default precision; TPUs have no float32 matmul
# unit (XLA runs it as several bfloat16 passes), so no float32 peak is listed for them. The first
# entry whose name is in the device kind wins, so the more specific names come first.
PEAK_TFLOPS: tuple[tuple[str, tuple[float, float | None]], ...] = (
    ("H100 PCIe", (756.0, 378.0)),
    ("H100", (989.4, 494.7)),
    ("H200", (989.4, 494.7)),
    ("A100", (312.0, 156.0)),
    ("TPU v5 lite", (197.0, None)),  # v5e
    ("TPU v5e", (197.0, None)),
    ("TPU v5p", (459.0, None)),
    ("TPU v5", (459.0, None)),  # v5p reports itself as "TPU v5"
    ("TPU v4", (275.0, None)),
)


def peak_tflops(device_kind: str, dtype: str, override: float = 0.0) -> float | None:
    """The chip's dense peak for `dtype` ("bfloat16" | "float32"), `override` if set, else None
    (an unknown chip, such as a CPU: then no MFU is reported)."""
    if override:
        return float(override)
    for name, (bfloat16, float32) in PEAK_TFLOPS:
        if name in device_kind:
            return bfloat16 if dtype == "bfloat16" else float32
    return None


def compiled_flops(compiled: Any) -> float:
    """FLOPs of one call of a compiled function on one device (XLA's cost analysis)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older jaxlibs: one dict per program
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0)) if analysis else 0.0


class StepMeter:
    """Throughput over the steps between two logs: examples/s, TFLOP/s per device and MFU.

    `mark(step)` is called only where the loop already waits for the device (a log step), so
    the wall time between marks covers whole steps, not their asynchronous dispatch.
    """

    def __init__(self, start_step: int, examples_per_step: int, flops_per_step: float,
                 peak: float | None):
        self.examples_per_step = examples_per_step
        self.flops_per_step = flops_per_step
        self.peak = peak
        self.last_step, self.last_time = start_step, time.perf_counter()

    def restart(self, step: int) -> None:
        """Start the next interval now (after work that is not training: an evaluation, say)."""
        self.last_step, self.last_time = step, time.perf_counter()

    def mark(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        seconds = max(now - self.last_time, 1e-9)
        steps_per_second = (step - self.last_step) / seconds
        self.restart(step)
        figures = {"examples_per_second": steps_per_second * self.examples_per_step}
        if self.flops_per_step:
            tflops = steps_per_second * self.flops_per_step / 1e12
            figures["tflops_per_second_per_device"] = tflops
            if self.peak:
                figures["mfu"] = tflops / self.peak
        return figures


def describe(flops_per_step: float, peak: float | None, device_kind: str, dtype: str) -> str:
    """The start-up line's account of the step's cost."""
    text = f"step: {flops_per_step / 1e9:.3g} GFLOP per device (XLA cost analysis)"
    if peak:
        return text + f"; MFU against {peak:g} TFLOP/s ({device_kind}, {dtype})"
    return text + (f"; no known peak for {device_kind!r} ({dtype}): set config.train.peak_tflops "
                   "to log MFU")
