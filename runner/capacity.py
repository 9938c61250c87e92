"""Probe a host: short fixed-step training runs per shape, and what the host can do in a day.

``probe(...)`` writes small jobs per (model, sequence length), runs each on
the host through the same dispatch path as ``runner run`` (so the runs are in
the run store too), and records tokens/s (after the first logged steps, which
hold compilation and start-up), step time, peak memory and stability in the
``probes`` table beside the runs, with the host, profile, software and date.
Each shape runs three times: at the micro-batch a job would use, then at half
and at a quarter of it, so that the calibration can tell the fixed cost of a
micro-batch from the cost of its tokens, and a host that sets the pace of the
smaller steps from the GPU. ``capacity(results, hours)`` turns probe results (those at
the micro-batch a job would use) into the capacity table: tokens reachable in
``hours`` per configuration, which fit, and a recommended primary and fallback
configuration.

The recommendation follows the compute-optimal rule of thumb (Hoffmann et al.
2022, about 20 training tokens per parameter): the primary configuration is the
largest model that reaches 20 tokens per parameter in the time given (else the
one that comes closest), the fallback the next smaller model that fits, which
leaves more memory and time to spare.
"""

from __future__ import annotations

import json
import math
import platform
import sqlite3
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from runner.errors import EXIT_REFUSED, UserError
from runner.presets import ModelShape, lookup_preset
from runner.units import format_bytes, format_count, format_duration

if TYPE_CHECKING:
    from rich.table import Table

    from runner.calibration import Observation
    from runner.hosts import Inventory
    from runner.store import Store

TOKENS_PER_PARAM = 20  # compute-optimal training tokens per parameter (Chinchilla)
DEFAULT_STEPS = 30
# The later runs of a shape take a half and a quarter of the micro-batch: three points show a knee where the
# host, not the GPU, sets the pace of the smaller steps, which two cannot (runner.plan.cost.knee_time).
SMALLER_SHARES = (2, 4)
Outcome = Literal["ok", "oom", "diverged", "error", "refused"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS probes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT,                  -- the run of this probe in the runs table (none when the plan refused it)
    host TEXT NOT NULL,
    profile TEXT NOT NULL,
    model TEXT NOT NULL,          -- the preset probed (d12, tiny, ...)
    shape_json TEXT NOT NULL,     -- its ModelShape
    seq_len INTEGER NOT NULL,
    micro_batch INTEGER NOT NULL,
    grad_accum INTEGER NOT NULL,
    precision TEXT NOT NULL,
    steps INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    tokens_per_s REAL,
    step_s REAL,
    wall_s REAL NOT NULL,
    peak_bytes INTEGER,
    capacity_bytes INTEGER NOT NULL,
    outcome TEXT NOT NULL,        -- ok | oom | diverged | error | refused
    detail TEXT NOT NULL,
    versions_json TEXT NOT NULL,  -- runner, backend, image, python, torch
    probed_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS probes_host ON probes(host, probed_at);
"""


@dataclass(frozen=True)
class ProbeResult:
    """One shape tried on one host."""

    host: str
    profile: str
    model: str
    shape: ModelShape
    seq_len: int
    micro_batch: int
    grad_accum: int
    precision: str
    steps: int
    tokens: int
    tokens_per_s: float | None
    step_s: float | None
    wall_s: float
    peak_bytes: int | None
    capacity_bytes: int
    outcome: Outcome
    detail: str
    versions: dict
    probed_at: float
    run_id: str | None = None

    @property
    def stable(self) -> bool:
        """Finished its steps with a finite loss and no out-of-memory."""
        return self.outcome == "ok"

    @property
    def fits(self) -> bool:
        return self.stable and (self.peak_bytes is None or self.peak_bytes <= self.capacity_bytes)

    @property
    def params(self) -> int:
        return self.shape.param_count()


# --- the probes table ---------------------------------------------------------------------

def _connect(store: Store) -> sqlite3.Connection:
    db = sqlite3.connect(store.path, timeout=30)
    db.row_factory = sqlite3.Row
    db.executescript(SCHEMA)
    return db


def record(store: Store, result: ProbeResult) -> None:
    """Append one probe result to the store's ``probes`` table."""
    values = {k: v for k, v in asdict(result).items() if k not in ("shape", "versions")}
    values["shape_json"] = json.dumps(result.shape.to_dict())
    values["versions_json"] = json.dumps(result.versions, sort_keys=True)
    with closing(_connect(store)) as db, db:
        db.execute(f"INSERT INTO probes ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                   tuple(values.values()))


def results(store: Store, host: str | None = None) -> list[ProbeResult]:
    """Recorded probe results, oldest first (of one host when given)."""
    query, params = "SELECT * FROM probes", ()
    if host is not None:
        query, params = query + " WHERE host = ?", (host,)
    with closing(_connect(store)) as db:
        rows = db.execute(query + " ORDER BY probed_at, id", params).fetchall()
    out = []
    for row in rows:
        data = {k: row[k] for k in row.keys() if k not in ("id", "shape_json", "versions_json")}
        out.append(ProbeResult(**data, shape=ModelShape(**json.loads(row["shape_json"])),
                               versions=json.loads(row["versions_json"])))
    return out


def probe_run_ids(store: Store) -> set[str]:
    with closing(_connect(store)) as db:
        return {r[0] for r in db.execute("SELECT run_id FROM probes WHERE run_id IS NOT NULL")}


def probe_observations(store: Store) -> list[Observation]:
    """Stable probes as calibration observations, trained the way their runs were resolved."""
    from runner.calibration import Observation

    out = []
    for r in results(store):
        if r.stable and r.tokens_per_s:
            out.append(Observation(
                host=r.host, profile=r.profile, shape=r.shape, seq_len=r.seq_len, precision=r.precision,
                tokens_per_s=r.tokens_per_s, peak_bytes=r.peak_bytes,
                overhead_s=max(0.0, r.wall_s - r.tokens / r.tokens_per_s), kind="probe", at=r.probed_at,
                micro_batch=r.micro_batch, **_trained(store, r.run_id)))
    return out


def _trained(store: Store, run_id: str | None) -> dict:
    """LoRA, checkpointing, compile and processes of a probe's run (the defaults for a run no longer stored)."""
    from runner.resolved import ResolvedRun

    if run_id is None:
        return {}
    try:
        resolved = ResolvedRun.model_validate_json(store.get(run_id).resolved_json)
    except UserError:  # the run was deleted from the store; its probe stays
        return {}
    train = resolved.experiment.train
    return {"lora": resolved.experiment.lora is not None, "gradient_checkpointing": train.gradient_checkpointing,
            "compile": resolved.compile, "gpus": resolved.world_size}


# --- running probes -----------------------------------------------------------------------

def sample_data_dir() -> Path:
    """The sample corpus shipped with the runner's sources (what probes train on)."""
    return Path(__file__).resolve().parent.parent / "data" / "sample"


def probe_job(model: str, seq_len: int, steps: int, batch_size: int | str, data: Path, name: str) -> str:
    """A job file named ``name`` that trains ``model`` for exactly ``steps`` steps at ``seq_len``: no evals."""
    sources = [data / "news.jsonl", data / "filings.txt"]
    missing = [p for p in sources if not p.is_file()]
    if missing:
        raise UserError(f"the sample data probes train on is missing: {missing[0]}", field="probe",
                        hint="probe from a checkout of the runner's sources, which ship data/sample")
    return json.dumps({
        "name": name,
        "description": f"capacity probe: {steps} steps of {model} at seq_len {seq_len}",
        "model": model,
        "data": {"sources": [{"path": str(p)} for p in sources], "validation": 0, "seq_len": seq_len},
        "train": {"batch_size": batch_size, "warmup_steps": max(1, steps // 5), "log_every_steps": max(1, steps // 5)},
        "budget": {"max_steps": steps, "max_hours": 0.5},
        "checkpoint": {"every_steps": steps, "keep_last": 1},
        "eval": {"on_start": False, "every_steps": steps + 1},
    }, indent=2) + "\n"  # JSON is YAML


def versions(run_backend: str, image: str | None) -> dict:
    """The software a probe ran with: the runner, the backend, and the image or this interpreter."""
    found = {"runner": _version("runner"), "backend": run_backend}
    if image:
        found["image"] = image
    else:
        found["python"] = platform.python_version()
        found["torch"] = _version("torch")
    return found


def _version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe(store: Store, host: str, models: Sequence[str], seq_lens: Sequence[int], *, steps: int = DEFAULT_STEPS,
          batch_size: int | str = "auto", backend: str | None = None, inventory: Inventory | None = None,
          say: Callable[[str], None] = print) -> list[ProbeResult]:
    """Probe each (model, seq_len) on ``host``, record every run, and return one result per shape.

    A shape runs half of ``steps`` at ``batch_size`` (the largest that fits for
    ``auto``) and, when that ran cleanly, a quarter at half of that micro-batch
    and a quarter at a quarter of it: about the time of one run of ``steps``, plus
    two more start-ups.
    The result returned is the first run's, the micro-batch a job would use.
    """
    from runner import dispatch
    from runner.hosts import hardware, load_inventory

    if steps < 1:
        raise UserError(f"a probe trains at least one step, not {steps}", field="steps")
    for model in models:
        shape = lookup_preset(model)
        if shape is None:
            raise UserError(f"unknown model preset {model!r}", field="probe", hint="e.g. d12, d20 or tiny")
        too_long = [n for n in seq_lens if n > shape.max_positions]
        if too_long:  # refused before anything runs, not half way through the probes
            raise UserError(f"{model} has a context of {shape.max_positions} tokens; seq {too_long[0]} is longer",
                            field="seq", hint=f"probe {model} at --seq {shape.max_positions} or shorter")
    inventory = inventory or load_inventory()
    hw = hardware(inventory.get(host))
    folder = store.path.parent / "probes" / f"{host}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)

    def run(model: str, seq_len: int, run_steps: int, micro_batch: int | str, name: str) -> ProbeResult:
        job_file = folder / f"{name}.yaml"
        job_file.write_text(probe_job(model, seq_len, run_steps, micro_batch, sample_data_dir(), name))
        shape = lookup_preset(model)
        assert shape is not None
        return _probe_one(store, job_file, host, label=model, shape=shape, seq_len=seq_len, steps=run_steps, hw=hw,
                          backend=backend, inventory=inventory, say=say)

    out = []
    for model in models:
        for seq_len in seq_lens:
            name = f"probe-{model}-s{seq_len}"
            out.append(_at_three_micro_batches(
                lambda n, mb: run(model, seq_len, n, mb if mb is not None else batch_size,
                                  name if mb is None else f"{name}-b{mb}"), steps)[0])
    return out


def _at_three_micro_batches(run: Callable[[int, int | None], ProbeResult], steps: int) -> list[ProbeResult]:
    """Half of ``steps`` at the micro-batch a job would use (``None``), then, if that ran cleanly, a quarter
    at half of it and a quarter at a quarter of it: how a step's time grows with its tokens, for the calibration."""
    small_steps = steps // 4
    first = run(steps - len(SMALLER_SHARES) * small_steps, None)
    out = [first]
    if not (first.stable and small_steps):
        return out
    for share in SMALLER_SHARES:
        small = max(1, first.micro_batch // share)
        if small < out[-1].micro_batch:
            out.append(run(small_steps, small))
    return out


def probe_experiment(store: Store, host: str, job_file: Path, *, experiment: str | None = None,
                     sets: Sequence[str] = (), steps: int = DEFAULT_STEPS, backend: str | None = None,
                     inventory: Inventory | None = None, say: Callable[[str], None] = print) -> list[ProbeResult]:
    """Probe one experiment of a job file as it is written (model, data, precision, LoRA, checkpointing...).

    ``runner probe`` measures preset shapes the default way; a job trained
    another way (LoRA, checkpointing, compile off, another precision) is not
    calibrated by them, since each is a different speed. This runs the job's
    own configuration for half of ``steps`` at its micro-batch and the rest at
    half and a quarter of it, without evals, so its plan is calibrated as a
    probed shape's is. The results, the job's micro-batch first.
    """
    from runner.calibration import experiment_shape
    from runner.hosts import hardware, load_inventory
    from runner.spec import load_jobs, pick_experiment

    if steps < 1:
        raise UserError(f"a probe trains at least one step, not {steps}", field="steps")
    job = pick_experiment(load_jobs(job_file, list(sets)), experiment, job_file)
    if job.spec.curriculum:
        raise UserError("a probe measures one sequence shape; this job's curriculum has several", field="curriculum",
                        file=str(job_file), hint="probe its stages' shapes with --models and --seq")
    shape = experiment_shape(job.spec, Path(job_file).resolve().parent)
    if shape is None:
        raise UserError("the probe needs the model's shape, and this model's config is not here", field="model",
                        file=str(job_file), hint="use a preset, model.path, or model.shape for a hub model")
    inventory = inventory or load_inventory()
    hw = hardware(inventory.get(host))

    def run(run_steps: int, micro_batch: int | None) -> ProbeResult:
        run_sets = [*sets, f"budget.max_steps={run_steps}", "eval.on_start=false",
                    f"eval.every_steps={run_steps + 1}", f"checkpoint.every_steps={run_steps}"]
        if micro_batch is not None:
            run_sets += [f"train.batch_size={micro_batch}", "train.tokens_per_step=null", "train.grad_accum=1"]
        return _probe_one(store, Path(job_file), host, label=job.name, shape=shape, seq_len=job.spec.seq_len,
                          steps=run_steps, hw=hw, backend=backend, inventory=inventory, say=say,
                          experiment=job.name, sets=run_sets)

    return _at_three_micro_batches(run, steps)


def _probe_one(store: Store, job_file: Path, host: str, *, label: str, shape: ModelShape, seq_len: int, steps: int,
               hw, backend: str | None, inventory, say: Callable[[str], None], experiment: str | None = None,
               sets: Sequence[str] = ()) -> ProbeResult:
    """Run one probe through the dispatch path, record it in the ``probes`` table, and say how it went."""
    from runner import dispatch
    from runner.calibration import Calibration

    base = dict(host=host, profile=hw.profile.id, model=label, shape=shape, seq_len=seq_len,
                capacity_bytes=hw.capacity_bytes, probed_at=time.time())
    try:
        prepared = dispatch.prepare(job_file, experiment=experiment, host=host, sets=list(sets), backend=backend,
                                    inventory=inventory, settle=True, throughput=Calibration.from_store(store))[0]
    except UserError as exc:
        if exc.exit_code != EXIT_REFUSED:
            raise
        result = ProbeResult(**base, micro_batch=0, grad_accum=0, precision=hw.profile.default_precision, steps=0,
                             tokens=0, tokens_per_s=None, step_s=None, wall_s=0.0, peak_bytes=None, outcome="refused",
                             detail=exc.message, versions=versions(backend or "-", None))
        _said(store, result, say)
        return result
    stage = prepared.resolved.stages[0]
    # Said before it starts: a large auto batch on a slow host can make even a short probe long.
    say(f"probe {label} seq {seq_len} on {host}: {steps} steps of {stage.micro_batch}x{stage.grad_accum}, "
        f"planned {format_duration(prepared.plan.seconds)} ({prepared.plan.throughput_source})")
    run = dispatch.launch(store, prepared, say=lambda _: None)
    run = dispatch.wait(store, run.id)
    summary = dispatch.read_summary(Path(run.run_dir)) or {}
    outcome, detail = _outcome(run.state, run.reason, summary)
    tokens_per_s = steady_tokens_per_s(Path(run.run_dir)) or summary.get("tokens_per_s")
    tokens_per_step = stage.tokens_per_step(prepared.resolved.gpus)
    result = ProbeResult(
        **base, micro_batch=stage.micro_batch, grad_accum=stage.grad_accum, precision=prepared.resolved.precision,
        steps=int(summary.get("steps") or 0), tokens=int(summary.get("tokens") or 0), tokens_per_s=tokens_per_s,
        step_s=tokens_per_step / tokens_per_s if tokens_per_s else None, wall_s=run.wall_s,
        peak_bytes=summary.get("peak_bytes"), outcome=outcome, detail=detail,
        versions=versions(run.backend, run.image), run_id=run.id)
    _said(store, result, say)
    return result


def _said(store: Store, result: ProbeResult, say: Callable[[str], None]) -> None:
    """Record a probe result and say it in one line."""
    record(store, result)
    say(f"probe {result.model} seq {result.seq_len} on {result.host}: {result.outcome}"
        + (f" at micro-batch {result.micro_batch}" if result.micro_batch else "")
        + (f", {format_count(result.tokens_per_s)} tokens/s" if result.tokens_per_s else "")
        + (f", peak {format_bytes(result.peak_bytes)}" if result.peak_bytes else "")
        + (f" ({result.detail})" if result.outcome != "ok" else ""))


def steady_tokens_per_s(run_dir: Path) -> float | None:
    """A run's training rate after its first logged window, from its metrics.jsonl (None with fewer than two).

    The first window holds what a run pays once (torch.compile, CUDA start-up, the
    allocator warming up). Left in the rate, it makes a short probe's rate far too
    low on a GPU, where compiling can outlast the probe's steps; left out, it lands
    in the probe's fixed overhead (wall time beyond tokens / rate), which the
    planner adds once per run.
    """
    from runner.compare import read_events

    windows = [e for e in read_events(run_dir / "metrics.jsonl") if e.get("event") == "train" and e.get("tokens_per_s")]
    if len(windows) < 2:
        return None
    tokens = [later["tokens"] - earlier["tokens"] for earlier, later in zip(windows, windows[1:])]
    seconds = sum(n / w["tokens_per_s"] for n, w in zip(tokens, windows[1:]))
    return sum(tokens) / seconds if seconds > 0 else None


def _outcome(state: str, reason: str, summary: dict) -> tuple[Outcome, str]:
    error = summary.get("error") or ""
    if "out of memory" in error.lower() or "OOM" in reason:
        return "oom", error or reason
    loss = summary.get("final_loss")
    if state == "succeeded":
        if loss is None or not math.isfinite(loss):
            return "diverged", f"final loss {loss}"
        return "ok", f"final loss {loss:.3f}"
    return "error", error or reason


# --- the capacity table -------------------------------------------------------------------

@dataclass(frozen=True)
class CapacityRow:
    """One probed configuration and what it reaches in the time given."""

    result: ProbeResult
    hours: float

    @property
    def tokens(self) -> int | None:
        """Tokens trained in ``hours`` at the probed rate (None when it did not run cleanly)."""
        if not self.result.stable or not self.result.tokens_per_s:
            return None
        return int(self.result.tokens_per_s * self.hours * 3600)

    @property
    def tokens_per_param(self) -> float | None:
        return None if self.tokens is None else self.tokens / self.result.params


@dataclass(frozen=True)
class Capacity:
    """The capacity table of a host and its recommendation."""

    host: str
    hours: float
    rows: tuple[CapacityRow, ...]
    primary: CapacityRow | None
    fallback: CapacityRow | None

    def recommendation(self) -> str:
        if self.primary is None:
            return f"nothing probed on {self.host} ran cleanly: no recommendation"
        text = f"recommended on {self.host} for {_hours(self.hours)}: {_describe(self.primary)}"
        if self.fallback is not None:
            text += f"; fallback: {_describe(self.fallback)}"
        return text


def capacity(found: Sequence[ProbeResult], hours: float = 24.0) -> Capacity:
    """The capacity table for one host's probe results, with a primary and a fallback configuration."""
    rows = tuple(CapacityRow(r, hours) for r in sorted(found, key=lambda r: (r.params, r.seq_len)))
    fitting = [r for r in rows if r.result.fits and r.tokens]
    host = found[0].host if found else "?"
    if not fitting:
        return Capacity(host, hours, rows, None, None)
    optimal = [r for r in fitting if r.tokens_per_param >= TOKENS_PER_PARAM]  # type: ignore[operator]
    if optimal:  # the largest such model, at its longest sequence
        primary = max(optimal, key=lambda r: (r.result.params, r.result.seq_len))
    else:  # none trains long enough: the one closest to the rule
        primary = max(fitting, key=lambda r: (r.tokens_per_param, r.result.seq_len))
    smaller = [r for r in fitting if r.result.params < primary.result.params]
    same_seq = [r for r in smaller if r.result.seq_len == primary.result.seq_len]
    pool = same_seq or smaller or [r for r in fitting if r is not primary]
    fallback = max(pool, key=lambda r: (r.result.params, r.result.seq_len), default=None)
    return Capacity(host, hours, rows, primary, fallback)


def capacity_table(cap: Capacity) -> Table:
    from rich.table import Table

    table = Table(title=f"capacity of {cap.host} in {_hours(cap.hours)}", title_justify="left", show_edge=False,
                  box=None, header_style="bold")
    for name in ("model", "params", "seq", "batch x accum", "precision", "tokens/s", "step", "peak / capacity",
                 "stable", f"tokens in {_hours(cap.hours)}", "tokens/param", ""):
        table.add_column(name, justify="left" if name in ("model", "precision", "stable", "") else "right")
    for row in cap.rows:
        r = row.result
        mark = "primary" if row is cap.primary else "fallback" if row is cap.fallback else ""
        stable = "yes" if r.stable else r.outcome
        if r.stable and not r.fits:
            stable = "over capacity"
        table.add_row(
            r.model, format_count(r.params), str(r.seq_len),
            f"{r.micro_batch}x{r.grad_accum}" if r.micro_batch else "-", r.precision,
            format_count(r.tokens_per_s) if r.tokens_per_s else "-",
            f"{r.step_s:.2f}s" if r.step_s else "-",
            f"{format_bytes(r.peak_bytes) if r.peak_bytes else '-'} / {format_bytes(r.capacity_bytes)}",
            stable, format_count(row.tokens) if row.tokens else "-",
            f"{row.tokens_per_param:.1f}" if row.tokens_per_param is not None else "-", mark)
    return table


def _describe(row: CapacityRow) -> str:
    r = row.result
    return (f"{r.model} at seq {r.seq_len}, batch {r.micro_batch}x{r.grad_accum} "
            f"({format_count(row.tokens or 0)} tokens, {row.tokens_per_param:.0f} per param)")


def _hours(hours: float) -> str:
    return f"{hours:g}h" if hours >= 1 and float(hours).is_integer() else format_duration(hours * 3600)
