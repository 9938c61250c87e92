"""Compare runs of the same experiment across hosts: speed, cost, loss, and how good the plan was.

``records(store, ...)`` reads finished runs from the run store and their run
directories into ``RunRecord``s; ``rows(records, by=...)`` turns them into one
row per run or per hardware profile; ``verdicts(records)`` says, per job, which
host was cheapest to reach the budget, which was fastest and which bought the
most loss per dollar. ``render(...)`` writes the rows as csv, json or markdown,
``table(...)`` as a rich table. Cost is always the host's price times wall time.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from runner.errors import UserError
from runner.units import format_bytes, format_count, format_duration

if TYPE_CHECKING:
    from rich.table import Table

    from runner.plan.memory import MemoryBreakdown
    from runner.store import Run, Store

FLAG_SHARE = 0.15  # a prediction off by more than this is flagged
PER_TOKENS = 100_000_000  # cost and time are quoted per 100M tokens
Format = Literal["table", "csv", "json", "md"]
FORMATS: tuple[Format, ...] = ("table", "csv", "json", "md")


@dataclass(frozen=True)
class MemoryTerms:
    """Peak memory split the way the trainer can measure it: static state, and everything else."""

    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    peak_bytes: int

    @property
    def other_bytes(self) -> int:
        """Activations, logits, runtime and allocator slack: peak minus the static state."""
        return max(0, self.peak_bytes - self.weights_bytes - self.gradients_bytes - self.optimizer_bytes)

    def terms(self) -> dict[str, int]:
        return {"weights": self.weights_bytes, "gradients": self.gradients_bytes,
                "optimizer states": self.optimizer_bytes, "activations, logits and runtime": self.other_bytes}

    @classmethod
    def from_plan(cls, memory: MemoryBreakdown) -> MemoryTerms:
        return cls(memory.weights_bytes + memory.lora_bytes, memory.gradients_bytes, memory.optimizer_bytes,
                   memory.peak_bytes)

    @classmethod
    def from_summary(cls, memory: dict) -> MemoryTerms | None:
        """The trainer's ``summary.json`` ``memory`` section, when it has one."""
        try:
            return cls(int(memory["params_bytes"]), int(memory["grads_bytes"]), int(memory["optimizer_bytes"]),
                       int(memory["peak_bytes"]))
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class RunRecord:
    """What one run measured and what the plan predicted for it."""

    run_id: str
    job: str
    host: str
    profile: str
    state: str
    price_usd_per_hour: float
    tokens: int
    wall_s: float
    tokens_per_s: float | None  # the trainer's, over its training steps
    mfu: float | None
    best_eval_loss: float | None
    final_eval_loss: float | None
    first_eval_loss: float | None = None  # before training, when the job evaluates on start
    budget_tokens: int | None = None
    predicted_seconds: float | None = None
    predicted_tokens_per_s: float | None = None
    predicted_memory: MemoryTerms | None = None
    measured_memory: MemoryTerms | None = None
    run_dir: str | None = None

    @property
    def cost_usd(self) -> float:
        return self.price_usd_per_hour * self.wall_s / 3600

    @property
    def peak_bytes(self) -> int | None:
        return self.measured_memory.peak_bytes if self.measured_memory else None


@dataclass(frozen=True)
class Row:
    """One line of the comparison: a run, or all runs on one hardware profile."""

    label: str  # the run id, or the profile
    job: str
    host: str
    profile: str
    runs: int
    tokens: int
    tokens_per_s: float | None
    mfu: float | None
    wall_s: float
    cost_usd: float
    local: bool  # free hardware: cost is shown as "local"
    usd_per_100m_tokens: float | None
    seconds_per_100m_tokens: float | None
    best_eval_loss: float | None
    final_eval_loss: float | None
    peak_bytes: int | None
    time_error_pct: float | None  # (measured - predicted) / predicted
    memory_error_pct: float | None
    flags: tuple[str, ...]


def time_error_pct(record: RunRecord) -> float | None:
    if not record.predicted_seconds or record.wall_s <= 0:
        return None
    return 100 * (record.wall_s - record.predicted_seconds) / record.predicted_seconds


def memory_error_pct(record: RunRecord) -> float | None:
    if record.predicted_memory is None or record.measured_memory is None or not record.predicted_memory.peak_bytes:
        return None
    predicted = record.predicted_memory.peak_bytes
    return 100 * (record.measured_memory.peak_bytes - predicted) / predicted


def off_term(predicted: MemoryTerms, measured: MemoryTerms) -> tuple[str, int]:
    """The memory-model term whose estimate missed by the most bytes, and by how much (signed)."""
    missed = {name: measured.terms()[name] - value for name, value in predicted.terms().items()}
    name = max(missed, key=lambda n: abs(missed[n]))
    return name, missed[name]


def flags(record: RunRecord) -> tuple[str, ...]:
    """Why this run's measurements disagree with its plan by more than FLAG_SHARE, if they do."""
    out = []
    time_err = time_error_pct(record)
    if time_err is not None and abs(time_err) > 100 * FLAG_SHARE:
        out.append(f"time {time_err:+.0f}% vs plan")
    mem_err = memory_error_pct(record)
    if mem_err is not None and abs(mem_err) > 100 * FLAG_SHARE:
        text = f"peak memory {mem_err:+.0f}% vs plan"
        assert record.predicted_memory is not None and record.measured_memory is not None
        name, missed = off_term(record.predicted_memory, record.measured_memory)
        if missed:
            text += f" ({name} off by {'+' if missed > 0 else '-'}{format_bytes(abs(missed))})"
        out.append(text)
    return tuple(out)


def _per_100m(value: float, tokens: int) -> float | None:
    return value / tokens * PER_TOKENS if tokens > 0 else None


def run_row(record: RunRecord) -> Row:
    return Row(
        label=record.run_id, job=record.job, host=record.host, profile=record.profile, runs=1,
        tokens=record.tokens, tokens_per_s=record.tokens_per_s, mfu=record.mfu, wall_s=record.wall_s,
        cost_usd=record.cost_usd, local=record.price_usd_per_hour == 0,
        usd_per_100m_tokens=_per_100m(record.cost_usd, record.tokens),
        seconds_per_100m_tokens=_per_100m(record.wall_s, record.tokens),
        best_eval_loss=record.best_eval_loss, final_eval_loss=record.final_eval_loss,
        peak_bytes=record.peak_bytes, time_error_pct=time_error_pct(record),
        memory_error_pct=memory_error_pct(record), flags=flags(record))


def profile_row(records: Sequence[RunRecord]) -> Row:
    """All runs on one profile, weighted by tokens; errors are the mean of the runs'."""
    tokens = sum(r.tokens for r in records)
    wall_s = sum(r.wall_s for r in records)
    cost = sum(r.cost_usd for r in records)

    def weighted(values: list[tuple[float | None, int]]) -> float | None:
        known = [(v, w) for v, w in values if v is not None and w > 0]
        weight = sum(w for _, w in known)
        return sum(v * w for v, w in known) / weight if weight else None

    def mean(values: Iterable[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) / len(known) if known else None

    latest = max(records, key=lambda r: r.run_id)
    bests = [r.best_eval_loss for r in records if r.best_eval_loss is not None]
    peaks = [r.peak_bytes for r in records if r.peak_bytes is not None]
    return Row(
        label=latest.profile, job=", ".join(sorted({r.job for r in records})),
        host=", ".join(sorted({r.host for r in records})), profile=latest.profile, runs=len(records),
        tokens=tokens, tokens_per_s=weighted([(r.tokens_per_s, r.tokens) for r in records]),
        mfu=weighted([(r.mfu, r.tokens) for r in records]), wall_s=wall_s, cost_usd=cost,
        local=all(r.price_usd_per_hour == 0 for r in records),
        usd_per_100m_tokens=_per_100m(cost, tokens), seconds_per_100m_tokens=_per_100m(wall_s, tokens),
        best_eval_loss=min(bests) if bests else None, final_eval_loss=latest.final_eval_loss,
        peak_bytes=max(peaks) if peaks else None,
        time_error_pct=mean(time_error_pct(r) for r in records),
        memory_error_pct=mean(memory_error_pct(r) for r in records),
        flags=tuple(dict.fromkeys(f"{r.run_id}: {f}" for r in records for f in flags(r))))


def rows(records: Sequence[RunRecord], by: Literal["run", "profile"] = "run") -> list[Row]:
    """One row per run (in the order given), or one per hardware profile (cheapest per token first)."""
    if by == "run":
        return [run_row(r) for r in records]
    groups: dict[str, list[RunRecord]] = {}
    for r in records:
        groups.setdefault(r.profile, []).append(r)
    out = [profile_row(g) for g in groups.values()]
    return sorted(out, key=lambda row: (row.usd_per_100m_tokens or 0.0, row.seconds_per_100m_tokens or math.inf))


# --- verdicts --------------------------------------------------------------------------------

@dataclass(frozen=True)
class HostOutcome:
    """What one host achieved on one job, summed over its finished runs."""

    host: str
    profile: str
    price_usd_per_hour: float
    tokens: int
    wall_s: float
    cost_usd: float
    budget_tokens: int
    best_eval_loss: float | None
    first_eval_loss: float | None

    @property
    def seconds_to_budget(self) -> float:
        return self.wall_s / self.tokens * self.budget_tokens

    @property
    def usd_to_budget(self) -> float:
        return self.cost_usd / self.tokens * self.budget_tokens

    @property
    def loss_drop_per_usd(self) -> float | None:
        """Eval-loss improvement bought per dollar; infinite on free hardware."""
        if self.best_eval_loss is None or self.first_eval_loss is None:
            return None
        drop = self.first_eval_loss - self.best_eval_loss
        return math.inf if self.cost_usd == 0 else drop / self.cost_usd


@dataclass(frozen=True)
class Verdict:
    """Per job: the cheapest host to reach the budget, the fastest, and the best loss per dollar."""

    job: str
    budget_tokens: int
    hosts: tuple[HostOutcome, ...]
    cheapest: HostOutcome
    fastest: HostOutcome
    best_loss_per_dollar: HostOutcome | None

    def line(self) -> str:
        c, f, b = self.cheapest, self.fastest, self.best_loss_per_dollar
        cost = "free" if c.usd_to_budget == 0 else f"${c.usd_to_budget:,.2f}"
        text = (f"{self.job}: cheapest to reach {format_count(self.budget_tokens)} tokens: {c.host} ({cost}); "
                f"fastest: {f.host} ({format_duration(f.seconds_to_budget)})")
        if b is not None:
            per = "for free" if b.cost_usd == 0 else f"for ${b.cost_usd:,.2f}"
            text += f"; best loss per dollar: {b.host} (eval loss {b.best_eval_loss:.3f} {per})"
        return text + f"  [{len(self.hosts)} host{'s' if len(self.hosts) != 1 else ''}]"


def outcomes(records: Sequence[RunRecord]) -> list[HostOutcome]:
    """One outcome per host from its succeeded runs of one job (the budget: the largest planned)."""
    done = [r for r in records if r.state == "succeeded" and r.tokens > 0 and r.wall_s > 0]
    budget = max((r.budget_tokens or r.tokens for r in done), default=0)
    by_host: dict[str, list[RunRecord]] = {}
    for r in done:
        by_host.setdefault(r.host, []).append(r)
    out = []
    for host, runs in by_host.items():
        bests = [r.best_eval_loss for r in runs if r.best_eval_loss is not None]
        firsts = [r.first_eval_loss for r in runs if r.first_eval_loss is not None]
        out.append(HostOutcome(
            host=host, profile=runs[-1].profile, price_usd_per_hour=runs[-1].price_usd_per_hour,
            tokens=sum(r.tokens for r in runs), wall_s=sum(r.wall_s for r in runs),
            cost_usd=sum(r.cost_usd for r in runs), budget_tokens=budget,
            best_eval_loss=min(bests) if bests else None, first_eval_loss=max(firsts) if firsts else None))
    return out


def verdict(job: str, records: Sequence[RunRecord]) -> Verdict | None:
    """The verdict for one job's runs, or None when no host finished it."""
    hosts = outcomes([r for r in records if r.job == job])
    if not hosts:
        return None
    cheapest = min(hosts, key=lambda h: (h.usd_to_budget, h.seconds_to_budget))
    fastest = min(hosts, key=lambda h: (h.seconds_to_budget, h.usd_to_budget))
    scored = [h for h in hosts if h.loss_drop_per_usd is not None]
    # Free hosts all score infinity: the lower loss wins among them.
    best = max(scored, key=lambda h: (h.loss_drop_per_usd, -(h.best_eval_loss or 0.0)), default=None)
    return Verdict(job, hosts[0].budget_tokens, tuple(hosts), cheapest, fastest, best)


def verdicts(records: Sequence[RunRecord]) -> list[Verdict]:
    """One verdict per job that some host finished, in the order jobs first appear."""
    jobs = list(dict.fromkeys(r.job for r in records))
    return [v for v in (verdict(job, records) for job in jobs) if v is not None]


# --- reading records from the store ---------------------------------------------------------

def record_from_run(run: Run) -> RunRecord:
    """A store row plus its run directory's summary.json and metrics.jsonl, and the plan's memory."""
    from runner.resolved import ResolvedRun

    run_dir = Path(run.run_dir)
    summary = _read_json(run_dir / "summary.json") or {}
    resolved = ResolvedRun.model_validate_json(run.resolved_json)
    measured = MemoryTerms.from_summary(summary.get("memory") or {})
    if measured is None and run.peak_bytes:
        measured = MemoryTerms(0, 0, 0, run.peak_bytes)
    tokens = run.tokens if run.tokens is not None else int(summary.get("tokens") or 0)
    return RunRecord(
        run_id=run.id, job=run.experiment, host=run.host, profile=run.profile, state=run.state,
        price_usd_per_hour=run.price_usd_per_hour, tokens=tokens, wall_s=run.elapsed_s(),
        tokens_per_s=run.tokens_per_s if run.tokens_per_s is not None else summary.get("tokens_per_s"),
        mfu=run.mfu if run.mfu is not None else summary.get("mfu"),
        best_eval_loss=_first(run.best_eval_loss, summary.get("best_eval_loss")),
        final_eval_loss=_first(run.final_eval_loss, summary.get("final_eval_loss")),
        first_eval_loss=first_eval_loss(run_dir / "metrics.jsonl"),
        budget_tokens=resolved.token_budget or summary.get("planned_tokens"),
        predicted_seconds=run.predicted_seconds, predicted_tokens_per_s=run.predicted_tokens_per_s,
        predicted_memory=_predicted_memory(resolved), measured_memory=measured, run_dir=str(run_dir))


def records(store: Store, run_ids: Sequence[str] = (), *, job: str | None = None) -> list[RunRecord]:
    """The runs named (ids or unique prefixes), or every finished run of ``job``, or every finished run.

    ``runner probe``'s own short runs are left out of "every finished run": they
    measure a host, not an experiment (name them, or their job, to see them).
    """
    from runner.capacity import probe_run_ids

    if run_ids:
        runs = [store.get(i) for i in run_ids]
    else:
        probes = probe_run_ids(store) if job is None else set()
        runs = [r for r in reversed(store.runs())
                if not r.active and r.id not in probes and (job is None or r.experiment == job)]
        if job is not None and not runs:
            raise UserError(f"no finished runs of job {job!r} in {store.path}", field="job",
                            hint="`runner runs` lists the runs and their jobs")
    return [record_from_run(r) for r in runs]


def first_eval_loss(metrics_path: Path) -> float | None:
    """The first eval loss in a metrics.jsonl (step 0 when the job evaluates on start)."""
    for event in read_events(metrics_path):
        if event.get("event") == "eval" and event.get("eval_loss") is not None:
            return float(event["eval_loss"])
    return None


def read_events(metrics_path: Path) -> list[dict]:
    """The events of a metrics.jsonl; a torn last line (a run still writing) is skipped."""
    try:
        text = metrics_path.read_text()
    except FileNotFoundError:
        return []
    events = []
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def _predicted_memory(resolved) -> MemoryTerms | None:
    """The planner's peak-memory estimate for the stages this run was resolved with."""
    from runner.calibration import experiment_shape
    from runner.catalog import load_catalog
    from runner.plan.memory import LoraShape, estimate_memory, lora_targets

    shape = experiment_shape(resolved.experiment, Path(resolved.job_dir))
    catalog = load_catalog()
    if shape is None or resolved.profile not in catalog.profiles:
        return None
    prof = catalog.get(resolved.profile)
    exp = resolved.experiment
    lora = LoraShape(exp.lora.rank, lora_targets(shape, exp.lora.target_modules)) if exp.lora else None
    estimates = [estimate_memory(
        shape, seq_len=s.seq_len, micro_batch=s.micro_batch, precision=resolved.precision, device=prof.device,
        capacity_bytes=prof.memory_bytes, memory_bytes=prof.memory_bytes, usable_share=prof.usable_share,
        runtime_bytes=prof.runtime_bytes, optimizer=exp.train.optimizer,
        gradient_checkpointing=exp.train.gradient_checkpointing, grad_accum=s.grad_accum, lora=lora,
        quantization=exp.quantization, compiled=resolved.compile) for s in resolved.stages]
    return MemoryTerms.from_plan(max(estimates, key=lambda m: m.peak_bytes))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _first(*values):
    return next((v for v in values if v is not None), None)


# --- output ------------------------------------------------------------------------------

COLUMNS = ("label", "job", "host", "profile", "runs", "tokens", "tokens_per_s", "mfu", "wall_s", "cost_usd",
           "usd_per_100m_tokens", "seconds_per_100m_tokens", "best_eval_loss", "final_eval_loss", "peak_bytes",
           "time_error_pct", "memory_error_pct", "flags")


def row_dict(row: Row) -> dict:
    """A row as plain data: numbers unrounded, cost None on local hardware."""
    data = asdict(row)
    if row.local:
        data["cost_usd"] = data["usd_per_100m_tokens"] = None
    data["flags"] = list(row.flags)
    return data


def render(rows_: Sequence[Row], verdicts_: Sequence[Verdict], fmt: Format) -> str:
    """The comparison as csv, json or markdown text."""
    if fmt == "json":
        return json.dumps({"rows": [row_dict(r) for r in rows_],
                           "verdicts": [{"job": v.job, "budget_tokens": v.budget_tokens, "cheapest": v.cheapest.host,
                                         "fastest": v.fastest.host,
                                         "best_loss_per_dollar": v.best_loss_per_dollar.host
                                         if v.best_loss_per_dollar else None, "line": v.line()}
                                        for v in verdicts_]}, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS)
        for r in rows_:
            data = row_dict(r)
            writer.writerow(["; ".join(data[c]) if c == "flags" else "" if data[c] is None else data[c]
                             for c in COLUMNS])
        return out.getvalue()
    if fmt == "md":
        headers, cells = _display(rows_)
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        lines += [""] + [f"- {v.line()}" for v in verdicts_]
        return "\n".join(lines) + "\n"
    raise ValueError(f"render() writes csv, json or md, not {fmt}")


def table(rows_: Sequence[Row], *, narrow: bool = False) -> Table:
    """The comparison as a rich table (flags in red).

    ``narrow`` is for a terminal: the flags column is left out (``flag_lines``
    prints them under the table) and so is the job column when every row is of
    one job, which then titles the table.
    """
    from rich.table import Table

    headers, cells = _display(rows_)
    jobs = {r.job for r in rows_}
    drop = {"flags"} | ({"job"} if len(jobs) == 1 else set()) if narrow else set()
    keep = [i for i, h in enumerate(headers) if h not in drop]
    title = next(iter(jobs)) if narrow and len(jobs) == 1 else None
    out = Table(title=title, title_justify="left", title_style="bold", show_edge=False, box=None,
                header_style="bold")
    for i in keep:
        h = headers[i]
        out.add_column(h, justify="left" if h in ("run", "profile", "host", "job", "flags") else "right",
                       no_wrap=h != "flags")
    for row, text in zip(rows_, cells):
        text = [f"[red]{t}[/red]" if headers[i] == "flags" and row.flags else t for i, t in enumerate(text)]
        out.add_row(*(text[i] for i in keep))
    return out


def flag_lines(rows_: Sequence[Row]) -> list[str]:
    """One line per prediction error beyond FLAG_SHARE: ``RUN: peak memory +40% vs plan (...)``."""
    # A profile row's flags already name their runs.
    return [f if r.label == r.profile else f"{r.label}: {f}" for r in rows_ for f in r.flags]


def _display(rows_: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    by_profile = bool(rows_) and all(r.label == r.profile for r in rows_)  # run ids never look like profiles
    headers = ["profile" if by_profile else "run", "job", "host", "tokens", "tokens/s", "MFU", "wall", "cost",
               "$/100M tok", "time/100M tok", "best eval", "final eval", "peak mem", "time err", "mem err", "flags"]
    cells = []
    for r in rows_:
        cells.append([
            r.label, r.job, r.host, format_count(r.tokens), _num(r.tokens_per_s, format_count),
            _num(r.mfu, lambda v: f"{v:.1%}"), format_duration(r.wall_s),
            "local" if r.local else f"${r.cost_usd:,.2f}",
            "local" if r.local else _num(r.usd_per_100m_tokens, lambda v: f"${v:,.2f}"),
            _num(r.seconds_per_100m_tokens, format_duration),
            _num(r.best_eval_loss, lambda v: f"{v:.4f}"), _num(r.final_eval_loss, lambda v: f"{v:.4f}"),
            _num(r.peak_bytes, format_bytes), _num(r.time_error_pct, lambda v: f"{v:+.0f}%"),
            _num(r.memory_error_pct, lambda v: f"{v:+.0f}%"), "; ".join(r.flags)])
    return headers, cells


def _num(value, fmt) -> str:
    return "-" if value is None else fmt(value)
