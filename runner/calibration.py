"""Measured throughput for the planner: what finished runs and probes achieved on each host.

``Calibration.from_store(store)`` collects one ``Observation`` per succeeded run
and per stable probe; its ``measured(...)`` answers the planner's
``ThroughputSource`` question for a host, profile, shape, sequence length and
precision:

1. observations on that host, else on other hosts with the same profile;
2. trained the same way: same precision, LoRA or not, gradient checkpointing or
   not, compiled or not, same number of processes (each of these is a different
   speed entirely);
3. of the same shape and sequence length when there are any: the median of the
   newest (one slow outlier, say a probe on a busy machine, does not drag it);
4. otherwise the nearest shape by FLOPs per token, its tokens/s scaled by the
   ratio of FLOPs per token (a model twice as costly per token trains half as
   many tokens per second), its fixed cost per micro-batch (below) as measured.

Measured at two or more micro-batches, the speed is a
fixed cost per micro-batch plus a token rate, fitted to the median of the
newest at each micro-batch (``runner.plan.cost.fit_micro_batch_time``): a step
at a small micro-batch is mostly fixed cost, so a rate measured at one
micro-batch does not hold at another. Where the smaller micro-batch took no
less time, the host set the pace: a micro-batch takes the faster time up to the
largest measured, and grows in proportion beyond (``host_bound_time``). Where,
of three or more (a probe measures three), the smallest took clearly longer than
the line through the larger ones says, the host set the pace below a knee: the
line, never less than that time (``knee_time``). At one micro-batch, or where
the fit makes no sense (a negative fixed cost), the time is proportional to the
tokens.

The answer carries the words the plan shows (``calibrated from 3 runs on
a100-1``, ``... at 2 micro-batches``), the peak memory measured for an exact
match (same micro-batch too), and the fixed overhead of a run on that host
(start-up, evaluation, checkpoints), which short runs cannot hide. With nothing
measured the planner keeps its catalog default (``runner.plan.measured`` checks
a plan's memory against the peaks measured). Runs with a curriculum are not
observations: their rate is a blend of several sequence lengths.

``memory_outcomes`` are the runs that ran and those that ran out of memory,
with how they trained: where one matches a job on a host, it decides the plan's
memory verdict instead of the estimate (``runner.plan.measured``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from runner.plan.cost import Measured, fit_micro_batch_time, host_bound_time, knee_time
from runner.plan.measured import MemoryOutcome
from runner.presets import ModelShape
from runner.units import format_count

if TYPE_CHECKING:
    from runner.resolved import ResolvedRun
    from runner.spec import Experiment
    from runner.store import Run, Store

NEWEST = 5  # observations averaged per shape and micro-batch: recent runs reflect the host's current software


@dataclass(frozen=True)
class Observation:
    """Throughput and memory measured for one shape on one host."""

    host: str
    profile: str
    shape: ModelShape
    seq_len: int
    precision: str
    tokens_per_s: float  # over training steps
    peak_bytes: int | None
    overhead_s: float  # wall time beyond tokens / tokens_per_s
    kind: Literal["run", "probe"]
    at: float  # when it was measured (epoch seconds)
    lora: bool = False
    gradient_checkpointing: bool = False
    gpus: int = 1  # training processes in all
    micro_batch: int | None = None  # what the peak was measured at
    compile: bool = False  # torch.compile: twice the speed of eager for small models

    def trained_like(self, precision: str, lora: bool, gradient_checkpointing: bool, gpus: int, compile: bool) -> bool:
        return (self.precision, self.lora, self.gradient_checkpointing, self.gpus, self.compile) == \
            (precision, lora, gradient_checkpointing, gpus, compile)

    def flops_per_token(self) -> float:
        return self.shape.flops_per_token(self.seq_len)


def experiment_shape(experiment: Experiment, job_dir: Path) -> ModelShape | None:
    """An experiment's model shape from its preset or local config.json (None for an uncached hub model)."""
    from runner import presets

    model = experiment.model
    shape = None
    if model.preset:
        shape = presets.lookup_preset(model.preset)
    elif model.path:
        directory = Path(model.path).expanduser()
        directory = directory if directory.is_absolute() else job_dir / directory
        if (directory / "config.json").is_file():
            shape = presets.shape_from_dir(directory)
    elif model.shape:
        shape = presets.lookup_preset(model.shape)
    return presets.with_overrides(shape, dict(model.overrides)) if shape is not None else None


def readable(run: Run) -> ResolvedRun | None:
    """A stored run as it was resolved, or None where this version cannot read it (a store outlives versions)."""
    from pydantic import ValidationError

    from runner.resolved import ResolvedRun

    try:
        return ResolvedRun.model_validate_json(run.resolved_json)
    except ValidationError:
        return None


def run_observations(store: Store, *, exclude: set[str] = frozenset()) -> list[Observation]:
    """One observation per succeeded run with a measured rate (``exclude``: run ids counted elsewhere)."""
    out = []
    for run in store.runs(states={"succeeded"}):
        if run.id in exclude or not run.tokens_per_s or not run.tokens:
            continue
        resolved = readable(run)
        if resolved is None or len(resolved.stages) != 1:
            continue
        shape = experiment_shape(resolved.experiment, Path(resolved.job_dir))
        if shape is None:
            continue
        exp, stage = resolved.experiment, resolved.stages[0]
        out.append(Observation(
            host=run.host, profile=run.profile, shape=shape, seq_len=stage.seq_len,
            precision=resolved.precision, tokens_per_s=run.tokens_per_s, peak_bytes=run.peak_bytes,
            overhead_s=max(0.0, run.wall_s - run.tokens / run.tokens_per_s), kind="run",
            at=run.ended_at or run.updated_at, lora=exp.lora is not None,
            gradient_checkpointing=exp.train.gradient_checkpointing, gpus=resolved.world_size,
            micro_batch=stage.micro_batch, compile=resolved.compile))
    return out


def ran_out_of_memory(reason: str) -> bool:
    """Whether a failed run's recorded reason says it ran out of memory (the trainer's or the kernel's words)."""
    return "out of memory" in reason.lower()


def memory_outcomes(store: Store) -> list[MemoryOutcome]:
    """Every stage of a succeeded run ran; a one-stage run that failed out of memory did not (probes' runs too)."""
    out = []
    for run in store.runs(states={"succeeded", "failed"}):
        ran = run.state == "succeeded"
        if not ran and not ran_out_of_memory(run.reason):
            continue
        resolved = readable(run)
        if resolved is None or (not ran and len(resolved.stages) != 1):
            continue
        shape = experiment_shape(resolved.experiment, Path(resolved.job_dir))
        if shape is None:
            continue
        exp = resolved.experiment
        processes = resolved.world_size
        for stage in resolved.stages:
            out.append(MemoryOutcome(
                host=run.host, profile=run.profile, shape=shape, seq_len=stage.seq_len, precision=resolved.precision,
                micro_batch=stage.micro_batch, accumulates=stage.grad_accum > 1,
                gradient_checkpointing=exp.train.gradient_checkpointing, lora=exp.lora is not None,
                optimizer=exp.train.optimizer, quantization=exp.quantization, compile=resolved.compile,
                processes=processes, parallelism=resolved.parallelism if processes > 1 else "single", ran=ran,
                source=f"run {run.id}", at=run.ended_at or run.updated_at))
    return out


@dataclass(frozen=True)
class Calibration:
    """A ``ThroughputSource`` backed by measurements; empty means the catalog decides."""

    observations: tuple[Observation, ...]
    outcomes: tuple[MemoryOutcome, ...] = ()

    @classmethod
    def from_store(cls, store: Store) -> Calibration:
        """Every stable probe and every succeeded run that is not a probe's own run; every run that ran or
        ran out of memory."""
        from runner.capacity import probe_observations, probe_run_ids

        probes = probe_observations(store)
        return cls(tuple(probes + run_observations(store, exclude=probe_run_ids(store))),
                   tuple(memory_outcomes(store)))

    def memory_outcomes(self) -> tuple[MemoryOutcome, ...]:
        return self.outcomes

    def measured(self, host: str, profile: str, shape: ModelShape, seq_len: int, precision: str, *,
                 lora: bool = False, gradient_checkpointing: bool = False, gpus: int = 1,
                 micro_batch: int | None = None, compile: bool = False) -> Measured | None:
        alike = [o for o in self.observations
                 if o.trained_like(precision, lora, gradient_checkpointing, gpus, compile)]
        pool, where = [o for o in alike if o.host == host], f"on {host}"
        if not pool:
            pool = [o for o in alike if o.profile == profile]
            hosts = ", ".join(sorted({o.host for o in pool}))
            where = f"on {hosts} (same profile {profile})"
        if not pool:
            return None
        target = shape.flops_per_token(seq_len)
        exact = [o for o in pool if o.shape == shape and o.seq_len == seq_len]
        if exact:
            speed = _speed(exact)
            peaks = [o.peak_bytes for o in speed.observations
                     if o.peak_bytes and (micro_batch is None or o.micro_batch == micro_batch)]
            return Measured(speed.tokens_per_s, f"calibrated from {_count(speed.observations)} {where}{speed.said}",
                            max(peaks) if peaks else None, _overhead(speed.observations), speed.micro_batch_s,
                            speed.floor_s)
        nearest = min(pool, key=lambda o: abs(math.log(o.flops_per_token() / target)))
        speed = _speed([o for o in pool if o.shape == nearest.shape and o.seq_len == nearest.seq_len])
        scaled = (f"nearest shape {format_count(nearest.shape.param_count())} params at seq {nearest.seq_len}, "
                  "scaled by FLOPs per token")
        return Measured(speed.tokens_per_s * nearest.flops_per_token() / target,
                        f"calibrated from {_count(speed.observations)} {where}{speed.said}; {scaled}", None,
                        _overhead(speed.observations), speed.micro_batch_s, speed.floor_s)


@dataclass(frozen=True)
class _Speed:
    """What the observations of one shape and sequence length say about its speed."""

    observations: list[Observation]  # those used
    tokens_per_s: float
    micro_batch_s: float
    said: str  # what the plan adds to "calibrated from ...": nothing at one micro-batch
    floor_s: float = 0.0


def _speed(observations: Sequence[Observation]) -> _Speed:
    """Two terms from the newest at each micro-batch where there are two or more, else the median rate."""
    by_batch: dict[int, list[Observation]] = {}
    for o in observations:
        if o.micro_batch:
            by_batch.setdefault(o.micro_batch, []).append(o)
    if len(by_batch) < 2:
        chosen = _newest(observations)
        return _Speed(chosen, statistics.median(o.tokens_per_s for o in chosen), 0.0, "")
    points, chosen = [], []
    for micro_batch, group in by_batch.items():
        newest = _newest(group)
        tokens = group[0].gpus * micro_batch * group[0].seq_len  # the processes take theirs at the same time
        points.append((tokens, tokens / statistics.median(o.tokens_per_s for o in newest)))
        chosen += newest
    chosen.sort(key=lambda o: o.at)
    at = f" at {len(points)} micro-batches"
    knee = knee_time(points)
    if knee is not None:
        floor_s, micro_batch_s, rate = knee
        said = (f"{at} (bound by the host below a knee: at least {floor_s * 1000:.0f} ms per micro-batch, "
                f"then {micro_batch_s * 1000:.0f} ms fixed per micro-batch)")
        return _Speed(chosen, rate, micro_batch_s, said, floor_s)
    fit = fit_micro_batch_time(points)
    if fit is None:
        flat = host_bound_time(points)
        if flat is not None:
            floor_s, rate = flat
            return _Speed(chosen, rate, 0.0, f"{at} (bound by the host: {floor_s * 1000:.0f} ms per micro-batch "
                          f"up to micro-batch {max(by_batch)})", floor_s)
        return _Speed(chosen, statistics.median(o.tokens_per_s for o in chosen), 0.0,
                      f"{at} (proportional: they fit no positive fixed cost)")
    micro_batch_s, rate = fit
    return _Speed(chosen, rate, micro_batch_s, f"{at} ({micro_batch_s * 1000:.0f} ms fixed per micro-batch)")


def _newest(observations: Sequence[Observation]) -> list[Observation]:
    return sorted(observations, key=lambda o: o.at)[-NEWEST:]


def _overhead(observations: Sequence[Observation]) -> float:
    """The fixed cost of a run of this shape on this host: the median over the observations used."""
    return statistics.median(o.overhead_s for o in observations)


def _count(observations: Sequence[Observation]) -> str:
    """``3 runs``, ``1 probe``, ``1 probe and 2 runs``."""
    parts = []
    for kind in ("probe", "run"):
        n = sum(o.kind == kind for o in observations)
        if n:
            parts.append(f"{n} {kind}{'s' if n != 1 else ''}")
    return " and ".join(parts)


def default_calibration(path: Path | None = None) -> Calibration | None:
    """The calibration from the run store at ``path`` (default: the default store), or None when no run was
    ever recorded there; a store that is not there is not made."""
    from runner.store import Store, default_store_path

    path = path or default_store_path()
    if not path.is_file():
        return None
    store = Store.open(path)
    try:
        return Calibration.from_store(store)
    finally:
        store.close()
