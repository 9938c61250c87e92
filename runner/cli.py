"""The ``runner`` command: a thin face over the core library.

Each subcommand is one function registered with ``@command``, which names it
(a space makes a nested command: ``"hosts probe"``), gives its help line and
its arguments. The function receives the parsed arguments and returns an exit
code; user errors it raises are printed as ``FILE:LINE:COL: field: message``.

    @command("logs", "print a run's log", arg("run"), arg("--follow", action="store_true"))
    def logs(args: argparse.Namespace) -> int:
        ...

Import heavy modules inside the function, so that ``runner --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.errors import EXIT_INVALID, EXIT_OK, EXIT_REFUSED, UserError, UserErrors

if TYPE_CHECKING:
    from rich.console import Console

    from runner.plan import Plan


@dataclass(frozen=True)
class Arg:
    flags: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)


def arg(*flags: str, **options: Any) -> Arg:
    """One ``add_argument`` call, written where the command is registered."""
    return Arg(flags, options)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: tuple[Arg, ...]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, *arguments: Arg) -> Callable[[Callable[[argparse.Namespace], int]], Callable]:
    """Register a subcommand; ``name`` may be two words for a command group (``hosts list``)."""
    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in COMMANDS:
            raise ValueError(f"command {name!r} is registered twice")
        COMMANDS[name] = Command(name, help, run, arguments)
        return run
    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runner", description="Plan, run and compare language-model training jobs.")
    parser.add_argument("--hosts-file", metavar="PATH", help="host inventory (default: $RUNNER_HOSTS, ./hosts.yaml, "
                        "~/.config/runner/hosts.yaml)")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for cmd in COMMANDS.values():
        words = cmd.name.split()
        if len(words) == 1:
            sub = top.add_parser(words[0], help=cmd.help, description=cmd.help)
        else:
            if words[0] not in groups:
                group = top.add_parser(words[0], help=f"{words[0]} commands")
                groups[words[0]] = group.add_subparsers(dest=f"{words[0]}_command", metavar="COMMAND", required=True)
            sub = groups[words[0]].add_parser(words[1], help=cmd.help, description=cmd.help)
        # --hosts-file is accepted after the subcommand too.
        sub.add_argument("--hosts-file", metavar="PATH", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        for a in cmd.arguments:
            sub.add_argument(*a.flags, **a.options)
        sub.set_defaults(run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``runner`` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return EXIT_INVALID if exc.code not in (0, None) else EXIT_OK
    try:
        return args.run(args)
    except UserErrors as exc:
        print_errors(exc.errors)
        return exc.exit_code
    except UserError as exc:
        print_errors([exc])
        return exc.exit_code


def print_errors(errors: list[UserError]) -> None:
    for error in errors:
        print(error.render(), file=sys.stderr)


def console() -> Console:
    """A console on the current stdout (so tests can capture it), wide enough for the tables."""
    from rich.console import Console
    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160, highlight=False)


# --- validate and plan ------------------------------------------------------------------

class SetField(argparse.Action):
    """A short flag that is sugar for ``--set FIELD=VALUE``: it adds to the same list, in command-line order."""

    def __init__(self, option_strings: list[str], dest: str, field: str, const: Any = None, **kwargs: Any):
        self.field = field
        super().__init__(option_strings, dest, nargs=0 if const is not None else None, const=const,
                         default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        value = self.const if self.const is not None else values
        setattr(namespace, self.dest, [*getattr(namespace, self.dest, []), f"{self.field}={value}"])


SET_ARGS = (
    arg("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE",
        help="override a field of the job file, e.g. --set data.seq_len=2048 (repeatable)"),
    arg("--max-steps", dest="sets", action=SetField, field="budget.max_steps", metavar="N",
        help="sugar for --set budget.max_steps=N (caps the budget: a quick test)"),
    arg("--batch-size", dest="sets", action=SetField, field="train.batch_size", metavar="N",
        help="sugar for --set train.batch_size=N (or auto)"),
    arg("--seq-len", dest="sets", action=SetField, field="data.seq_len", metavar="N",
        help="sugar for --set data.seq_len=N"),
    arg("--no-packing", dest="sets", action=SetField, field="data.packing", const="false",
        help="sugar for --set data.packing=false"),
)


@command("validate", "check job files and report every error with its location",
         arg("jobs", nargs="+", metavar="JOB"), *SET_ARGS)
def validate(args: argparse.Namespace) -> int:
    from runner.hosts import load_inventory
    from runner.spec import check_job, load_jobs

    inventory = load_inventory(args.hosts_file)
    out = console()
    failed = False
    for path in args.jobs:
        try:
            jobs = load_jobs(path, args.sets)
        except UserErrors as exc:
            print_errors(exc.errors)
            failed = True
            continue
        errors = [e for job in jobs for e in check_job(job, inventory.names)]
        if errors:
            print_errors(errors)
            failed = True
            continue
        names = ", ".join(job.name for job in jobs)
        out.print(f"ok {path}: {len(jobs)} experiment{'s' if len(jobs) > 1 else ''} ({names})")
    return EXIT_INVALID if failed else EXIT_OK


@command("plan", "estimate memory, time and cost of a job on each host, before running it",
         arg("job", metavar="JOB"),
         arg("--host", help="plan on this host only (and show its memory breakdown)"),
         arg("--all-hosts", action="store_true", help="plan on every host in the inventory"),
         *SET_ARGS,
         arg("--breakdown", action="store_true", help="show the memory breakdown for every host"),
         arg("--json", action="store_true", help="print the plans as JSON"))
def plan(args: argparse.Namespace) -> int:
    from runner.calibration import default_calibration
    from runner.hosts import load_inventory
    from runner.plan import plan_hosts
    from runner.spec import check_job, load_jobs

    if args.host and args.all_hosts:
        raise UserError("give --host or --all-hosts, not both", field="plan")
    inventory = load_inventory(args.hosts_file)
    jobs = load_jobs(args.job, args.sets)
    errors = [e for job in jobs for e in check_job(job, inventory.names)]
    if errors:
        raise UserErrors(errors)
    if args.host:
        inventory.get(args.host)
    results = []
    throughput = default_calibration()  # measured runs and probes, where there are any
    for job in jobs:
        hosts = [args.host] if args.host else inventory.names if args.all_hosts else None
        results.append((job, plan_hosts(job, hosts, inventory=inventory, throughput=throughput)))
    if args.json:
        print(json.dumps([{"job": job.name, "file": job.file, "plans": [plan_json(p) for p in plans]}
                          for job, plans in results], indent=2))
    else:
        out = console()
        for job, plans in results:
            render_plans(out, job, plans, breakdown=args.breakdown or bool(args.host))
    every_job_placed = all(any(p.passes for p in plans) for _, plans in results)
    return EXIT_OK if every_job_placed else EXIT_REFUSED


def plan_json(plan: Plan) -> dict:
    """A plan as JSON-ready data, with the memory totals spelled out."""
    from dataclasses import fields, is_dataclass

    from pydantic import BaseModel

    def convert(value: Any) -> Any:
        if isinstance(value, BaseModel):
            return value.model_dump()
        if is_dataclass(value) and not isinstance(value, type):
            return {f.name: convert(getattr(value, f.name)) for f in fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    data = convert(plan)
    if plan.memory is not None:
        m = plan.memory
        data["memory"].update(allocated_bytes=m.allocated_bytes, peak_bytes=m.peak_bytes,
                              margin_bytes=m.margin_bytes, fits=m.fits, at_limit=m.at_limit)
    return data


def render_plans(out: Console, job: Any, plans: list[Plan], *, breakdown: bool) -> None:
    from rich.table import Table

    from runner.plan.pick import cheapest_and_fastest
    from runner.units import format_bytes, format_count, format_duration

    first = next((p for p in plans if p.profile), plans[0])
    title = f"{job.name}  ({job.file})"
    out.print(f"[bold]{title}[/bold]")
    if first.params:
        budget = (f"{format_count(first.budget_tokens)} tokens" if first.budget_tokens else
                  f"{job.spec.budget.epochs:g} epochs" if job.spec.budget.epochs else
                  f"{job.spec.budget.max_steps:,} steps")
        out.print(f"  model {format_count(first.params)} params · budget {budget}")
    if first.overrides:
        out.print("  overrides: " + ", ".join(first.overrides))
    cheapest, fastest = cheapest_and_fastest(plans)

    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    for name, justify in (("host", "left"), ("profile", "left"), ("ok", "left"), ("peak / capacity", "right"),
                          ("batch x accum", "right"), ("precision", "left"), ("steps", "right"),
                          ("tokens/s", "right"), ("time", "right"), ("cost", "right"), ("", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for p in plans:
        marks = [m for m, chosen in (("cheapest", cheapest), ("fastest", fastest)) if chosen is p]
        if p.memory is None:
            table.add_row(p.host, "?", "no", "-", "-", "-", "-", "-", "-", "-", "")
            continue
        ok = p.said_ok()
        batches = " / ".join(dict.fromkeys(f"{s.micro_batch}x{s.grad_accum}" for s in p.stages))
        table.add_row(
            p.host, p.profile, ok,
            f"{format_bytes(p.memory.peak_bytes)} / {format_bytes(p.memory.capacity_bytes)}",
            batches, p.precision, f"{p.steps:,}", format_count(p.tokens_per_s), format_duration(p.seconds),
            f"${p.cost_usd:,.2f}", " ".join(marks))
    out.print(table)
    sources: dict[str, list[str]] = {}  # where each host's tokens/s came from: measured, or the catalog
    for p in plans:
        if p.memory is not None:
            sources.setdefault(p.throughput_source, []).append(p.host)
    for source, hosts in sources.items():
        out.print(f"  tokens/s on {', '.join(hosts)}: {source}", markup=False, highlight=False)

    shown: set[str] = set()
    for p in plans:
        if p.parallelism_reason:
            unit = "processes" if p.device == "cpu" else "GPUs"
            where = f"{p.gpus} {unit}" + (f" on each of {p.nodes} hosts" if p.nodes > 1 else "")
            out.print(f"  {p.host}: {where}, the batch is per process; {p.parallelism_reason}")
        for reason in p.reasons:
            out.print(f"  [red]x[/red] {p.host}: {reason}")
        for fix in p.fixes:
            hint = fix.command_hint()
            out.print(f"    fix: {fix.summary}" + (f"  [dim]({hint})[/dim]" if hint else ""))
        for warning in p.warnings:
            if warning not in shown:
                shown.add(warning)
                out.print(f"  [yellow]![/yellow] {warning}")
    if breakdown:
        for p in plans:
            if p.memory is not None:
                render_breakdown(out, p)
        render_budget(out, next((p for p in plans if p.memory is not None), plans[0]))
    out.print()


def render_budget(out: Console, plan: Plan) -> None:
    """Steps per stage, the share of the budget used, and what each source and phase gets."""
    from rich.table import Table

    from runner.units import format_count

    if plan.memory is None:
        return
    used = f" ({plan.budget_used_share:.1%} of the budget)" if plan.budget_used_share is not None else ""
    out.print(f"  budget: {plan.steps:,} steps, {plan.tokens:,} tokens{used}")
    if len(plan.stages) > 1:
        stages = Table(show_edge=False, box=None, header_style="bold", pad_edge=False)
        for name in ("stage", "seq", "batch x accum", "tokens/step", "steps", "tokens"):
            stages.add_column(name, justify="right")
        for i, s in enumerate(plan.stages):
            steps = s.steps if s.steps is not None else plan.steps
            stages.add_row(str(i), str(s.seq_len), f"{s.micro_batch}x{s.grad_accum}", f"{s.tokens_per_step():,}",
                           f"{steps:,}", format_count(steps * s.tokens_per_step()))
        out.print(stages)
    parts = [("", plan.coverage)] if not plan.phases else [(f"{ph.name} ({ph.share:.0%}) ", ph.coverage)
                                                           for ph in plan.phases]
    data = Table(show_edge=False, box=None, header_style="bold", pad_edge=False)
    for name, justify in (("source", "left"), ("mix", "right"), ("tokens", "right"), ("size", "right"),
                          ("epochs", "right"), ("size from", "left")):
        data.add_column(name, justify=justify)  # type: ignore[arg-type]
    for phase, coverage in parts:
        for c in coverage:
            data.add_row(phase + c.label, f"{c.weight:.0%}" if c.weight is not None else "?",
                         format_count(c.tokens) if c.tokens is not None else "?",
                         format_count(c.size.tokens) if c.size.tokens is not None else "?",
                         f"{c.epochs:.2f}" if c.epochs is not None else "?", c.size.how)
    out.print(data)


def render_breakdown(out: Console, plan: Plan) -> None:
    from rich.table import Table

    from runner.units import format_bytes, format_count

    m = plan.memory
    assert m is not None
    shape = (f"micro-batch {plan.micro_batch} x seq {plan.stages[0].seq_len}" if len(plan.stages) == 1
             else "the curriculum stage that needs the most")
    table = Table(title=f"memory on {plan.host} ({plan.profile}, {plan.precision}, {shape})",
                  title_justify="left", show_edge=False, box=None, header_style="bold")
    table.add_column("term")
    table.add_column("bytes", justify="right")
    table.add_column("how")
    for term, nbytes, note in m.rows():
        if nbytes:
            table.add_row(term, format_bytes(nbytes), note)
    slack = f" (with {format_bytes(m.cap_slack_bytes)} of part-used allocator pages)" if m.cap_slack_bytes else ""
    needs = f"; a full card needs {format_bytes(m.required_bytes)}{slack}" if m.required_bytes != m.peak_bytes else ""
    table.add_row("[bold]peak[/bold]", f"[bold]{format_bytes(m.peak_bytes)}[/bold]",
                  f"{format_bytes(m.allocated_bytes)} in tensors{needs}")
    share = "unified memory" if m.device == "mps" else "memory"
    table.add_row("capacity", format_bytes(m.capacity_bytes),
                  f"{m.usable_share:.0%} of {format_bytes(m.memory_bytes)} {share}")
    table.add_row("[bold]verdict[/bold]", format_bytes(abs(m.margin_bytes)), m.verdict())
    out.print(table)
    out.print(f"  throughput: {plan.throughput_source}; hardware: {plan.hardware_source}; "
              f"{plan.model_flops:.3g} training FLOPs")


# --- hosts --------------------------------------------------------------------------------

@command("hosts list", "list the hosts in the inventory and their hardware")
def hosts_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from runner.hosts import NotProbed, hardware, load_inventory
    from runner.units import format_bytes

    inventory = load_inventory(args.hosts_file)
    out = console()
    out.print(f"inventory: {inventory.file or 'none (only local)'}")
    table = Table(show_edge=False, box=None, header_style="bold")
    for name in ("host", "kind", "address", "profile", "gpus", "memory", "$/hour", "how we know"):
        table.add_column(name)
    for host in inventory.hosts.values():
        address = "-" if host.kind == "local" else f"{host.ssh_target}:{host.port}"
        try:
            hw = hardware(host)
        except NotProbed:
            table.add_row(host.name, host.kind, address, "auto", "?", "?", "?", "not probed")
            continue
        table.add_row(host.name, host.kind, address, hw.profile.id, str(hw.gpus), format_bytes(hw.memory_bytes),
                      f"{hw.price_usd_per_hour:g}", hw.source)
    out.print(table)
    return EXIT_OK


@command("hosts catalog", "list the hardware profiles the planner knows")
def hosts_catalog(args: argparse.Namespace) -> int:
    from rich.table import Table

    from runner.catalog import load_catalog
    from runner.units import format_bytes

    table = Table(show_edge=False, box=None, header_style="bold")
    for name in ("profile", "name", "memory", "usable", "TFLOPS (best 16-bit)", "GB/s", "precisions", "image", "$/hour"):
        table.add_column(name)
    for p in load_catalog().profiles.values():
        half = max((p.tflops.get(k, 0) for k in ("bf16", "fp16")), default=0) or p.tflops["fp32"]
        table.add_row(p.id, p.name, format_bytes(p.memory_bytes), f"{p.usable_share:.0%}", f"{half:g}",
                      f"{p.bandwidth_gbps:g}", ", ".join(p.precisions), p.image, f"{p.price_usd_per_hour:g}")
    console().print(table)
    return EXIT_OK


# --- runs: run, runs, status, logs, cancel, resume -----------------------------------------

STORE_ARGS = (
    arg("--store", metavar="PATH", help="the run store database (default: $RUNNER_HOME/runs.db, "
        "else $XDG_DATA_HOME/runner/runs.db)"),
)
WAIT_ARGS = (
    arg("--wait", dest="detach", action="store_false", default=False,
        help="follow the log until the run ends and enforce its caps (the default)"),
    arg("--detach", dest="detach", action="store_true", help="start it and return at once"),
    arg("--json", action="store_true", help="print a machine-readable summary on stdout (the log goes to stderr); "
        "exit 0 only when every run succeeded"),
    arg("--grace", type=float, default=120.0, metavar="SECONDS",
        help="how long a stopped trainer may take to checkpoint before it is killed (default 120)"),
)


def open_store(args: argparse.Namespace):
    """The run store, with remote runs reached through the hosts of --hosts-file."""
    from runner import dispatch
    from runner.store import Store

    dispatch.use_hosts_file(args.hosts_file)
    return Store.open(args.store)


def log_stream(args: argparse.Namespace) -> Any:
    """Where a followed log goes: stdout, or stderr when stdout carries --json."""
    stream = sys.stderr if args.json else sys.stdout
    return getattr(stream, "buffer", stream)


def follow_run(args: argparse.Namespace, store: Any, run: Any, offset: int = 0) -> Any:
    """Wait for a run unless --detach; Ctrl-C leaves it running and says how to get back to it."""
    from runner import dispatch

    if args.detach:
        return run
    try:
        return dispatch.wait(store, run.id, out=log_stream(args), grace_s=args.grace, offset=offset)
    except KeyboardInterrupt:
        print(f"\nrun {run.id} keeps running: `runner logs -f {run.id}` follows it, "
              f"`runner cancel {run.id}` stops it", file=sys.stderr)
        raise


def report_runs(args: argparse.Namespace, store: Any, runs: list) -> int:
    """Print the runs (JSON with --json); exit 0 when detached or when every run succeeded."""
    from runner import dispatch
    from runner.errors import EXIT_FAILED

    if args.json:
        print(json.dumps([dispatch.run_json(store, run) for run in runs], indent=2))
    else:
        for run in runs:
            ok = run.state in ("succeeded", "running", "starting")
            print(f"run {run.id}: {run.state} ({run.reason})", file=sys.stdout if ok else sys.stderr)
    if args.detach or all(run.state == "succeeded" for run in runs):
        return EXIT_OK
    return EXIT_FAILED


@command("run", "plan a job, then run it in a container (or natively), here or on SSH hosts, and record the run",
         arg("job", metavar="JOB", nargs="+", help="job files (several with --hosts)"),
         arg("--experiment", metavar="NAME", help="run only this experiment of the job file"),
         arg("--host", default="local", help="where to run (default: local)"),
         arg("--hosts", metavar="A,B", help="spread the runs over these hosts, one per free GPU, all at once "
             "(several JOB files go to free hosts the same way)"),
         arg("--backend", choices=["docker", "native"], help="force a backend (default: from the host's profile)"),
         arg("--force", action="store_true", help="run even when the planner refuses the job"),
         *SET_ARGS, *WAIT_ARGS, *STORE_ARGS)
def run_job(args: argparse.Namespace) -> int:
    from runner import dispatch
    from runner.calibration import Calibration, default_calibration
    from runner.hosts import load_inventory

    inventory = load_inventory(args.hosts_file)
    if args.hosts or len(args.job) > 1:
        return run_spread(args, inventory)
    throughput = None  # planned with the measurements of the store the run goes into: by default, the default's
    if args.store:
        throughput = default_calibration(Path(args.store)) or Calibration(())
    prepared = dispatch.prepare(args.job[0], experiment=args.experiment, host=args.host, sets=args.sets,
                                force=args.force, backend=args.backend, inventory=inventory, throughput=throughput)
    store = open_store(args)  # only once the job is accepted: a refusal leaves no store behind
    runs = []
    try:
        for prep in prepared:  # one after another when waiting, so runs do not share the device
            runs.append(follow_run(args, store, dispatch.launch(store, prep)))
    except KeyboardInterrupt:
        return 130
    return report_runs(args, store, runs)


@command("runs", "list recorded runs (their states are checked against the containers and processes first)",
         arg("--json", action="store_true", help="print the runs as JSON"),
         arg("--limit", type=int, default=30, metavar="N", help="show the newest N runs (default 30)"),
         *STORE_ARGS)
def list_runs(args: argparse.Namespace) -> int:
    from rich.table import Table

    from runner import dispatch
    from runner.units import format_bytes, format_count, format_duration

    store = open_store(args)
    runs = dispatch.reconcile(store)[: args.limit]
    if args.json:
        print(json.dumps([run.as_dict() for run in runs], indent=2))
        return EXIT_OK
    table = Table(show_edge=False, box=None, header_style="bold")
    for name in ("run", "experiment", "host", "backend", "state", "steps", "tokens/s (plan)", "wall", "cost",
                 "peak", "eval loss", "reason"):
        table.add_column(name)
    for run in runs:
        measured = format_count(run.tokens_per_s) if run.tokens_per_s else "-"
        planned = format_count(run.predicted_tokens_per_s) if run.predicted_tokens_per_s else "-"
        table.add_row(run.id, run.experiment, run.host, run.backend, run.state, str(run.steps or "-"),
                      f"{measured} ({planned})", format_duration(run.elapsed_s()), f"${run.cost_usd:.2f}",
                      format_bytes(run.peak_bytes) if run.peak_bytes else "-",
                      f"{run.final_eval_loss:.4f}" if run.final_eval_loss is not None else "-", run.reason)
    console().print(table)
    return EXIT_OK


@command("status", "show one run: its record, state history and summary",
         arg("run_id", metavar="RUN", help="a run id or a unique prefix of one"),
         arg("--json", action="store_true", help="print it as JSON"), *STORE_ARGS)
def run_status(args: argparse.Namespace) -> int:
    from datetime import datetime

    from runner import dispatch

    store = open_store(args)
    run = dispatch.reconcile_run(store, store.get(args.run_id))
    data = dispatch.run_json(store, run)
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    out = console()
    out.print(f"[bold]run {run.id}[/bold]  {run.experiment} ({run.job_file})")
    for key in ("state", "reason", "host", "profile", "backend", "image", "handle", "attempt", "run_dir",
                "predicted_tokens_per_s", "tokens_per_s", "steps", "tokens", "wall_s", "cost_usd", "peak_bytes",
                "mfu", "final_eval_loss", "best_eval_loss", "exit_reason", "exit_code"):
        if data.get(key) is not None:
            out.print(f"  {key:24} {data[key]}")
    out.print("  history:")
    for t in data["transitions"]:
        when = datetime.fromtimestamp(t["at"]).strftime("%Y-%m-%d %H:%M:%S")
        out.print(f"    {when}  #{t['attempt']} {t['from_state'] or '-':>9} -> {t['to_state']:<9} {t['reason']}")
    return EXIT_OK


@command("logs", "print a run's training log",
         arg("run_id", metavar="RUN", help="a run id or a unique prefix of one"),
         arg("-f", "--follow", action="store_true", help="keep printing until the run ends"), *STORE_ARGS)
def run_logs(args: argparse.Namespace) -> int:
    from runner import dispatch

    store = open_store(args)
    dispatch.follow_logs(store, args.run_id, sys.stdout.buffer, follow=args.follow)
    return EXIT_OK


@command("cancel", "stop a run gracefully: the trainer checkpoints, then exits",
         arg("run_id", metavar="RUN", help="a run id or a unique prefix of one"),
         arg("--grace", type=float, default=120.0, metavar="SECONDS",
             help="how long the trainer may take to checkpoint before it is killed (default 120)"), *STORE_ARGS)
def run_cancel(args: argparse.Namespace) -> int:
    from runner import dispatch

    store = open_store(args)
    run = dispatch.cancel(store, args.run_id, grace_s=args.grace)
    print(f"run {run.id}: {run.state} ({run.reason})")
    return EXIT_OK


@command("resume", "start a stopped or failed run again from its last checkpoint, in the same run directory",
         arg("run_id", metavar="RUN", help="a run id or a unique prefix of one"),
         arg("--host", metavar="NAME", help="continue a remote run on another SSH host, where it fits as resolved"),
         arg("--force", action="store_true", help="move it even when it does not fit the host as resolved"),
         *WAIT_ARGS, *STORE_ARGS)
def run_resume(args: argparse.Namespace) -> int:
    from runner import dispatch

    store = open_store(args)
    offset = dispatch.log_size(store.get(args.run_id))
    try:
        run = follow_run(args, store, dispatch.resume(store, args.run_id, host=args.host, force=args.force), offset)
    except KeyboardInterrupt:
        return 130
    return report_runs(args, store, [run])


# --- the terminal UI ------------------------------------------------------------------------

@command("tui", "open the terminal UI: hosts, experiments, plans, runs and comparisons",
         arg("jobs_dir", nargs="?", default="jobs", metavar="JOBS_DIR", help="where the job files are (default: ./jobs)"),
         arg("--store", metavar="PATH", help="the run store database (default: $RUNNER_HOME/runs.db)"),
         *SET_ARGS)
def tui(args: argparse.Namespace) -> int:
    from tui.app import RunnerApp, Settings

    RunnerApp(Settings(jobs_dir=Path(args.jobs_dir), hosts_file=Path(args.hosts_file) if args.hosts_file else None,
                       store_path=Path(args.store) if args.store else None, sets=tuple(args.sets))).run()
    return EXIT_OK


# --- compare and probe --------------------------------------------------------------------

@command("compare", "compare runs across hosts: tokens/s, MFU, time, cost, loss, and how far off the plan was",
         arg("runs", nargs="*", metavar="RUN", help="run ids or unique prefixes (default: every finished run)"),
         arg("--job", metavar="NAME", help="every finished run of this experiment"),
         arg("--by", choices=["run", "profile"], default="run", help="one row per run (default) or per profile"),
         arg("--format", choices=["table", "csv", "json", "md"], default="table"),
         arg("--plot", metavar="FILE", help="write loss against tokens, time and dollars as a PNG"),
         *STORE_ARGS)
def compare(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from runner import compare as cmp
    from runner.store import Store

    if args.runs and args.job:
        raise UserError("give run ids or --job, not both", field="compare")
    store = Store.open(args.store)
    try:
        found = cmp.records(store, args.runs, job=args.job)
    finally:
        store.close()
    rows, verdicts = cmp.rows(found, by=args.by), cmp.verdicts(found)
    if args.format == "table":
        out = console()
        if not rows:
            out.print(f"no finished runs in {args.store or 'the run store'} yet: `runner run JOB` makes one")
            return EXIT_OK
        out.print(cmp.table(rows, narrow=True))
        for line in cmp.flag_lines(rows):
            out.print(f"[red]![/red] {escape(line)}")
        for verdict in verdicts:
            out.print(verdict.line(), highlight=False, markup=False)
    else:
        sys.stdout.write(cmp.render(rows, verdicts, args.format))
    if args.plot or (args.format == "table" and sys.stdout.isatty()):
        from runner import plots

        drawn = plots.curves(found)
        if args.plot and drawn:
            title = ", ".join(dict.fromkeys(r.job for r in found))
            print(f"plot: {plots.write_png(drawn, args.plot, title=title)}", file=sys.stderr)
        elif args.plot:
            print("plot: no metrics to draw", file=sys.stderr)
        if args.format == "table" and sys.stdout.isatty() and drawn:
            print(plots.draw_terminal(drawn))
    return EXIT_OK


@command("probe", "measure a host: short fixed-step runs per shape, then what it can train in a day",
         arg("host", metavar="HOST"),
         arg("--depths", default="12,14,16,18,20", metavar="N,N", help="nanochat depths to probe (dN presets)"),
         arg("--models", metavar="NAME,NAME", help="model presets to probe instead of depths, e.g. tiny,d12"),
         arg("--seq", default="512,1024,2048", metavar="N,N", help="sequence lengths to probe"),
         arg("--steps", type=int, default=30, metavar="N",
             help="training steps per shape (default 30): half at the micro-batch, a quarter at half of it, "
                  "a quarter at a quarter of it"),
         arg("--hours", default="24", metavar="HOURS", help="the time the capacity table is for (24, 90m, 2d)"),
         arg("--batch-size", default="auto", metavar="N", help="micro-batch per probe (default: the largest that fits)"),
         arg("--backend", choices=["docker", "native"], help="force a backend (default: from the host's profile)"),
         arg("--job", type=Path, metavar="FILE",
             help="probe this job as written (LoRA, checkpointing, precision...) instead of preset shapes"),
         arg("--experiment", help="which experiment of a multi-experiment --job file"),
         arg("--set", dest="sets", action="append", default=[], metavar="FIELD=VALUE",
             help="override a --job field, e.g. --set train.gradient_checkpointing=true"),
         *STORE_ARGS)
def probe(args: argparse.Namespace) -> int:
    from runner import capacity
    from runner.hosts import load_inventory
    from runner.store import Store
    from runner.units import parse_hours

    if args.job is not None:
        if args.models or args.batch_size != "auto":
            raise UserError("--job probes the job as written: its model and micro-batch, not --models or --batch-size",
                            field="probe", hint="drop --models/--batch-size, or --set the job's fields")
        return probe_job(args)

    def numbers(text: str, what: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or min(values) < 1:
            raise UserError(f"{what} must be positive whole numbers separated by commas, got {text!r}", field=what)
        return values

    try:
        hours = parse_hours(args.hours)
    except ValueError as exc:
        raise UserError(str(exc), field="hours") from None
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else \
        [f"d{n}" for n in numbers(args.depths, "depths")]
    batch = args.batch_size if args.batch_size == "auto" else numbers(args.batch_size, "batch-size")[0]
    inventory = load_inventory(args.hosts_file)
    store = Store.open(args.store)
    try:
        found = capacity.probe(store, args.host, models, numbers(args.seq, "seq"), steps=args.steps,
                               batch_size=batch, backend=args.backend, inventory=inventory,
                               say=lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        store.close()
    cap = capacity.capacity(found, hours)
    out = console()
    out.print(capacity.capacity_table(cap))
    out.print(cap.recommendation(), markup=False, highlight=False)
    return EXIT_OK if cap.primary is not None else EXIT_REFUSED


def probe_job(args: argparse.Namespace) -> int:
    """`runner probe HOST --job FILE`: the job's own configuration at three micro-batches, then its plan there."""
    from runner import capacity
    from runner.calibration import Calibration
    from runner.hosts import load_inventory
    from runner.plan import plan_job
    from runner.spec import load_jobs, pick_experiment
    from runner.store import Store
    from runner.units import format_count, format_duration

    job = pick_experiment(load_jobs(args.job, args.sets), args.experiment, args.job)
    inventory = load_inventory(args.hosts_file)
    store = Store.open(args.store)
    try:
        found = capacity.probe_experiment(store, args.host, args.job, experiment=job.name, sets=args.sets,
                                          steps=args.steps, backend=args.backend, inventory=inventory,
                                          say=lambda line: print(line, file=sys.stderr, flush=True))
        calibration = Calibration.from_store(store)
    finally:
        store.close()
    if not found[0].stable:
        print(f"error: the probe of {found[0].model} on {args.host} did not run cleanly: {found[0].detail}",
              file=sys.stderr)
        return EXIT_REFUSED
    plan = plan_job(job, args.host, inventory=inventory, throughput=calibration)
    print(f"{job.name} on {args.host}: {plan.steps:,} steps of {plan.micro_batch}x{plan.grad_accum}, "
          f"{format_count(plan.tokens_per_s)} tokens/s, {format_duration(plan.seconds)}, ${plan.cost_usd:,.2f}; "
          f"{plan.throughput_source}")
    return EXIT_OK


# --- remote hosts -------------------------------------------------------------------------

def run_spread(args: argparse.Namespace, inventory: Any) -> int:
    """`runner run JOB... --hosts a,b`: place every run first, then start them all and follow them together."""
    from runner import dispatch

    hosts = [h.strip() for h in (args.hosts or args.host).split(",") if h.strip()]
    store = open_store(args)
    prepared = dispatch.spread(store, args.job, hosts, experiment=args.experiment, sets=args.sets,
                               force=args.force, backend=args.backend, inventory=inventory)
    runs = [dispatch.launch(store, prep) for prep in prepared]
    if not args.detach:
        try:
            runs = dispatch.wait_many(store, [run.id for run in runs], out=log_stream(args), grace_s=args.grace)
        except KeyboardInterrupt:
            print(f"\nthe runs keep running: `runner logs -f RUN` follows one, `runner runs` lists them",
                  file=sys.stderr)
            return 130
    return report_runs(args, store, runs)


@command("hosts trust", "show a host's SSH key (type and SHA256 fingerprint) and record it once you confirm",
         arg("name", metavar="NAME"),
         arg("--yes", action="store_true", help="record it without asking (for scripts that checked it otherwise)"))
def hosts_trust(args: argparse.Namespace) -> int:
    from runner import ssh
    from runner.hosts import load_inventory

    host = load_inventory(args.hosts_file).get(args.name)
    if host.kind != "ssh":
        raise UserError(f"{host.name} is this machine; there is no host key to trust", field="host")

    answers: list[bool] = []

    def confirm(key: Any) -> bool:
        was = f" (known_hosts has {', '.join(key.known_fingerprints)})" if key.status == "changed" else ""
        print(f"{key.host} ({key.known_hosts_name}) presents {key.key_type} {key.fingerprint}: {key.status}{was}")
        answer = "y"
        if not args.yes:
            try:
                answer = input("trust this key? [y/N] ")
            except EOFError:
                answer = ""
        answers.append(answer.strip().lower() in ("y", "yes"))
        return answers[-1]

    key = ssh.trust_host(ssh.endpoint_for(host), confirm)
    if key.status == "known":
        print(f"{key.host} ({key.known_hosts_name}): {key.key_type} {key.fingerprint} is already trusted")
        return EXIT_OK
    if not answers[-1]:
        print("not recorded", file=sys.stderr)
        return EXIT_REFUSED
    print(f"recorded in {ssh.runner_known_hosts_path()}")
    return EXIT_OK


@command("hosts probe", "probe a host over SSH: OS, GPUs, Docker and the NVIDIA runtime, disk, Python (cached)",
         arg("name", metavar="NAME"), arg("--json", action="store_true", help="print the probe as JSON"))
def hosts_probe(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from runner.hosts import load_inventory
    from runner.probe import blockers, image_family, probe_host
    from runner.units import format_bytes

    host = load_inventory(args.hosts_file).get(args.name)
    found = probe_host(host)
    family = image_family(host, found.profile)
    problems = blockers(found, family)
    if args.json:
        print(json.dumps(asdict(found) | {"image": family.name if family else None, "blockers": problems}, indent=2))
        return EXIT_OK
    print(f"{found.host}: {found.os_name}, {found.kernel} ({found.arch}), {found.cpus} CPUs, "
          f"{format_bytes(found.memory_bytes)} RAM; probed {found.probed_at}")
    for i, gpu in enumerate(found.gpus):
        print(f"  gpu {i}: {gpu.name}, {format_bytes(gpu.memory_total_bytes)} "
              f"({format_bytes(gpu.memory_used_bytes)} in use), driver {gpu.driver_version}")
    if not found.gpus:
        print("  gpus: none")
    print(f"  cuda: {found.cuda_version or '-'}")
    print(f"  docker: {found.docker_version or 'no engine answers'}; "
          f"nvidia runtime: {'yes' if found.nvidia_runtime else 'no'}")
    print(f"  disk free: {format_bytes(found.disk_free_bytes)}; python: {found.python_version or '-'}")
    print(f"  plans as profile {found.profile}")
    if family is not None:
        print(f"  image {family.name} ({family.base_image}): " + ("cannot run here yet" if problems else "runs here"))
        for problem in problems:
            print(f"    - {problem}")
    return EXIT_OK


@command("sync", "bring a remote run's directory home now: new log lines, checkpoints, metrics",
         arg("run_id", metavar="RUN", help="a run id or a unique prefix of one"), *STORE_ARGS)
def run_sync(args: argparse.Namespace) -> int:
    from runner import dispatch

    store = open_store(args)
    report = dispatch.sync_run(store, args.run_id)
    print(f"{len(report.moved)} files moved ({report.bytes_moved} bytes), {report.skipped} up to date, "
          f"{len(report.complete_checkpoints)} checkpoints complete, {len(report.pending)} pending, "
          f"in {report.wall_s:.1f}s")
    for refusal in report.refused:
        print(f"refused: {refusal.path}: {refusal.reason}", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
