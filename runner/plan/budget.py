"""How much training a budget buys: steps per stage, tokens, and how often each source is seen.

The arithmetic is exact and integer where the reference tables need it:
``steps = floor(budget_tokens / tokens_per_step)``. ``mixture_weights`` is shared
with the trainer, which calls it with measured source sizes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from runner.resolved import StagePlan
from runner.spec import DataSpec, Experiment, Job, SourceSpec

BYTES_PER_TOKEN = 4.0  # English text under a GPT-2-style BPE; only for sizes nobody declared
USED_SHARE_TOLERANCE = 0.01  # warn when a run trains on less (or more) than 99% of its token budget
MIXTURE_CAP = 0.5


def tokens_per_step(micro_batch: int, seq_len: int, grad_accum: int = 1, gpus: int = 1) -> int:
    """Tokens one optimizer step trains on: micro-batch x sequence x accumulation x GPUs."""
    return micro_batch * seq_len * grad_accum * gpus


def steps_for_tokens(budget_tokens: int, step_tokens: int) -> int:
    """Whole steps that fit in a token budget (never more tokens than the budget)."""
    return budget_tokens // step_tokens


def mixture_weights(sizes: Sequence[float], strategy: str, weights: Sequence[float] | None = None) -> list[float]:
    """Sampling weights of data sources, summing to 1.

    proportional: by size; sqrt: by the square root of size (small sources
    up-weighted); 50cap: proportional, but no source above half of the mix, its
    excess shared among the others in proportion to their sizes; weights: the
    given weights, normalised.
    """
    if strategy == "weights":
        if weights is None or len(weights) != len(sizes):
            raise ValueError("mixture 'weights' needs one weight per source")
        return _normalised(weights)
    if any(s < 0 for s in sizes):
        raise ValueError("source sizes must not be negative")
    if strategy == "proportional":
        return _normalised(sizes)
    if strategy == "sqrt":
        return _normalised([math.sqrt(s) for s in sizes])
    if strategy == "50cap":
        share = _normalised(sizes)
        if len(share) < 2:
            return share
        biggest = max(range(len(share)), key=share.__getitem__)
        if share[biggest] <= MIXTURE_CAP:
            return share
        rest = sum(s for i, s in enumerate(share) if i != biggest)
        if rest == 0:  # all other sources are empty: nothing to share the excess with
            return share
        scale = (1 - MIXTURE_CAP) / rest
        return [MIXTURE_CAP if i == biggest else s * scale for i, s in enumerate(share)]
    raise ValueError(f"unknown mixture strategy {strategy!r}")


def _normalised(values: Sequence[float]) -> list[float]:
    total = float(sum(values))
    if total <= 0:
        return [1 / len(values)] * len(values) if values else []
    return [v / total for v in values]


@dataclass(frozen=True)
class SourceSize:
    """How many training tokens a source holds (validation share removed), and how we know."""

    label: str
    tokens: int | None
    how: str  # "declared tokens", "declared samples x seq_len", "≈ file size / 4 bytes per token", "unknown"


@dataclass(frozen=True)
class Coverage:
    """What a run takes from one source: its mixture weight, tokens and epochs over it."""

    label: str
    weight: float | None
    tokens: int | None
    size: SourceSize
    epochs: float | None


@dataclass(frozen=True)
class PhaseBudget:
    """A phase's slice of the run (pretrain, then SFT) and what it reads."""

    name: str
    share: float
    tokens: int
    coverage: tuple[Coverage, ...]


@dataclass(frozen=True)
class Budget:
    """The steps a budget buys for given stage shapes, and how the data is covered."""

    stages: tuple[StagePlan, ...]  # steps None: until the epoch budget is spent
    steps: int  # total steps (an estimate for epoch budgets)
    tokens: int  # tokens the steps train on
    budget_tokens: int | None  # the requested budget (tokens, or epochs x data size)
    used_share: float | None  # tokens / budget_tokens
    coverage: tuple[Coverage, ...]
    phases: tuple[PhaseBudget, ...]
    warnings: tuple[str, ...]


def source_size(job: Job, source: SourceSpec, data: DataSpec, seq_len: int) -> SourceSize:
    """Training tokens in a source: declared, or estimated from a local text file's size."""
    keep = 1 - data.validation
    if source.tokens is not None:
        return SourceSize(source.label, int(source.tokens * keep), "declared tokens")
    if source.samples is not None:
        # Without packing every sample is one (padded) sequence; with packing a sample's
        # length is unknown, so it counts as at most one sequence.
        how = "declared samples x seq_len" if not data.packing else "declared samples x seq_len (upper bound)"
        return SourceSize(source.label, int(source.samples * keep) * seq_len, how)
    if source.path:
        path = job.resolve_path(source.path)
        suffix = path.suffix.lower() if source.format == "auto" else "." + source.format
        if suffix in (".txt", ".jsonl", ".json", ".md") and path.is_file():
            return SourceSize(source.label, int(path.stat().st_size / BYTES_PER_TOKEN * keep),
                              f"≈ file size / {BYTES_PER_TOKEN:g} bytes per token")
    return SourceSize(source.label, None, "unknown")


def coverage(job: Job, data: DataSpec, tokens: int, seq_len: int) -> tuple[tuple[Coverage, ...], list[str]]:
    """Per-source weights, tokens and epochs for ``tokens`` drawn from ``data``."""
    sizes = [source_size(job, s, data, seq_len) for s in data.sources]
    warnings: list[str] = []
    known = all(s.tokens is not None for s in sizes)
    if data.mixture == "weights":
        weights: list[float] | None = mixture_weights([0] * len(sizes), "weights", [s.weight or 0 for s in data.sources])
    elif known or len(sizes) == 1:
        weights = mixture_weights([s.tokens or 1 for s in sizes], data.mixture)
    else:
        weights = None
        unknown = ", ".join(s.label for s in sizes if s.tokens is None)
        warnings.append(f"size of {unknown} unknown: the mixture is set when the trainer reads the data "
                        "(declare tokens: on each source to plan coverage)")
    out = []
    for i, size in enumerate(sizes):
        take = round(weights[i] * tokens) if weights else None
        epochs = take / size.tokens if take is not None and size.tokens else None
        out.append(Coverage(size.label, weights[i] if weights else None, take, size, epochs))
    return tuple(out), warnings


def plan_budget(job: Job, stages: Sequence[StagePlan], gpus: int = 1) -> Budget:
    """Assign steps to stages (whose micro-batch and accumulation are already chosen).

    A token budget is split among curriculum stages by share and each stage gets
    ``floor(stage_tokens / tokens_per_step)`` steps; an epoch budget becomes
    ``epochs x training tokens``; ``max_steps`` alone fixes the steps and, beside
    a token or epoch budget, caps them (stages keep their order).
    """
    spec: Experiment = job.spec
    budget = spec.budget
    warnings: list[str] = []
    shares = [s.share for s in spec.curriculum] or [1.0]
    seq_len = spec.seq_len
    step_tokens = [s.tokens_per_step(gpus) for s in stages]

    if budget.tokens is not None:
        budget_tokens: int | None = budget.tokens
        steps = [steps_for_tokens(round(share * budget.tokens), t) for share, t in zip(shares, step_tokens)]
        for stage, n in zip(stages, steps):
            if n == 0:
                warnings.append(f"a stage at seq_len {stage.seq_len} gets 0 steps: its share of the budget "
                                f"is smaller than one step of {stage.tokens_per_step(gpus):,} tokens")
    elif budget.epochs is not None:
        cover, cover_warnings = coverage(job, spec.data, 0, seq_len)
        data_tokens = [c.size.tokens for c in cover]
        if any(t is None for t in data_tokens):
            budget_tokens = None
            steps = [budget.max_steps or 0]
            warnings.extend(cover_warnings)
            warnings.append("an epoch budget needs source sizes to estimate steps: declare tokens: or samples:")
        else:
            budget_tokens = round(budget.epochs * sum(data_tokens))  # type: ignore[arg-type]
            steps = [math.ceil(budget_tokens / step_tokens[0])]
    else:
        budget_tokens = None
        steps = [budget.max_steps or 0]

    if budget.max_steps is not None and (budget.tokens is not None or budget.epochs is not None):
        capped, left = [], budget.max_steps
        for n in steps:
            capped.append(min(n, left))
            left -= capped[-1]
        if sum(capped) < sum(steps):
            warnings.append(f"max_steps {budget.max_steps:,} stops the run at {sum(capped):,} of {sum(steps):,} steps")
        steps = capped

    tokens = sum(n * t for n, t in zip(steps, step_tokens))
    used = tokens / budget_tokens if budget_tokens else None
    if budget.tokens is not None and budget.max_steps is None and used is not None and abs(used - 1) > USED_SHARE_TOLERANCE:
        warnings.append(f"the steps train on {used:.1%} of the {budget.tokens:,}-token budget "
                        f"({tokens:,} tokens); make the budget a multiple of the tokens per step")

    epoch_run = budget.epochs is not None and budget.tokens is None
    # An epoch run goes until the data is spent; a step count there is only max_steps' cap.
    planned = tuple(StagePlan(seq_len=s.seq_len, micro_batch=s.micro_batch, grad_accum=s.grad_accum,
                              steps=(budget.max_steps if epoch_run else n))
                    for s, n in zip(stages, steps))

    main_cover, cover_warnings = coverage(job, spec.data, tokens, seq_len)
    phases: list[PhaseBudget] = []
    for phase in spec.phases:
        phase_tokens = round(phase.share * tokens)
        phase_cover, phase_warnings = coverage(job, phase.data or spec.data, phase_tokens, seq_len)
        phases.append(PhaseBudget(phase.name, phase.share, phase_tokens, phase_cover))
        cover_warnings += [w for w in phase_warnings if w not in cover_warnings]
    if budget.epochs is None:
        warnings.extend(w for w in cover_warnings if w not in warnings)
    for c in main_cover if not phases else [c for p in phases for c in p.coverage]:
        if c.epochs is not None and c.epochs > 10:
            warnings.append(f"source {c.label} is repeated {c.epochs:.0f} times; expect overfitting to it")
    return Budget(planned, sum(steps), tokens, budget_tokens, used, main_cover, tuple(phases), tuple(warnings))
