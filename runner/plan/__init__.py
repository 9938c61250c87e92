"""The pre-dispatch planner: will this job fit this host, how long will it take, what will it cost.

``plan_job(job, host)`` answers for one host, ``plan_hosts`` for several, and
``resolve(job, host)`` turns a passing plan into the ``ResolvedRun`` the trainer
executes; ``plan_resolved(run, host)`` asks whether such a run, as it was
resolved, fits another host. Nothing here imports torch.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass, replace

from runner.errors import EXIT_REFUSED, UserError
from runner.hosts import Hardware, Host, Inventory, NotProbed, hardware, load_inventory
from runner.plan.budget import Budget, Coverage, PhaseBudget, plan_budget
from runner.plan.cost import Measured, ThroughputSource, estimate_cost
from runner.plan.fixes import Fix, Variant, budget_fixes, memory_fixes
from runner.plan.measured import measured_outcome, memory_check
from runner.plan.memory import (AT_LIMIT_SHORT_BYTES, AT_LIMIT_SPARE_BYTES, LoraShape, MemoryBreakdown,
                                estimate_memory, lora_targets)
from runner.presets import ModelShape
from runner.resolved import ResolvedRun, StagePlan
from runner.spec import Experiment, Job, resolve_shape
from runner.units import format_bytes, format_duration
from runner.yamldoc import Doc

__all__ = ["Plan", "Fix", "MemoryBreakdown", "Measured", "ThroughputSource", "plan_job", "plan_hosts", "resolve",
           "plan_resolved"]

# float8 matmuls pay for their casts only when they are wide: d12 (width 768) trained at 0.99x bf16's tokens/s
# on an H200 (torchao 0.18, compiled, 2026-12-02; docs/benchmarks.md), while torchao reports up to 1.25x for
# Llama3-8B (width 4096) on 8 H100s. Narrower models are planned at bf16's rate.
FP8_MIN_WIDTH = 4096
AUTO_MARGIN = 0.10  # batch_size auto leaves this share of capacity free: the memory model is good to ~10%
MAX_AUTO_MICRO_BATCH = 1024


@dataclass(frozen=True)
class Plan:
    """Everything the planner decided and estimated for one job on one host."""

    job: str
    host: str
    profile: str | None  # None when the host's hardware is unknown (not probed)
    passes: bool  # fits in memory and within the money and time caps
    fits: bool  # fits in memory
    reasons: tuple[str, ...]  # why it does not pass
    warnings: tuple[str, ...]
    fixes: tuple[Fix, ...]
    memory: MemoryBreakdown | None  # the stage with the highest peak
    precision: str
    compile: bool
    device: str
    micro_batch: int  # of the first stage (curricula change it per stage)
    grad_accum: int
    gpus: int
    stages: tuple[StagePlan, ...]
    steps: int
    tokens: int
    budget_tokens: int | None
    budget_used_share: float | None
    coverage: tuple[Coverage, ...]
    phases: tuple[PhaseBudget, ...]
    params: int
    model_flops: float
    tokens_per_s: float
    seconds: float
    cost_usd: float
    price_usd_per_hour: float
    throughput_source: str  # "catalog default: 40% of peak", or a calibration's description
    hardware_source: str
    overrides: tuple[str, ...]  # the --set overrides this plan was made with
    nodes: int = 1  # hosts, each running `gpus` processes
    parallelism: str = "single"  # single | ddp | fsdp
    parallelism_reason: str = ""  # why DDP or FSDP was picked (empty for one process)

    @property
    def at_limit(self) -> bool:
        """Refused for memory the estimate cannot decide: near a full card (``memory.AT_LIMIT_*``)."""
        return self.memory is not None and self.memory.at_limit

    def said_ok(self) -> str:
        """The plan's yes or no in a word or two, for tables: yes, no: at limit, no: memory, no: caps."""
        if self.passes:
            return "yes"
        return "no: at limit" if self.at_limit else "no: memory" if not self.fits else "no: caps"


def plan_job(job: Job, host: Host | str = "local", *, inventory: Inventory | None = None,
             throughput: ThroughputSource | None = None) -> Plan:
    """Plan one experiment on one host; raises UserError only for an invalid job or unknown host."""
    host = _host(host, inventory)
    shape = resolve_shape(job)
    try:
        hw = hardware(host)
    except NotProbed as exc:
        return _unknown_hardware(job, host, str(exc.message + (f" ({exc.hint})" if exc.hint else "")))
    return _plan(job, shape, hw, throughput)


def plan_hosts(job: Job, hosts: list[Host | str] | None = None, *, inventory: Inventory | None = None,
               throughput: ThroughputSource | None = None) -> list[Plan]:
    """Plan on each host (default: the job's candidates, else the whole inventory).

    A plan that does not pass gets "use host X" fixes for the hosts where it does.
    """
    inventory = inventory or load_inventory()
    names = hosts if hosts is not None else (job.spec.hosts or inventory.names)
    plans = [plan_job(job, h, inventory=inventory, throughput=throughput) for h in names]
    good = sorted((p for p in plans if p.passes), key=lambda p: (p.cost_usd, p.seconds))
    out = []
    for plan in plans:
        if not plan.passes and good:
            moves = tuple(Fix(f"host {g.host} ({g.profile}) passes: {format_duration(g.seconds)}, ${g.cost_usd:,.2f}",
                              host=g.host) for g in good[:2])
            plan = replace(plan, fixes=plan.fixes + moves)
        out.append(plan)
    return out


def resolve(job: Job, host: Host | str = "local", plan: Plan | None = None, *,
            inventory: Inventory | None = None) -> ResolvedRun:
    """The trainer's input for this job on this host; UserError (exit 3) when the plan refuses it."""
    plan = plan or plan_job(job, host, inventory=inventory)
    if not plan.passes:
        raise UserError("; ".join(plan.reasons), file=job.file, field=job.name, exit_code=EXIT_REFUSED,
                        hint=plan.fixes[0].summary + (f": {plan.fixes[0].command_hint()}" if plan.fixes else "")
                        if plan.fixes else None)
    spec = job.spec
    return ResolvedRun(
        experiment=spec, job_dir=str(job.base_dir), host=plan.host, profile=plan.profile or "cpu",
        device=plan.device, precision=plan.precision, compile=plan.compile,  # type: ignore[arg-type]
        gpus=plan.gpus, nodes=plan.nodes, parallelism="fsdp" if plan.parallelism == "fsdp" else "ddp",
        stages=list(plan.stages),
        token_budget=plan.tokens if spec.budget.tokens is not None else None,
        epochs=spec.budget.epochs if spec.budget.tokens is None else None,
        max_seconds=spec.budget.max_hours * 3600 if spec.budget.max_hours else None,
    )


def plan_resolved(resolved: ResolvedRun, host: Host | str, *, job_file: str, inventory: Inventory | None = None,
                  throughput: ThroughputSource | None = None) -> Plan:
    """Plan a run as it was resolved, on ``host``: does *that* run fit there (before it moves)?

    Its micro-batch, accumulation, precision, compilation and parallelism stay as
    resolved, because a resumed run's data position and token count depend on
    them. Its money and time caps are left out: they are enforced while it
    trains, so what refuses it here is the host (memory, GPUs, precision).
    ``job_file`` is the file it came from (relative paths resolve beside it).
    """
    spec = resolved.experiment
    pinned: dict[str, object] = {"precision": resolved.precision, "compile": resolved.compile}
    if not spec.curriculum:  # a curriculum's stages carry their own batch, resolved as written
        first = resolved.stages[0]
        pinned |= {"batch_size": first.micro_batch, "grad_accum": first.grad_accum, "tokens_per_step": None}
    if resolved.world_size > 1:
        pinned["parallelism"] = resolved.parallelism
    spec = spec.model_copy(update={"train": spec.train.model_copy(update=pinned),
                                   "budget": spec.budget.model_copy(update={"max_cost_usd": None, "max_hours": None})})
    return plan_job(Job(spec=spec, file=job_file, doc=Doc({}, job_file)), host, inventory=inventory,
                    throughput=throughput)


def _host(host: Host | str, inventory: Inventory | None) -> Host:
    if isinstance(host, Host):
        return host
    return (inventory or load_inventory()).get(host)


def _overrides(job: Job) -> tuple[str, ...]:
    return tuple(job.overrides.values())


def _probe_command(job: Job, host: str) -> str:
    """The `runner probe` line that runs this experiment as planned (its overrides too) on ``host``."""
    words = ["runner", "probe", host, "--job", job.file, "--experiment", job.name]
    for override in _overrides(job):
        words += ["--set", override]
    return shlex.join(words)


def _unknown_hardware(job: Job, host: Host, reason: str) -> Plan:
    return Plan(job=job.name, host=host.name, profile=None, passes=False, fits=False, reasons=(reason,),
                warnings=(), fixes=(), memory=None, precision="auto", compile=False, device="auto",
                micro_batch=0, grad_accum=0, gpus=host.gpus or 1, stages=(), steps=0, tokens=0,
                budget_tokens=job.spec.budget.tokens, budget_used_share=None, coverage=(), phases=(),
                params=0, model_flops=0.0, tokens_per_s=0.0, seconds=0.0, cost_usd=0.0,
                price_usd_per_hour=host.price_usd_per_hour or 0.0, throughput_source="none",
                hardware_source="unknown", overrides=_overrides(job))


def _plan(job: Job, shape: ModelShape, hw: Hardware, throughput: ThroughputSource | None) -> Plan:
    spec, train, prof = job.spec, job.spec.train, hw.profile
    reasons: list[str] = []
    warnings: list[str] = []
    fixes: list[Fix] = []

    precision = prof.default_precision if train.precision == "auto" else train.precision
    if precision not in prof.precisions:
        reasons.append(f"{precision} is not supported on {prof.id} (supported: {', '.join(prof.precisions)})")
        fixes.append(Fix(f"precision {prof.default_precision}", (f"train.precision={prof.default_precision}",)))
        precision = prof.default_precision
    if precision == "fp8" and shape.arch == "gpt2":
        reasons.append("fp8 trains nn.Linear layers in float8 (torchao), and GPT-2's blocks are Conv1D layers: "
                       "nothing of it would train in fp8")
        fixes.append(Fix("precision bf16", ("train.precision=bf16",)))
        precision = "bf16"
    compile_ = prof.device == "cuda" if train.compile == "auto" else bool(train.compile)
    lora = LoraShape(spec.lora.rank, lora_targets(shape, spec.lora.target_modules)) if spec.lora else None
    pretrained = spec.model.pretrained

    world = train.gpus * train.nodes
    parallelism = "single"  # set below to DDP or FSDP for several processes
    outcomes = throughput.memory_outcomes() if throughput else ()

    def trial(seq_len: int, variant: Variant, layout: str | None = None) -> MemoryBreakdown:
        """One GPU's memory for this stage and variant, under ``layout`` (default: the picked parallelism),
        with the run on this host that decides its fit, where there is one."""
        lora_shape = lora or (LoraShape(16, lora_targets(shape, "auto")) if variant.lora else None)
        layout = layout or parallelism
        estimate = estimate_memory(
            shape, seq_len=seq_len, micro_batch=variant.micro_batch, precision=precision, device=prof.device,
            capacity_bytes=hw.capacity_bytes, memory_bytes=hw.memory_bytes, usable_share=prof.usable_share,
            runtime_bytes=prof.runtime_bytes, optimizer=variant.optimizer,
            gradient_checkpointing=variant.gradient_checkpointing, grad_accum=variant.grad_accum,
            lora=lora_shape, quantization=variant.quantization,
            shards=world if layout == "fsdp" and lora_shape is None else 1, gradient_buckets=layout == "ddp",
            compiled=compile_)
        outcome = measured_outcome(outcomes, hw.host, prof.id, shape, seq_len, precision, variant, compile=compile_,
                                   processes=world, parallelism=layout)
        return replace(estimate, outcome=outcome) if outcome else estimate

    def variant(micro_batch: int, grad_accum: int) -> Variant:
        return Variant(micro_batch, grad_accum, train.gradient_checkpointing, train.optimizer,
                       spec.lora is not None, spec.quantization)

    if spec.curriculum:
        probe = max(spec.curriculum, key=lambda s: s.seq_len * s.batch_size)
        probe_seq, probe_variant = probe.seq_len, variant(probe.batch_size, probe.grad_accum)
    else:
        probe_seq = spec.data.seq_len or spec.seq_len
        probe_variant = variant(1 if train.batch_size == "auto" else train.batch_size, train.grad_accum)
    parallelism, parallelism_reason = _parallelism(spec, world, lambda layout: trial(probe_seq, probe_variant, layout))
    reasons.extend(_distributed_refusals(spec, prof.device, precision, world, parallelism))

    # The shape of each stage: the curriculum's, or one stage from data.seq_len and train.
    shapes: list[tuple[int, int, int, str]] = []  # seq_len, micro_batch, grad_accum, where batch lives
    if spec.curriculum:
        shapes = [(s.seq_len, s.batch_size, s.grad_accum, f"curriculum.{i}") for i, s in enumerate(spec.curriculum)]
    else:
        seq_len = spec.data.seq_len or spec.seq_len
        if train.batch_size == "auto":
            micro, accum = _auto_batch(lambda mb, acc: trial(seq_len, variant(mb, acc)), hw, seq_len,
                                       train.grad_accum, train.tokens_per_step, world)
        else:
            micro, accum = train.batch_size, train.grad_accum
        shapes = [(seq_len, micro, accum, "train")]

    memories = [trial(seq, variant(mb, acc)) for seq, mb, acc, _ in shapes]
    fits = all(m.fits for m in memories)
    # The stage that decides: one that does not fit, the least room first; else the least room.
    worst = min(range(len(memories)), key=lambda i: (memories[i].fits, memories[i].margin_bytes))
    memory = memories[worst]
    need = f"{format_bytes(memory.required_bytes)} of the {format_bytes(memory.capacity_bytes)} usable"
    stage = f" (stage at seq_len {shapes[worst][0]})" if spec.curriculum else ""
    if not fits:
        seq, mb, acc, where = shapes[worst]
        if memory.outcome is not None:
            reasons.append(f"{memory.outcome.said()}{stage}; the estimate needs {need}")
        elif memory.at_limit:
            # Measured jobs this close to a full card went either way, each the same way every time it ran.
            margin = "to spare" if memory.margin_bytes >= 0 else "short"
            # A probe trains one shape; a curriculum's run settles every stage when it runs to the end.
            settle = ("a run there that runs to the end settles it (--force)" if spec.curriculum
                      else f"a probe there settles it: {_probe_command(job, hw.host)}")
            reasons.append(f"at the limit: needs {need}{stage}, {format_bytes(abs(memory.margin_bytes))} {margin}; "
                           f"within {AT_LIMIT_SPARE_BYTES / 2**30:.2f} GiB to spare and "
                           f"{AT_LIMIT_SHORT_BYTES / 2**30:.2f} GiB short of a full card the allocator's part-used "
                           f"pages decide, not the estimate: {settle}")
        else:
            reasons.append(f"needs {format_bytes(memory.required_bytes)} but {hw.host} has "
                           f"{format_bytes(memory.capacity_bytes)} usable{stage}: {format_bytes(-memory.margin_bytes)} short")
        fixes.extend(memory_fixes(variant(mb, acc), lambda v: trial(seq, v), stage_field=where,
                                  pretrained=pretrained))
    elif memory.outcome is not None and memory.margin_bytes < AUTO_MARGIN * memory.capacity_bytes:
        warnings.append(f"the estimate needs {need}{stage}, and {memory.outcome.said()}")
    elif memory.margin_bytes < AUTO_MARGIN * memory.capacity_bytes:
        warnings.append(f"only {format_bytes(memory.margin_bytes)} to spare; the estimate is good to about 10%")

    gpus = train.gpus
    if gpus > hw.gpus and prof.device == "cuda":
        reasons.append(f"asks for {train.gpus} GPUs but {hw.host} has {hw.gpus}")
    stage_plans = [StagePlan(seq_len=s, micro_batch=mb, grad_accum=acc) for s, mb, acc, _ in shapes]
    budget: Budget = plan_budget(job, stage_plans, world)
    warnings.extend(budget.warnings)

    measured = [throughput.measured(hw.host, prof.id, shape, s.seq_len, precision, lora=spec.lora is not None,
                                    gradient_checkpointing=train.gradient_checkpointing, gpus=world,
                                    micro_batch=s.micro_batch, compile=compile_) if throughput else None
                for s in budget.stages]
    measured_reasons, measured_warnings = memory_check(measured, memories)
    reasons.extend(measured_reasons)
    warnings.extend(measured_warnings)
    # Epoch runs have one stage and no fixed step count: use the budget's estimate.
    stage_steps = [budget.steps if s.steps is None else s.steps for s in budget.stages]
    stage_tokens = [(s.seq_len, steps * s.tokens_per_step(world), steps * s.grad_accum)
                    for s, steps in zip(budget.stages, stage_steps)]
    rate = precision
    if precision == "fp8" and shape.hidden < FP8_MIN_WIDTH:
        rate = "bf16"
        warnings.append(f"fp8 is planned at bf16's speed: at width {shape.hidden} float8's casts cost what its "
                        f"matmuls save (d12, width 768, trained at 0.99x bf16's tokens/s on an H200); it pays from "
                        f"about width {FP8_MIN_WIDTH}")
    cost = estimate_cost(
        shape, stage_tokens, peak_flops=prof.peak_flops(rate), efficiency=prof.efficiency[rate],
        gpus=world, price_usd_per_hour=hw.price_usd_per_hour * train.nodes, lora=spec.lora is not None,
        gradient_checkpointing=train.gradient_checkpointing, max_cost_usd=spec.budget.max_cost_usd,
        max_hours=spec.budget.max_hours, measured={s.seq_len: m for s, m in zip(budget.stages, measured)})
    caps = []
    if cost.over_cost:
        reasons.append(f"costs ${cost.cost_usd:,.2f}, over max_cost_usd ${spec.budget.max_cost_usd:,.2f}")
        caps.append(spec.budget.max_cost_usd / cost.cost_usd)  # type: ignore[operator]
    if cost.over_hours:
        reasons.append(f"takes {format_duration(cost.seconds)}, over max_hours {spec.budget.max_hours:g}h")
        caps.append(spec.budget.max_hours * 3600 / cost.seconds)  # type: ignore[operator]
    if caps:
        which = "money and time caps" if len(caps) == 2 else "cost cap" if cost.over_cost else "time cap"
        fixes.extend(budget_fixes(scale=min(caps), tokens=spec.budget.tokens, epochs=spec.budget.epochs,
                                  step_tokens=max(s.tokens_per_step(world) for s in budget.stages), reason=which))

    first = budget.stages[0]
    return Plan(
        job=job.name, host=hw.host, profile=prof.id, passes=not reasons, fits=fits, reasons=tuple(reasons),
        warnings=tuple(warnings), fixes=tuple(fixes), memory=memory, precision=precision, compile=compile_,
        device=prof.device, micro_batch=first.micro_batch, grad_accum=first.grad_accum, gpus=gpus,
        stages=budget.stages, steps=budget.steps, tokens=budget.tokens, budget_tokens=budget.budget_tokens,
        budget_used_share=budget.used_share, coverage=budget.coverage, phases=budget.phases,
        params=shape.param_count(), model_flops=cost.model_flops, tokens_per_s=cost.tokens_per_s,
        seconds=cost.seconds, cost_usd=cost.cost_usd, price_usd_per_hour=hw.price_usd_per_hour * train.nodes,
        throughput_source=cost.source, hardware_source=hw.source, overrides=_overrides(job),
        nodes=train.nodes, parallelism=parallelism, parallelism_reason=parallelism_reason,
    )


def _distributed_refusals(spec: Experiment, device: str, precision: str, world: int, parallelism: str) -> list[str]:
    """Why this job cannot run as ``world`` processes on this kind of device (empty: it can)."""
    train = spec.train
    if world == 1:
        return []
    if device == "mps":
        return [f"asks for {world} processes, but an Apple (MPS) host trains in one: a Mac has one GPU and "
                "torch.distributed has no MPS backend; set train.gpus: 1 and train.nodes: 1"]
    if device == "cpu" and not train.distributed_on_cpu:
        return [f"asks for {world} GPUs, but a CPU host has none; set train.gpus: 1 and train.nodes: 1, or "
                "train.distributed_on_cpu: true to test the distributed path with gloo processes (no speed-up)"]
    if parallelism == "fsdp":
        if spec.lora is not None or spec.quantization != "none":
            return ["parallelism fsdp is for full training; LoRA and quantized bases train under ddp"]
        if precision in ("fp16", "fp8"):
            return [f"FSDP trains in bf16 or fp32, not {precision} (the loss scaler and float8 are single-GPU "
                    "or DDP here); set train.precision: bf16 or fp32, or parallelism: ddp"]
    return []


def _parallelism(spec: Experiment, world: int, memory: Callable[[str], MemoryBreakdown]) -> tuple[str, str]:
    """DDP or FSDP for a run of ``world`` processes, and why; ``memory(layout)`` estimates one GPU."""
    train = spec.train
    if world == 1:
        return "single", ""
    if train.parallelism != "auto":
        return train.parallelism, f"{train.parallelism.upper()}: set by train.parallelism"
    if spec.lora is not None or spec.quantization != "none":
        return "ddp", "DDP: LoRA trains few parameters, so a full copy per GPU costs little"
    ddp = memory("ddp")
    need, usable = format_bytes(ddp.required_bytes), format_bytes(ddp.capacity_bytes)
    if ddp.margin_bytes >= AUTO_MARGIN * ddp.capacity_bytes:
        return "ddp", f"DDP: a full copy of the model and its states fits one GPU ({need} of {usable} usable)"
    fsdp = memory("fsdp")
    return "fsdp", (f"FSDP: a full copy per GPU (DDP) needs {need} of {usable} usable; sharding weights, gradients "
                    f"and optimizer states over {world} GPUs needs {format_bytes(fsdp.required_bytes)}")


def _auto_batch(trial, hw: Hardware, seq_len: int, grad_accum: int, tokens_per_step: int | None,
                gpus: int) -> tuple[int, int]:
    """The largest micro-batch that fits with AUTO_MARGIN to spare, and the accumulation to go with it.

    With ``tokens_per_step`` the accumulation makes up that many tokens (rounded up to
    whole sequences); otherwise ``grad_accum`` stays as written.
    """
    target = math.ceil(tokens_per_step / (seq_len * gpus)) if tokens_per_step else None
    limit = min(MAX_AUTO_MICRO_BATCH, target or MAX_AUTO_MICRO_BATCH)

    def ok(mb: int) -> bool:  # with the accumulation it will get: more than one keeps gradients resident
        m = trial(mb, math.ceil(target / mb) if target else grad_accum)
        return m.fits and m.margin_bytes >= AUTO_MARGIN * m.capacity_bytes

    low, high = 1, limit  # the answer is 1 even when nothing fits: the plan then says so
    while low < high:  # memory grows with the micro-batch: bisect for the largest that is ok
        mid = (low + high + 1) // 2
        if ok(mid):
            low = mid
        else:
            high = mid - 1
    if target is None:
        return low, grad_accum
    accum = math.ceil(target / low)
    return math.ceil(target / accum), accum
