"""The contract between the runner and the trainer: an experiment plus every decision made for it.

The runner writes this as ``resolved.json`` in the run directory; the trainer
reads it (``python -m runner.trainer resolved.json --out RUN_DIR``) and does
exactly what it says, so the same experiment trains the same way on every host.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from runner.spec import Experiment


class StagePlan(BaseModel):
    """One stretch of training with a fixed sequence shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq_len: int = Field(ge=1)
    micro_batch: int = Field(ge=1)  # sequences per forward pass per GPU
    grad_accum: int = Field(ge=1)
    steps: int | None = Field(default=None, ge=0)  # None: until the epoch budget is spent

    def tokens_per_step(self, gpus: int = 1) -> int:
        return self.seq_len * self.micro_batch * self.grad_accum * gpus


class ResolvedRun(BaseModel):
    """What the trainer is told to run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    experiment: Experiment
    job_dir: str  # relative data/model paths in the experiment resolve against this
    host: str = "local"
    profile: str = "cpu"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["fp32", "fp16", "bf16", "fp8"] = "fp32"
    compile: bool = False
    gpus: int = Field(default=1, ge=1)  # processes per node (one per GPU)
    nodes: int = Field(default=1, ge=1)
    parallelism: Literal["ddp", "fsdp"] = "ddp"  # how processes share the model when world_size > 1
    stages: list[StagePlan] = Field(min_length=1)  # run in order
    token_budget: int | None = None  # tokens the stages add up to (None for an epoch budget)
    epochs: float | None = None
    max_seconds: float | None = None  # wall-clock cap; the trainer checkpoints and stops at it

    @property
    def world_size(self) -> int:
        """Training processes in all: GPUs per node x nodes."""
        return self.gpus * self.nodes

    @property
    def total_steps(self) -> int | None:
        steps = [s.steps for s in self.stages]
        return None if any(s is None for s in steps) else sum(steps)  # type: ignore[arg-type]
