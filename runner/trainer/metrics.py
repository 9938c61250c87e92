"""What a run reports: the JSONL metrics stream, the progress line, MFU, memory, the summary."""

from __future__ import annotations

import json
import os
import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

PEAK_ENV = "RUNNER_PEAK_TFLOPS"
# Dense (no sparsity) tensor-core peaks in TFLOPS from the vendors' datasheets, by a
# substring of torch.cuda.get_device_name(); "fp32" means TF32 matmuls. The runner's
# catalog is the fuller source and passes its number in RUNNER_PEAK_TFLOPS.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "fp32": 494.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp8": 1513.0, "fp32": 378.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "fp32": 494.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp8": 733.0, "fp32": 183.0},
    "RTX 4090": {"bf16": 165.0, "fp16": 165.0, "fp8": 330.0, "fp32": 82.6},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp8": 242.0, "fp32": 60.0},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's peak FLOP/s for the run's precision, or None when unknown (CPU, MPS, unlisted)."""
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():  # ordered so that "H100 PCIe" wins over "H100"
        if key in name:
            tflops = peaks.get(precision)
            return tflops * 1e12 if tflops else None
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max reserved by the caching allocator; MPS: driver allocation now; CPU: max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device)
    if device.type == "mps":
        return torch.mps.driver_allocated_memory()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


@dataclass(frozen=True)
class MemoryBreakdown:
    """Measured memory of the training state, to set against the planner's estimate."""

    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    peak_bytes: int
    activation_bytes: int  # peak minus the static part (params + grads + optimizer state)


def measure_memory(model: torch.nn.Module, optimizer: torch.optim.Optimizer, peak_bytes: int) -> MemoryBreakdown:
    """This process's share: under FSDP parameters and states are DTensors and only the local shard counts."""
    params = sum(_local_bytes(p) for p in model.parameters())
    grads = sum(_local_bytes(p) for p in model.parameters() if p.requires_grad)
    state = sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return MemoryBreakdown(params, grads, state, peak_bytes, max(0, peak_bytes - params - grads - state))


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


@dataclass
class Summary:
    """RUN_DIR/summary.json: how the run ended and what it cost."""

    exit_reason: str = "error"  # budget_reached | early_stop | max_time | cancelled | error
    error: str | None = None
    steps: int = 0
    planned_steps: int | None = None
    tokens: int = 0
    planned_tokens: int | None = None
    wall_s: float = 0.0
    tokens_per_s: float | None = None  # mean over this process's training steps
    mfu: float | None = None
    peak_bytes: int | None = None
    best_eval_loss: float | None = None
    final_eval_loss: float | None = None
    final_loss: float | None = None
    resumed_from_step: int | None = None
    checkpoint: str | None = None  # the last checkpoint written, relative to the run directory
    memory: dict = field(default_factory=dict)

    def write(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / ".summary.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, run_dir / "summary.json")


class MetricsLog:
    """Appends one JSON object per line to RUN_DIR/metrics.jsonl (a resumed run continues it)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", buffering=1)

    def write(self, event: str, **fields) -> None:
        self._file.write(json.dumps({"event": event, **fields}) + "\n")

    def close(self) -> None:
        self._file.close()


def progress_line(step: int, total: int, loss: float, lr: float, tokens_per_s: float, mfu: float | None,
                  budget_pct: float, elapsed_s: float) -> str:
    mfu_text = f"mfu {mfu * 100:4.1f}%" if mfu is not None else "mfu -"
    return (f"step {step:>6}/{total} | loss {loss:.4f} | lr {lr:.2e} | {_si(tokens_per_s)} tok/s | "
            f"{mfu_text} | {budget_pct:5.1f}% | {_clock(elapsed_s)}")


def _si(value: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"
