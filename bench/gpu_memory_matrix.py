"""Peak memory and step time of the trainer on one GPU, next to the planner's prediction for the same job.

    python bench/gpu_memory_matrix.py --part matrix --out gpu-matrix   # 19 jobs, ~12 min on an H200
    python bench/gpu_memory_matrix.py --part fit24 --out gpu-fit24     # 151 jobs under a 24 GB cap, ~50 s each
    python bench/gpu_memory_matrix.py --part fit40 --out gpu-fit40     # 118 jobs under a 40 GB cap, ~70 s each
    python bench/gpu_memory_matrix.py --part all --dry-run             # the jobs and predictions only, no torch
    python bench/gpu_memory_matrix.py --tiny --device cpu --limit 2 --out x   # a CPU smoke test
    python bench/gpu_memory_matrix.py --replan RESULTS.json ...         # saved results against today's planner
    python bench/gpu_memory_matrix.py --part fit24 --only NAME --slack --out x  # the cap NAME needs above its peak
    python bench/gpu_memory_matrix.py --part fit24 --beyond 3 --only NAMES --out x  # past the boundary: where it really is

No configuration starts after ``--budget-s`` (540 s): the rest are listed as
not run, and ``--only NAME,NAME`` runs them in another invocation. With
``--part all`` raise the budget (about 30 minutes in all).

Method. Every configuration runs in its own subprocess (``--one CONFIG_JSON``),
so each starts from a fresh CUDA context and an empty caching allocator, set
up as the trainer sets it (expandable segments, ``runner.trainer.allocator``). The
child builds the model with the trainer's own ``build_model`` from an
``Experiment`` made in code (random weights: memory and speed do not depend on
their values), makes the trainer's optimizer (fused AdamW on CUDA) with its
states made before the first step as the trainer makes them
(``--lazy-optimizer-state``: in the first step, as torch does) and ``Engine``,
and trains on random tokens, moved to the GPU per step the way the training
loop moves them. The matrix takes 3 warm-up and 5 timed steps, the fit
checks 1 and 2; the peak counts every step, compilation included.

What is measured, per configuration:
- ``max_reserved_bytes`` / ``max_allocated_bytes``: torch's caching-allocator peaks;
- ``context_bytes``: device memory in use right after the CUDA context is made,
  less what was in use before the child touched the GPU (nvidia-smi);
- ``runtime_bytes``: device memory at the end that is not the allocator's
  (context, loaded kernels, library handles): used at the end, less the same
  baseline, less torch's reserved memory at the end;
- ``peak_bytes`` = max reserved + runtime: the process's peak, the figure the
  planner's ``peak_bytes`` predicts (under a cap: its ``required_bytes``, what
  a card at its limit needs, since there the allocator gives its cache back to
  the next request). Without a cap the allocator never hands memory back
  during training, so nvidia-smi's figure for the process at the end
  (``smi_process_bytes``) is its figure at peak; it should match ``peak_bytes``
  (``smi_compute_apps`` lists every process on the GPU at the end, should a
  compile worker have made a context of its own);
- step time from CUDA events recorded between the timed ``Engine.step`` calls
  (the host does not wait in between, as in the training loop), and tokens/s.

Out of memory is caught in the child and reported as ``status: oom``; a crash
or a timeout is reported as such and the matrix goes on.

Predictions come from ``runner.plan.plan_job`` for the same job on a host with
the catalog's ``h100-80gb`` profile (the fit checks: ``rtx-4090``,
``a100-40gb``): every ``MemoryBreakdown`` term, the predicted peak and
allocated bytes, ``Plan.fits`` and ``Plan.tokens_per_s``. Errors are
``(predicted - measured) / measured``: positive means the planner is cautious.

Fit checks (``fit24``, ``fit40``) emulate a smaller card on the big one: the
child caps the allocator with ``torch.cuda.set_per_process_memory_fraction``
before it allocates anything, at the profile's usable capacity (memory x usable
share, what ``Plan.fits`` is checked against) less the context it has just
made (with ``--shared-gpu``, other processes allocate meanwhile, so its context
is nvidia-smi's figure for the process alone), the kernels the first step loads
and one page the allocator may map past its cap (``ALLOCATOR_PAGE_BYTES``).
For each base job the planner picks the largest micro-batch it says fits,
those it says are at the limit (``Plan.at_limit``: too near the card for the
estimate to decide) and the first it says does not fit; a 7B full fine-tune is
the clear "does not fit" case, and it is only ever tried under a cap. A run fits
when it finishes and its ``peak_bytes`` stays within the capacity; the verdict
is right when that agrees with ``Plan.fits``, and a job at the limit has none
(the table says how it went). Matrix runs get the same verdict against the
whole 80 GB card.

Step time after a probe, as ``runner probe`` measures a host and
``runner.calibration`` plans from it: each matrix run also times steps at a
quarter and at half of its micro-batch (a probe's later runs) and at three
quarters of it (a job the probe did not run), in the same process (a compiled
model is compiled afresh for each, as a new process would). Its micro-batch,
its half and its quarter become three probe observations of the shape, trained
its way (precision, LoRA, checkpointing, compiled or not); the planner,
calibrated by the real ``Calibration`` from all of them, predicts the three
quarters, out of sample (target: within 15%). Results saved before probes took
three micro-batches re-plan as they were made: a probe at the micro-batch and
its quarter, the half predicted. For
comparison, ``step_nearest`` predicts it with the shape's own observations
left out: from the nearest other shape trained the same way, scaled by FLOPs
per token, where there is one. Fit runs are predicted the same way, unless
their part ran beside another on the same GPU (``--shared-gpu``), which
leaves their memory verdicts valid and their step times not.

Reading the output: one JSON per configuration and ``results.json`` (all of
them and a summary) under ``--out``; the last lines printed are a table and the
summary. Columns: measured and predicted peak (GiB) and the error, the
micro-batch whose step was predicted from the probes, its measured and
predicted step time and the error, the error from other shapes alone
(``near%``), and the verdict: ``ok`` when the
planner's fits/does-not-fit agrees with the run, ``at the limit`` (and how it
went) where the planner does not decide, ``WRONG`` (with the reason)
when it does not. Needs torch, transformers, peft and pydantic; not
``datasets``, bitsandbytes or torchao.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runner.calibration import Calibration, Observation  # noqa: E402
from runner.capacity import SMALLER_SHARES  # noqa: E402
from runner.hosts import Host  # noqa: E402
from runner.plan import Plan, plan_job  # noqa: E402
from runner.plan.cost import executed_flops_per_token  # noqa: E402
from runner.plan.memory import CUDA_KERNELS_BYTES  # noqa: E402
from runner.spec import Experiment, Job, resolve_shape  # noqa: E402
from runner.trainer import allocator  # noqa: E402
from runner.yamldoc import Doc  # noqa: E402

GiB = 2**30
H100 = "h100-80gb"
FIT_PROFILES = {"fit24": "rtx-4090", "fit40": "a100-40gb"}
MEMORY_TARGET = 0.10
STEP_TARGET = 0.15
# --tiny: a 2-layer model, short rows and small batches; the selection of batch sizes still uses the real shapes.
TINY = {"layers": 2, "hidden": 64, "heads": 2, "kv_heads": 2, "intermediate": 128, "vocab_size": 512, "max_positions": 128}
TINY_SEQ_LEN, TINY_MICRO_BATCH = 64, 2
MAX_FIT_MICRO_BATCH = 512
RESULT_MARK = "RESULT "
SHARED_CONTEXT_BYTES = 527 * 2**20  # a CUDA context on the H100 and the H200, where nvidia-smi shows no pids
# The allocator checks its fraction against the size asked for, then maps whole pages of its
# large pool (20 MiB) with expandable segments: it can map up to one page past the fraction
# (llama-1b seq 512 b63 on the 24 GB cap did, by 11 MiB, twice, 2026-12-01). A physical card
# cannot give that page, so the cap leaves it out.
ALLOCATOR_PAGE_BYTES = 20 * 2**20


@dataclass(frozen=True)
class Config:
    """One training job to run and to plan."""

    model: str  # a preset name
    seq_len: int
    micro_batch: int
    precision: str  # bf16 | fp16 | fp32 (the child trains fp32 on a CPU, as the trainer does)
    checkpointing: bool = False
    compile: bool = False
    lora: bool = False  # rank 16 on q/k/v/o, the base stored in the compute dtype
    profile: str = H100  # the catalog profile predicted for (and emulated, below 80 GB)
    cap_bytes: int | None = None  # allocator cap for the emulated card; None: the whole GPU
    warmup_steps: int = 3
    timed_steps: int = 5
    tiny: bool = False
    extra_micro_batches: tuple[int, ...] = ()  # timed after the run: the probe's smaller ones, then the job's
    job_micro_batch: int | None = None  # of those, the one predicted from the probe's (out of sample)
    shared_gpu: bool = False  # other processes use the GPU meanwhile (--shared-gpu)
    lazy_optimizer_state: bool = False  # AdamW makes its states in the first step, not before it (--lazy-optimizer-state)

    @property
    def name(self) -> str:
        flags = "".join(f"-{f}" for f, on in (("lora", self.lora), ("ckpt", self.checkpointing),
                                               ("compile", self.compile)) if on)
        suffix = ("-lazy" if self.lazy_optimizer_state else "") + ("-tiny" if self.tiny else "")
        return f"{self.profile}_{self.model}-s{self.seq_len}-b{self.micro_batch}-{self.precision}{flags}{suffix}"


def matrix() -> list[Config]:
    """The configurations measured against their predictions on the whole 80 GB card.

    Different kinds come first so that a run cut short by the time budget still
    spans them, then the 7B LoRA jobs, which the issue names.
    """
    c = Config
    configs = [
        c("gpt2-124m", 1024, 16, "bf16", compile=True),
        c("gpt2-124m", 1024, 16, "fp16"),
        c("gpt2-124m", 1024, 8, "fp32"),
        c("llama-7b", 512, 4, "fp16", checkpointing=True, lora=True),
        c("llama-7b", 1024, 2, "fp16", lora=True),
        c("gpt2-124m", 1024, 16, "bf16"),
        c("gpt2-124m", 512, 32, "bf16", checkpointing=True),
        c("gpt2-355m", 1024, 8, "bf16"),
        c("gpt2-355m", 1024, 16, "bf16"),
        c("gpt2-355m", 512, 16, "fp16", checkpointing=True),
        c("d12", 2048, 8, "bf16"),
        c("d12", 1024, 16, "bf16", compile=True),
        c("d20", 2048, 16, "bf16", compile=True),
        c("d20", 2048, 4, "bf16"),
        c("d20", 2048, 16, "bf16", checkpointing=True),
        c("llama-1b", 2048, 4, "bf16"),
        c("llama-1b", 1024, 14, "bf16", checkpointing=True),
        c("llama-1b", 512, 8, "fp16"),
        c("d20", 1024, 8, "fp32"),
    ]
    return [with_probe(config) for config in configs]


def with_probe(config: Config) -> Config:
    """The configuration timed, after its run, at a probe's smaller micro-batches (a quarter and a half, as
    ``runner probe`` takes them), then at a job's between the probe's two largest (three quarters)."""
    micro_batch = config.micro_batch
    probe = sorted({max(1, micro_batch // share) for share in SMALLER_SHARES} - {micro_batch})
    job = 3 * micro_batch // 4
    if job in probe or not 1 <= job < micro_batch:
        return replace(config, extra_micro_batches=tuple(probe))
    return replace(config, extra_micro_batches=(*probe, job), job_micro_batch=job)


def fit_bases(part: str) -> list[Config]:
    """Jobs whose micro-batch the planner pushes to the edge of a 24 GB or 40 GB card."""
    c = Config
    if part == "fit24":
        bases = [
            c("gpt2-124m", 1024, 1, "bf16"),
            c("gpt2-124m", 1024, 1, "bf16", compile=True),
            c("gpt2-355m", 1024, 1, "bf16", checkpointing=True),
            c("d12", 2048, 1, "bf16"),
            c("d20", 2048, 1, "bf16", checkpointing=True),
            c("llama-1b", 1024, 1, "bf16", checkpointing=True),
            c("llama-7b", 512, 1, "fp16", checkpointing=True, lora=True),
            c("llama-7b", 512, 1, "bf16"),  # full fine-tune: 16 B/param alone is 108 GB
            c("gpt2-124m", 1024, 1, "bf16", checkpointing=True),
            c("d12", 2048, 1, "bf16", checkpointing=True),
            # added on 2026-12-01, then fitted to with the rest (the checkpointed backward, the cap slack)
            c("gpt2-355m", 512, 1, "bf16", checkpointing=True),
            c("llama-1b", 2048, 1, "bf16", checkpointing=True),
            c("d12", 1024, 1, "bf16", checkpointing=True),
            c("d20", 1024, 1, "fp16", checkpointing=True),
            c("llama-160m", 2048, 1, "bf16", checkpointing=True),
            c("llama-7b", 1024, 1, "fp16", checkpointing=True, lora=True),
            c("d20", 1024, 1, "bf16"),
            c("llama-160m", 1024, 1, "bf16"),
            # out of sample for the planner of 2026-12-01: run after its last fit
            c("llama-160m", 1024, 1, "bf16", checkpointing=True),
            c("gpt2-124m", 512, 1, "bf16", checkpointing=True),
            c("d20", 2048, 1, "fp16", checkpointing=True),
            c("llama-1b", 512, 1, "bf16", checkpointing=True),
            c("factorized-197m", 1024, 1, "bf16", checkpointing=True),
            # out of sample too, run with the cap one allocator page lower: fp32 with checkpointing, and
            # a compiled factorized model
            c("d20", 1024, 1, "fp32", checkpointing=True),
            c("llama-1b", 1024, 1, "fp32", checkpointing=True),
            c("factorized-197m", 1024, 1, "bf16", compile=True),
            # out of sample for the fp32 refit (the MLP's recompute, no cap slack)
            c("llama-160m", 1024, 1, "fp32", checkpointing=True),
            c("d12", 1024, 1, "fp32", checkpointing=True),
            # out of sample for the 2 B residual stream of a factorized embedding, eager
            c("factorized-197m", 1024, 1, "bf16"),
            # out of sample for the output's backward and the cap slack of eager jobs
            c("gpt2-355m", 512, 1, "bf16"),
            c("gpt2-124m", 512, 1, "bf16"),
            c("llama-1b", 512, 1, "bf16"),
            c("d20", 2048, 1, "fp16"),
            c("factorized-197m", 512, 1, "fp16"),
            # out of sample: torch.compile with checkpointing, never measured at a card's edge before
            c("gpt2-124m", 1024, 1, "bf16", checkpointing=True, compile=True),
            c("d20", 2048, 1, "bf16", checkpointing=True, compile=True),
            c("llama-1b", 1024, 1, "bf16", checkpointing=True, compile=True),
            # out of sample for the compiled recompute's final fit: shapes, lengths and fp16 it never saw
            c("d12", 1024, 1, "bf16", checkpointing=True, compile=True),
            c("llama-160m", 1024, 1, "bf16", checkpointing=True, compile=True),
            c("llama-1b", 512, 1, "bf16", checkpointing=True, compile=True),
            c("factorized-197m", 1024, 1, "bf16", checkpointing=True, compile=True),
            c("gpt2-355m", 1024, 1, "fp16", checkpointing=True, compile=True),
            # out of sample for compiled jobs without checkpointing, refitted once the causal mask was gone
            c("d12", 1024, 1, "bf16", compile=True),
            c("llama-160m", 2048, 1, "bf16", compile=True),
            c("gpt2-355m", 512, 1, "bf16", compile=True),
            c("llama-1b", 512, 1, "bf16", compile=True),
            # out of sample for that refit's per-layer term
            c("d20", 1024, 1, "bf16", compile=True),
            c("gpt2-124m", 512, 1, "bf16", compile=True),
        ]
    else:
        bases = [
            c("gpt2-355m", 1024, 1, "bf16"),
            c("gpt2-124m", 1024, 1, "fp32"),
            c("d20", 2048, 1, "bf16", compile=True),
            c("llama-1b", 2048, 1, "bf16"),
            c("llama-1b", 2048, 1, "fp16", checkpointing=True),
            c("llama-7b", 1024, 1, "fp16", checkpointing=True, lora=True),
            c("llama-7b", 512, 1, "fp16", lora=True),
            c("llama-7b", 512, 1, "bf16"),
            c("d20", 2048, 1, "bf16", checkpointing=True),
            c("llama-1b", 1024, 1, "bf16", checkpointing=True),
            # added on 2026-12-01, then fitted to with the rest (the checkpointed backward, the cap slack)
            c("gpt2-355m", 1024, 1, "bf16", checkpointing=True),
            c("d12", 2048, 1, "bf16", checkpointing=True),
            c("gpt2-124m", 1024, 1, "fp16", checkpointing=True),
            c("llama-7b", 512, 1, "fp16", checkpointing=True, lora=True),
            c("gpt2-355m", 512, 1, "fp16"),
            # out of sample for the planner of 2026-12-01: run after its last fit
            c("llama-160m", 2048, 1, "bf16", checkpointing=True),
            c("d20", 1024, 1, "bf16", checkpointing=True),
            c("llama-1b", 1024, 1, "fp16", checkpointing=True),
            c("gpt2-355m", 512, 1, "bf16", checkpointing=True),
            c("d12", 1024, 1, "bf16", checkpointing=True),
            # out of sample too, run with the cap one allocator page lower: fp32 with checkpointing
            c("llama-160m", 2048, 1, "fp32", checkpointing=True),
            c("d12", 2048, 1, "fp32", checkpointing=True),
            # out of sample for the fp32 refit (the MLP's recompute, no cap slack)
            c("d20", 2048, 1, "fp32", checkpointing=True),
            c("llama-1b", 2048, 1, "fp32", checkpointing=True),
            # out of sample for the 2 B residual stream of a factorized embedding, eager and checkpointed
            c("factorized-197m", 1024, 1, "bf16"),
            c("factorized-197m", 1024, 1, "bf16", checkpointing=True),
            c("factorized-197m", 2048, 1, "bf16", checkpointing=True),
            # out of sample for the output's backward and the cap slack of eager jobs
            c("gpt2-124m", 1024, 1, "bf16"),
            c("llama-160m", 1024, 1, "bf16"),
            c("d12", 1024, 1, "bf16"),
            c("gpt2-355m", 512, 1, "bf16"),
            # out of sample: torch.compile with checkpointing
            c("llama-160m", 2048, 1, "bf16", checkpointing=True, compile=True),
            c("llama-1b", 2048, 1, "bf16", checkpointing=True, compile=True),
            # out of sample for the compiled recompute's final fit
            c("d20", 1024, 1, "bf16", checkpointing=True, compile=True),
            c("gpt2-355m", 1024, 1, "bf16", checkpointing=True, compile=True),
            c("d12", 2048, 1, "bf16", checkpointing=True, compile=True),
            # out of sample for compiled jobs without checkpointing
            c("gpt2-355m", 1024, 1, "bf16", compile=True),
            c("llama-160m", 1024, 1, "bf16", compile=True),
            c("d12", 2048, 1, "bf16", compile=True),
            c("gpt2-124m", 1024, 1, "fp16", compile=True),
            c("llama-1b", 1024, 1, "bf16", compile=True),
            c("factorized-197m", 2048, 1, "bf16", compile=True),
        ]
    return [replace(b, profile=FIT_PROFILES[part], warmup_steps=1, timed_steps=2) for b in bases]


# -- the job, as the planner and the trainer see it ------------------------------------------------

def experiment(config: Config) -> Experiment:
    seq_len, micro_batch = config.seq_len, config.micro_batch
    model: dict = {"preset": config.model}
    if config.tiny:
        seq_len, micro_batch = min(seq_len, TINY_SEQ_LEN), min(micro_batch, TINY_MICRO_BATCH)
        model["overrides"] = TINY
    return Experiment.model_validate({
        "name": "gpu-memory-matrix",
        "model": model,
        # Declared size only: the planner needs one for its budget arithmetic, the bench feeds random tokens.
        "data": {"sources": [{"path": "random-tokens.txt", "tokens": 10**12}], "seq_len": seq_len},
        "train": {"batch_size": micro_batch, "grad_accum": 1, "precision": config.precision,
                  "gradient_checkpointing": config.checkpointing, "compile": config.compile, "warmup_steps": 0},
        "lora": {"rank": 16} if config.lora else None,
        "budget": {"max_steps": config.warmup_steps + config.timed_steps},
    })


def job_for(config: Config) -> Job:
    return Job(spec=experiment(config), file="bench/gpu_memory_matrix.py", doc=Doc({}, "bench/gpu_memory_matrix.py"))


def plan_for(config: Config, profile: str, throughput=None) -> Plan:
    return plan_job(job_for(config), Host(name=profile, profile=profile), throughput=throughput)


def tokens_per_step(config: Config) -> int:
    spec = experiment(config)
    return spec.train.batch_size * spec.seq_len  # type: ignore[operator]


def prediction(config: Config, plan: Plan) -> dict:
    """The planner's numbers for one job: verdict, every memory term, speed."""
    m = plan.memory
    assert m is not None  # a catalog profile is never unknown hardware
    return {
        "profile": plan.profile, "fits": plan.fits, "at_limit": plan.at_limit, "passes": plan.passes,
        "reasons": list(plan.reasons),
        "warnings": list(plan.warnings),
        "peak_bytes": m.peak_bytes, "allocated_bytes": m.allocated_bytes, "required_bytes": m.required_bytes,
        "reserved_bytes": m.allocated_bytes + m.headroom_bytes, "capacity_bytes": m.capacity_bytes,
        "backward_peak_bytes": m.backward_peak_bytes, "step_peak_bytes": m.step_peak_bytes,
        "breakdown": asdict(m),
        "tokens_per_s": plan.tokens_per_s, "step_s": tokens_per_step(config) / plan.tokens_per_s,
        "throughput_source": plan.throughput_source,
    }


def config_of(entry: dict) -> Config:
    """An entry's configuration (results saved before a field was dropped still load)."""
    fields = {k: v for k, v in entry["config"].items() if k in Config.__dataclass_fields__}
    extra = fields["extra_micro_batches"] = tuple(fields.get("extra_micro_batches", ()))
    if "job_micro_batch" not in fields and len(extra) > 1:  # saved when a probe took a quarter and a job the half
        fields["job_micro_batch"] = extra[1]
    return Config(**fields)


def executed_flops(config: Config) -> float:
    """FLOPs the device runs per token of this job (checkpointing's recomputation included)."""
    job = job_for(config)
    return executed_flops_per_token(resolve_shape(job), job.spec.seq_len, lora=config.lora,
                                    gradient_checkpointing=config.checkpointing)


# -- the child: one configuration in a fresh process ----------------------------------------------

def smi(*query: str) -> list[list[str]] | None:
    """Rows of an nvidia-smi CSV query, or None where nvidia-smi is missing or fails."""
    try:
        done = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return [[cell.strip() for cell in line.split(",")] for line in done.stdout.strip().splitlines() if line.strip()]


def mib_bytes(cell: str) -> int | None:
    """nvidia-smi's MiB figure in bytes; None for "[N/A]" and the like."""
    try:
        return int(float(cell) * 2**20)
    except ValueError:
        return None


def smi_gpu_used_bytes() -> int | None:
    """The GPU's used memory by nvidia-smi (the first visible GPU)."""
    rows = smi("--query-gpu=index,memory.used")
    if not rows:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    row = next((r for r in rows if r[0] == visible), rows[0])
    return mib_bytes(row[-1])


def smi_apps() -> list[tuple[str, int | None]]:
    """(pid, used bytes) of every compute process nvidia-smi lists on the GPU."""
    return [(row[0], mib_bytes(row[-1])) for row in smi("--query-compute-apps=pid,used_memory") or [] if len(row) == 2]


def smi_process_bytes() -> int | None:
    """This process's device memory by nvidia-smi; None where its pid is not visible (containers)."""
    return next((used for pid, used in smi_apps() if pid == str(os.getpid())), None)


def run_one(config: Config, device_kind: str) -> dict:
    """Train the configuration for a few steps; memory, step times and the outcome."""
    import numpy as np
    import torch
    import transformers

    from runner.trainer.engine import Engine, init_optimizer_state, make_optimizer, set_fast_math
    from runner.trainer.loop import is_out_of_memory
    from runner.trainer.metrics import peak_memory_bytes
    from runner.trainer.models import build_model

    cuda = device_kind == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    precision = config.precision if cuda else "fp32"  # the trainer's rule on a CPU
    out: dict = {"status": "ok", "error": None, "phase": "setup", "device": device_kind, "device_name": "cpu",
                 "torch": torch.__version__, "transformers": transformers.__version__, "precision_run": precision,
                 "alloc_conf": os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    baseline = None
    if cuda:
        baseline = smi_gpu_used_bytes()  # before this process touches the GPU
        free, total = torch.cuda.mem_get_info(device)  # makes the context
        used = total - free
        context = used - baseline if baseline is not None else used
        if config.shared_gpu:  # others allocate meanwhile: only this process's own figure is its context
            context = smi_process_bytes() or SHARED_CONTEXT_BYTES
            baseline = used - context
        out.update(device_name=torch.cuda.get_device_name(device), total_bytes=total, baseline_bytes=baseline,
                   context_bytes=context, context_smi_process_bytes=smi_process_bytes())
        if config.cap_bytes:
            # What the card leaves torch's allocator: its capacity less the context and the kernels
            # the first step loads (outside the allocator, so a cap cannot stop them), less one page.
            fraction = (config.cap_bytes - context - CUDA_KERNELS_BYTES - ALLOCATOR_PAGE_BYTES) / total
            torch.cuda.set_per_process_memory_fraction(fraction, device)
            out.update(cap_bytes=config.cap_bytes, memory_fraction=fraction)

    spec = experiment(config)
    seq_len, micro_batch = spec.seq_len, spec.train.batch_size
    assert isinstance(micro_batch, int)
    set_fast_math(device, deterministic=False)
    torch.manual_seed(0)
    step_s: list[float] = []
    try:
        out["phase"] = "build"
        # Building on the device skips initialising billions of weights on the host first; the
        # trainer's .to(device) then has nothing to move. The trained state is the same.
        with torch.device(device):
            built = build_model(spec, ROOT, device, precision)
        model = built.model
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(trainable, "adamw", 3e-4, 0.1, device)
        if not config.lazy_optimizer_state:
            init_optimizer_state(optimizer)  # as the trainer does for a run that does not resume
        engine = Engine(model, optimizer, device=device, precision=precision, grad_clip=1.0, compile=config.compile)
        out.update(params=sum(p.numel() for p in model.parameters()), trainable_params=sum(p.numel() for p in trainable),
                   fused_adamw=bool(optimizer.defaults.get("fused")))
        vocab = model.get_input_embeddings().weight.shape[0]

        def timed(rows: int, warmup: int, steps: int) -> list[float]:
            """Seconds per step at ``rows`` per micro-batch, after ``warmup`` steps."""
            rng = np.random.default_rng(rows)
            drawn = [rng.integers(0, vocab, size=(rows, seq_len + 1), dtype=np.int64) for _ in range(2)]
            host = [(torch.from_numpy(r[:, :-1].copy()), torch.from_numpy(r[:, 1:].copy())) for r in drawn]
            if cuda:
                host = [(x.pin_memory(), y.pin_memory()) for x, y in host]

            def batch(i: int):
                x, y = host[i % len(host)]
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

            for i in range(warmup):
                engine.step(batch(i), 1, 3e-4)
                if cuda and i == 0 and "allocated_between_steps_bytes" not in out:
                    # What stays between steps: weights and optimizer states, gradients freed.
                    torch.cuda.synchronize(device)
                    out["allocated_between_steps_bytes"] = torch.cuda.memory_allocated(device)
                    out["first_step_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
            if not cuda:
                seconds = []
                for i in range(steps):
                    began_step = time.perf_counter()
                    out["final_loss"] = engine.step(batch(i), 1, 3e-4).item()
                    seconds.append(time.perf_counter() - began_step)
                return seconds
            torch.cuda.synchronize(device)
            # Events on the stream, no wait between steps: the host queues step i+1 while the GPU runs
            # step i, as in the training loop, so each interval is the GPU's time for one step.
            events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
            events[0].record()
            for i in range(steps):
                loss = engine.step(batch(i), 1, 3e-4)
                events[i + 1].record()
            events[-1].synchronize()
            out["final_loss"] = loss.item()
            return [a.elapsed_time(b) / 1000 for a, b in zip(events, events[1:])]

        out["phase"] = "warmup"
        if cuda:  # weights (and adapters) alone; the optimizer's states appear at its first step
            out["allocated_built_bytes"] = torch.cuda.memory_allocated(device)
        began = time.perf_counter()
        step_s = timed(micro_batch, config.warmup_steps, config.timed_steps)
        out["timed_wall_s"] = time.perf_counter() - began
        out["phase"] = "done"
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(exc):
            raise
        # Whole: torch's message says what was allocated and what was mapped but free at the failed request.
        out.update(status="oom", error=str(exc).strip().splitlines()[0][:1000])

    if cuda:
        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        reserved_end = torch.cuda.memory_reserved(device)
        max_reserved = torch.cuda.max_memory_reserved(device)
        runtime = (total - free) - (baseline or 0) - reserved_end
        if config.shared_gpu:
            runtime = (smi_process_bytes() or context + CUDA_KERNELS_BYTES + reserved_end) - reserved_end
        out.update(max_reserved_bytes=max_reserved, max_allocated_bytes=torch.cuda.max_memory_allocated(device),
                   reserved_end_bytes=reserved_end, device_used_end_bytes=total - free, runtime_bytes=runtime,
                   peak_bytes=max_reserved + runtime, smi_process_bytes=smi_process_bytes())
        # Other processes on the GPU (a compile worker that made a context, say) count in runtime_bytes.
        out["smi_compute_apps"] = [{"pid": pid, "used_bytes": used} for pid, used in smi_apps()]
    else:
        out.update(max_reserved_bytes=None, max_allocated_bytes=None, runtime_bytes=None,
                   peak_bytes=peak_memory_bytes(device), smi_process_bytes=None)  # peak RSS: not comparable

    # Smaller micro-batches after the memory is read: their steps are timed only.
    out["extra"] = []
    if out["status"] == "ok":
        for rows in config.extra_micro_batches:
            rows = experiment(replace(config, micro_batch=rows)).train.batch_size
            if config.compile:
                torch._dynamo.reset()  # compiled for this shape alone, as a probe's own process compiles
            extra_s = timed(rows, 2 if config.compile else 1, max(3, config.timed_steps // 2 + 1))
            out["extra"].append({"micro_batch": rows, "tokens_per_step": rows * seq_len, "step_s": extra_s,
                                 "mean_step_s": sum(extra_s) / len(extra_s)})

    tokens = micro_batch * seq_len
    mean_s = sum(step_s) / len(step_s) if step_s and out["status"] == "ok" else None
    out.update(step_s=step_s, mean_step_s=mean_s, tokens_per_step=tokens,
               tokens_per_s=tokens / mean_s if mean_s else None)
    return out


# -- the parent: run, compare, report -------------------------------------------------------------

def run_child(config: Config, device_kind: str, timeout_s: float, why_limit: str = "") -> dict:
    """Run one configuration in a subprocess (its own process group, so a timeout ends its compile workers too)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(asdict(config)), "--device", device_kind]
    began = time.monotonic()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            process_group=0)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return {"status": "timeout", "error": f"no result within {timeout_s:.0f} s{why_limit}",
                "wall_s": time.monotonic() - began, "stderr_tail": stderr[-3000:]}
    wall_s = time.monotonic() - began
    marked = [line for line in stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not marked:
        lines = [line for line in stderr.splitlines() if line.strip() and not line[0].isspace()]  # not hints, not frames
        return {"status": "error", "error": lines[-1][:300] if lines else f"exit code {proc.returncode}",
                "returncode": proc.returncode, "wall_s": wall_s, "stderr_tail": stderr[-3000:]}
    return {**json.loads(marked[-1][len(RESULT_MARK):]), "wall_s": wall_s}


def pct(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or not measured:
        return None
    return 100 * (predicted - measured) / measured


def verdict(predicted_fits: bool | None, measured: dict, capacity_bytes: int) -> dict:
    """Does the run fit the (emulated) card, and does the planner agree? Unknown on a CPU or after an error,
    and when the planner says the job is at the limit (``predicted_fits`` None): there it does not decide."""
    status = measured["status"]
    if status == "oom":
        actual, why = False, "out of memory"
    elif status != "ok":
        actual, why = None, status
    elif measured.get("device") != "cuda":
        actual, why = None, "no GPU: the cap cannot be emulated"
    elif measured["peak_bytes"] > capacity_bytes:
        actual, why = False, f"peak {measured['peak_bytes'] / GiB:.2f} GiB exceeds the cap {capacity_bytes / GiB:.2f} GiB"
    else:
        actual, why = True, "ran within the cap"
    return {"capacity_bytes": capacity_bytes, "predicted_fits": predicted_fits, "actual_fits": actual,
            "agrees": None if actual is None or predicted_fits is None else actual == predicted_fits, "why": why}


def boundary(base: Config, beyond: int = 0, below: int = 0) -> list[Config]:
    """The largest micro-batch the planner fits on the base's profile, those it calls at the limit, and the
    first it says does not fit (one run when none fits), then ``beyond`` more and ``below`` fewer: where the
    real boundary lies when the planner is known to be cautious, or optimistic."""
    def plan(micro_batch: int) -> Plan:
        return plan_for(replace(base, micro_batch=micro_batch), base.profile)

    def largest(ok: Callable[[Plan], bool]) -> int:
        low, high = 1, MAX_FIT_MICRO_BATCH
        while low < high:  # predicted memory grows with the micro-batch
            mid = (low + high + 1) // 2
            if ok(plan(mid)):
                low = mid
            else:
                high = mid - 1
        return low

    if not plan(1).fits:
        return [replace(base, micro_batch=1)]
    low = largest(lambda p: p.fits)
    high = largest(lambda p: p.fits or p.at_limit) + 1
    return [replace(base, micro_batch=mb) for mb in range(low - min(below, low - 1), high + 1 + beyond)]


def configs_for(part: str, tiny: bool, beyond: int = 0, below: int = 0) -> list[Config]:
    if part == "matrix":
        chosen = matrix()
    else:
        profile = FIT_PROFILES[part]
        cap = plan_for(fit_bases(part)[0], profile).memory.capacity_bytes  # type: ignore[union-attr]
        chosen = [replace(c, cap_bytes=cap) for base in fit_bases(part) for c in boundary(base, beyond, below)]
    return [replace(c, tiny=tiny) for c in chosen]


def expected_peak(config: Config, predicted: dict) -> int:
    """The peak the planner expects: on a card at its limit (a cap) what it needs, else what the allocator takes."""
    return predicted["required_bytes"] if config.cap_bytes else predicted["peak_bytes"]


def record(part: str, config: Config, measured: dict | None) -> dict:
    predicted = prediction(config, plan_for(config, config.profile))
    entry = {"name": config.name, "part": part, "config": asdict(config), "tokens_per_step": tokens_per_step(config),
             "executed_flops_per_token": executed_flops(config), "predicted": predicted, "measured": measured}
    if measured is None:
        return entry
    on_gpu = measured.get("device") == "cuda" and measured["status"] == "ok"
    entry["error_pct"] = {
        "peak": pct(expected_peak(config, predicted), measured.get("peak_bytes")) if on_gpu else None,
        "allocated": pct(predicted["allocated_bytes"], measured.get("max_allocated_bytes")) if on_gpu else None,
        "reserved": pct(predicted["reserved_bytes"], measured.get("max_reserved_bytes")) if on_gpu else None,
        "runtime": pct(predicted["breakdown"]["runtime_bytes"], measured.get("runtime_bytes")) if on_gpu else None,
        "step_catalog": pct(predicted["step_s"], measured.get("mean_step_s")) if on_gpu else None,
        "step_probed": None,
        "step_nearest": None,
    }
    entry["verdict"] = verdict(None if predicted["at_limit"] else predicted["fits"], measured,
                               predicted["capacity_bytes"])
    return entry


def timed_on_gpu(measured: dict | None) -> bool:
    """Ran on a GPU with its step times measured alone on it."""
    return bool(measured and measured.get("mean_step_s") and measured.get("device") == "cuda"
                and not measured.get("shared_gpu"))


def observation(config: Config, micro_batch: int, step_s: float) -> Observation:
    """One probe of the configuration's shape, trained its way, at ``micro_batch``, as calibration reads it."""
    spec = experiment(replace(config, micro_batch=micro_batch))
    tokens = spec.train.batch_size * spec.seq_len  # type: ignore[operator]
    return Observation(host=H100, profile=H100, shape=resolve_shape(job_for(config)), seq_len=spec.seq_len,
                       precision=config.precision, tokens_per_s=tokens / step_s, peak_bytes=None, overhead_s=0.0,
                       kind="probe", at=0.0, lora=config.lora, gradient_checkpointing=config.checkpointing,
                       compile=config.compile, micro_batch=spec.train.batch_size)  # type: ignore[arg-type]


def probe_observations(entries: list[dict]) -> list[Observation]:
    """What ``runner probe`` records for each matrix configuration: its micro-batch and the smaller ones."""
    out = []
    for e in entries:
        m = e["measured"]
        if e["part"] != "matrix" or not timed_on_gpu(m):
            continue
        config = config_of(e)
        out.append(observation(config, config.micro_batch, m["mean_step_s"]))
        out += [observation(config, extra["micro_batch"], extra["mean_step_s"])
                for extra in m.get("extra", []) if extra["micro_batch"] != config.job_micro_batch]
    return out


def predicted_step_s(config: Config, observations: list[Observation]) -> tuple[float, str]:
    """The planner's step time for the configuration, calibrated by the observations, and what it says of them."""
    plan = plan_for(config, H100, throughput=Calibration(tuple(observations)))
    return tokens_per_step(config) / plan.tokens_per_s, plan.throughput_source


def calibrate(entries: list[dict]) -> None:
    """Predict each step time not probed from the probes: a matrix run's job micro-batch, a fit run's own."""
    probes = probe_observations(entries)
    for e in entries:
        m, config = e["measured"], config_of(e)
        if not timed_on_gpu(m):
            continue
        if e["part"] == "matrix":
            job = [extra for extra in m.get("extra", []) if extra["micro_batch"] == config.job_micro_batch]
            if not job:
                continue
            config, measured_s = replace(config, micro_batch=job[0]["micro_batch"]), job[0]["mean_step_s"]
        else:
            measured_s = m["mean_step_s"]
        step, source = predicted_step_s(config, probes)
        if not source.startswith("calibrated"):
            continue  # nothing probed trains this way: the plan says so and keeps the catalog's figure
        own = resolve_shape(job_for(config)), experiment(config).seq_len
        others = [o for o in probes if (o.shape, o.seq_len) != own]
        nearest, nearest_source = predicted_step_s(config, others)
        e["predicted_probed"] = {"micro_batch": config.micro_batch, "measured_step_s": measured_s, "step_s": step,
                                 "source": source, "nearest_step_s": nearest, "nearest_source": nearest_source}
        e["error_pct"]["step_probed"] = pct(step, measured_s)
        e["error_pct"]["step_nearest"] = pct(nearest, measured_s) if nearest_source.startswith("calibrated") else None


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def summarize(entries: list[dict]) -> dict:
    ran = [e for e in entries if e["measured"] and e["measured"]["status"] == "ok"]
    peak = [e["error_pct"]["peak"] for e in ran if e["error_pct"]["peak"] is not None]
    step = [e["error_pct"]["step_probed"] for e in ran if e["error_pct"]["step_probed"] is not None]
    nearest = [e["error_pct"]["step_nearest"] for e in ran if e["error_pct"].get("step_nearest") is not None]
    verdicts = [e["verdict"] for e in entries if e.get("verdict") and e["verdict"]["agrees"] is not None]
    return {
        "configs": len(entries), "ran": len(ran),
        "oom": sum(1 for e in entries if e["measured"] and e["measured"]["status"] == "oom"),
        "failed": [e["name"] for e in entries if e["measured"] and e["measured"]["status"] in ("error", "timeout")],
        "not_run": [e["name"] for e in entries if e["measured"] is None],
        "peak_within_10pct": sum(1 for p in peak if abs(p) <= 100 * MEMORY_TARGET), "peak_compared": len(peak),
        "peak_error_pct_max_abs": max((abs(p) for p in peak), default=None),
        "step_within_15pct": sum(1 for s in step if abs(s) <= 100 * STEP_TARGET), "step_compared": len(step),
        "step_nearest_within_15pct": sum(1 for s in nearest if abs(s) <= 100 * STEP_TARGET),
        "step_nearest_compared": len(nearest),
        "verdicts_checked": len(verdicts), "wrong_verdicts": [e["name"] for e in entries
                                                             if e.get("verdict") and e["verdict"]["agrees"] is False],
        "at_limit": [(e["name"], e["verdict"]["actual_fits"]) for e in entries
                     if e.get("verdict") and e["verdict"]["predicted_fits"] is None
                     and e["verdict"]["actual_fits"] is not None],
    }


def fmt(value: float | None, spec: str, width: int = 0) -> str:
    return ("-" if value is None else format(value, spec)).rjust(width)


def table(entries: list[dict]) -> str:
    """One row per run; the step columns are the step predicted from the probes (a matrix run's job micro-batch)."""
    head = (f"{'config':58} {'peak GiB':>8} {'pred':>6} {'err%':>6} {'at mb':>5} {'step ms':>8} {'pred ms':>8} "
            f"{'err%':>6} {'near%':>6}  verdict")
    lines = [head, "-" * len(head)]
    for e in entries:
        m, p = e["measured"] or {}, e["predicted"]
        err = e.get("error_pct") or {}
        probed = e.get("predicted_probed") or {}
        v = e.get("verdict")
        if not m:
            shown = f"not run (predicted {'at the limit' if p.get('at_limit') else 'fit' if p['fits'] else 'no fit'})"
        elif m["status"] in ("error", "timeout"):
            shown = f"{m['status']}: {m.get('error', '')}"[:60]
        elif v is not None and v["predicted_fits"] is None and v["actual_fits"] is not None:
            shown = f"at the limit ({'ran' if v['actual_fits'] else v['why']})"
        elif v is None or v["agrees"] is None:
            shown = f"- ({v['why'] if v else 'n/a'})"
        elif v["agrees"]:
            shown = f"ok ({'fits' if v['predicted_fits'] else 'does not fit'})"
        else:
            shown = f"WRONG: predicted {'fit' if v['predicted_fits'] else 'no fit'}, {v['why']}"
        measured_s, step_s = probed.get("measured_step_s"), probed.get("step_s")
        peak = m.get("peak_bytes") if m.get("device") == "cuda" else None
        expected = expected_peak(config_of(e), p) if "required_bytes" in p else p["peak_bytes"]
        lines.append(f"{e['name'][:58]:58} {fmt(peak and peak / GiB, '.2f', 8)} {expected / GiB:6.2f} "
                     f"{fmt(err.get('peak'), '+.1f', 6)} {fmt(probed.get('micro_batch'), 'd', 5)} "
                     f"{fmt(measured_s and measured_s * 1000, '.1f', 8)} {fmt(step_s and step_s * 1000, '.1f', 8)} "
                     f"{fmt(err.get('step_probed'), '+.1f', 6)} {fmt(err.get('step_nearest'), '+.1f', 6)}  {shown}")
    return "\n".join(lines)


def report_line(summary: dict, device: str | None) -> str:
    s = summary
    return (f"{device or 'nothing run'}; peak within 10%: {s['peak_within_10pct']}/{s['peak_compared']} "
            f"(worst {fmt(s['peak_error_pct_max_abs'], '.1f')}%); probed step time within 15%: "
            f"{s['step_within_15pct']}/{s['step_compared']} out of sample (from other shapes alone: "
            f"{s['step_nearest_within_15pct']}/{s['step_nearest_compared']}); wrong verdicts: {len(s['wrong_verdicts'])}"
            f"/{s['verdicts_checked']} (at the limit, undecided: {len(s['at_limit'])}, "
            f"{sum(ran for _, ran in s['at_limit'])} of them ran); oom {s['oom']}; failed {len(s['failed'])}; "
            f"not run {len(s['not_run'])}")


def replan(paths: list[Path], out: Path | None) -> None:
    """Re-derive every prediction, error and verdict for saved measurements (the planner is pure Python)."""
    saved = [json.loads(p.read_text()) for p in paths]
    entries = [record(e["part"], config_of(e), e["measured"]) for r in saved for e in r["results"]]
    calibrate(entries)
    summary = summarize(entries)
    if out:
        write_json(out / "results.json", {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
                                          "replanned_from": [str(p) for p in paths],
                                          "measured_on": sorted({r["date"] for r in saved}),
                                          "device": saved[0]["device"], "summary": summary, "results": entries})
    print(table(entries))
    print("\nreplanned: " + report_line(summary, saved[0]["device"]))


def cap_slack(config: Config, device_kind: str, timeout_s: float, steps: int = 6) -> dict:
    """How far above its allocated peak the allocator's cap must be for the job to run: bisected.

    One uncapped run gives the peak in tensors; each capped run then sets the cap
    at that peak, the runtime and a slack between 0 and 0.8 GiB (the context is this
    GPU's usual figure; the child records the cap it really set).
    """
    free = run_child(replace(config, cap_bytes=None), device_kind, timeout_s)
    entry = {"name": config.name, "config": asdict(config), "uncapped": free, "runs": []}
    if not free.get("max_allocated_bytes"):  # it failed, or ran on a CPU: nothing to cap
        return entry
    peak = free["max_allocated_bytes"]
    low, high = 0.0, 0.8 * 2**30  # bytes of slack: too little, enough
    context = SHARED_CONTEXT_BYTES  # corrected by each run: the cap the child really set
    for _ in range(steps):
        cap = int(peak + (low + high) / 2 + context + CUDA_KERNELS_BYTES + ALLOCATOR_PAGE_BYTES)
        run = run_child(replace(config, cap_bytes=cap), device_kind, timeout_s)
        allowed = (run.get("memory_fraction") or 0) * (run.get("total_bytes") or 0)
        context = cap - CUDA_KERNELS_BYTES - ALLOCATOR_PAGE_BYTES - allowed
        entry["runs"].append({"slack_bytes": allowed - peak, "status": run.get("status"),
                              "max_allocated_bytes": run.get("max_allocated_bytes")})
        if run.get("status") == "ok":
            high = min(high, allowed - peak)
        else:
            low = max(low, allowed - peak)
    entry.update(needs_more_than_bytes=low, enough_bytes=high)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["matrix", "fit24", "fit40", "all"], default="matrix")
    parser.add_argument("--out", type=Path, help="directory for one JSON per configuration and results.json")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="2-layer models, short rows: a CPU smoke test")
    parser.add_argument("--limit", type=int, help="run only the first N configurations of each part")
    parser.add_argument("--only", help="run only these configurations (comma-separated names)")
    parser.add_argument("--timeout-s", type=float, default=240, help="per configuration")
    parser.add_argument("--budget-s", type=float, default=540,
                        help="start no configuration after this many seconds; the rest are reported as not run")
    parser.add_argument("--timed-steps", type=int, metavar="N",
                        help="time N steps (the smaller micro-batches N/2 + 1, at least 3) instead of each "
                             "configuration's own: for a step whose time varies from one to the next")
    parser.add_argument("--dry-run", action="store_true", help="print the configurations and predictions only")
    parser.add_argument("--shared-gpu", action="store_true",
                        help="another process trains on this GPU meanwhile: memory verdicts hold, step times are not used")
    parser.add_argument("--replan", type=Path, nargs="+", metavar="RESULTS_JSON",
                        help="no runs: compare saved measurements (results.json) with the planner as it is now")
    parser.add_argument("--slack", action="store_true",
                        help="for each chosen configuration (use --only), bisect the cap it needs above its allocated peak")
    parser.add_argument("--beyond", type=int, default=0, metavar="N",
                        help="fit parts: also the N micro-batches after the planner's boundary pair")
    parser.add_argument("--below", type=int, default=0, metavar="N",
                        help="fit parts: also the N micro-batches before the planner's boundary pair")
    parser.add_argument("--lazy-optimizer-state", action="store_true",
                        help="let AdamW make its states in the first step, as torch does, not before it as the trainer does")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child: one configuration as JSON
    args = parser.parse_args()

    if args.one:
        allocator.configure()  # the trainer's allocator settings, before torch touches CUDA
        result = run_one(config_of({"config": json.loads(args.one)}), args.device)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return
    if args.out is None and not (args.dry_run or args.replan):
        parser.error("--out is required")

    if args.replan:
        replan(args.replan, args.out)
        return
    parts = ["matrix", "fit24", "fit40"] if args.part == "all" else [args.part]
    planned: list[tuple[str, Config]] = []
    for part in parts:
        chosen = [replace(c, shared_gpu=args.shared_gpu, timed_steps=args.timed_steps or c.timed_steps,
                          lazy_optimizer_state=args.lazy_optimizer_state)
                  for c in configs_for(part, args.tiny, args.beyond, args.below)]
        if args.only:
            wanted = set(args.only.split(","))
            chosen = [c for c in chosen if c.name in wanted]
        planned += [(part, c) for c in chosen[: args.limit]]

    if args.slack:
        slacks = [cap_slack(replace(c, warmup_steps=2, timed_steps=1), args.device, args.timeout_s)
                  for _, c in planned]
        write_json(args.out / "slack.json", {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
                                              "results": slacks})
        for e in slacks:
            bounds = (f"{e['needs_more_than_bytes'] / 2**30:.3f} < slack <= {e['enough_bytes'] / 2**30:.3f} GiB"
                      if "enough_bytes" in e else f"uncapped run {e['uncapped'].get('status')}")
            print(f"{e['name']:58s} {bounds}")
        return

    began = time.monotonic()
    entries: list[dict] = []
    for i, (part, config) in enumerate(planned):
        left = args.budget_s - (time.monotonic() - began)
        measured = None
        if not args.dry_run and left > 20:
            print(f"[{i + 1}/{len(planned)}] {config.name} ...", flush=True)
            measured = run_child(config, args.device, min(args.timeout_s, left),
                                 " (the end of --budget-s)" if left < args.timeout_s else "")
            measured["shared_gpu"] = args.shared_gpu
            print(f"    {measured['status']} in {measured['wall_s']:.0f} s"
                  + (f": {measured['error']}" if measured.get("error") else ""), flush=True)
        entry = record(part, config, measured)
        entries.append(entry)
        if args.out and measured is not None:
            write_json(args.out / f"{config.name}.json", entry)

    calibrate(entries)
    summary = summarize(entries)
    report = {
        "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "part": args.part,
        "device": next((e["measured"].get("device_name") for e in entries if e["measured"]), None),
        "torch": next((e["measured"].get("torch") for e in entries if e["measured"] and "torch" in e["measured"]), None),
        "transformers": next((e["measured"].get("transformers") for e in entries
                              if e["measured"] and "transformers" in e["measured"]), None),
        "wall_s": time.monotonic() - began, "shared_gpu": args.shared_gpu, "summary": summary, "results": entries,
    }
    if args.out:
        for entry in entries:
            if entry["measured"] is not None:
                write_json(args.out / f"{entry['name']}.json", entry)
        write_json(args.out / "results.json", report)
    print()
    print(table(entries))
    print("\n" + report_line(summary, report["device"]) + (f"; results in {args.out}" if args.out else ""))


if __name__ == "__main__":
    main()
