"""Plan: the selected job on every host side by side, the memory breakdown of one, dispatch and probe."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from runner.errors import UserError, UserErrors
from runner.plan import Plan
from runner.plan.pick import cheapest_and_fastest
from runner.spec import Job
from tui.widgets.nav import NavBar

COLUMNS = ("host", "fits", "peak / capacity", "batch", "steps", "time", "cost", "")


class PlanScreen(Screen):
    """Plans for the job chosen on the Experiments screen, on every host in the inventory."""

    BINDINGS = [
        Binding("d", "dispatch", "Dispatch"),
        Binding("p", "probe", "Probe"),
        Binding("x", "next_experiment", "Next experiment"),
        Binding("r", "replan", "Replan"),
    ]

    class Planned(Message):
        def __init__(self, job: Job | None, plans: list[Plan], experiments: list[str], error: str | None):
            super().__init__()
            self.job, self.plans, self.experiments, self.error = job, plans, experiments, error

    class Dispatched(Message):
        def __init__(self, run_id: str | None, error: str | None):
            super().__init__()
            self.run_id, self.error = run_id, error

    class Probed(Message):
        def __init__(self, host: str, error: str | None):
            super().__init__()
            self.host, self.error = host, error

    class Said(Message):
        """A progress line from the core while it launches a run (building an image, starting)."""

        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self) -> None:
        super().__init__()
        self.job: Job | None = None
        self.plans: dict[str, Plan] = {}
        self.experiments: list[str] = []

    def compose(self) -> ComposeResult:
        yield NavBar("plan")
        yield Static("no job chosen yet: pick one on Experiments (2)", id="plan-title")
        yield DataTable(id="plans", cursor_type="row")
        with VerticalScroll(id="plan-detail-scroll"):
            yield Static(id="plan-detail")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for name in COLUMNS:
            table.add_column(name, key=name or "mark")
        self.watch(self.app, "job", self._job_changed)

    def _job_changed(self) -> None:
        if self.app.job is not None:
            self.query_one("#plan-title", Static).update(f"planning {escape(str(self.app.job.path))}…")
            self.plan()

    @work(thread=True, exclusive=True, group="plan")
    def plan(self) -> None:
        """Plan the chosen job on every host, calibrated by the runs and probes in the app's store."""
        from runner.calibration import default_calibration
        from runner.plan import plan_hosts
        from runner.spec import check_job, load_jobs

        choice = self.app.job
        if choice is None:
            return
        try:
            inventory = self.app.load_inventory()
            jobs = load_jobs(choice.path, list(self.app.settings.sets))
            job = next((j for j in jobs if j.name == choice.experiment), jobs[0])
            errors = check_job(job, inventory.names)
            if errors:
                raise UserErrors(errors)
            calibration = default_calibration(self.app.settings.store_path)  # planning makes no store
            plans = plan_hosts(job, inventory.names, inventory=inventory, throughput=calibration)
        except (UserError, UserErrors) as exc:
            errors = exc.errors if isinstance(exc, UserErrors) else [exc]
            self.post_message(self.Planned(None, [], [], "\n".join(e.render() for e in errors)))
            return
        self.post_message(self.Planned(job, plans, [j.name for j in jobs], None))

    def on_plan_screen_planned(self, message: Planned) -> None:
        table = self.query_one(DataTable)
        table.clear()
        title = self.query_one("#plan-title", Static)
        if message.error or message.job is None:
            title.update(f"[red]{escape(message.error or '')}[/red]")
            self.query_one("#plan-detail", Static).update("")
            return
        self.job, self.experiments = message.job, message.experiments
        self.plans = {p.host: p for p in message.plans}
        title.update(_title(message.job, message.plans, message.experiments))
        cheapest, fastest = cheapest_and_fastest(message.plans)
        for p in message.plans:
            marks = " ".join(m for m, chosen in (("cheapest", cheapest), ("fastest", fastest)) if chosen is p)
            style = "bold green" if marks else ("" if p.passes else "dim")
            table.add_row(*(Text(cell, style=style) for cell in _cells(p, marks)), key=p.host)
        best = cheapest or fastest
        if best is not None:
            table.move_cursor(row=table.get_row_index(best.host))
        self._show_detail()

    @on(DataTable.RowHighlighted)
    def _highlighted(self) -> None:
        self._show_detail()

    def _current(self) -> Plan | None:
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return self.plans.get(key or "")

    def _show_detail(self) -> None:
        plan = self._current()
        self.query_one("#plan-detail", Static).update(_detail(plan) if plan else "")

    # --- actions -----------------------------------------------------------------------------

    def action_replan(self) -> None:
        self._job_changed()

    def action_next_experiment(self) -> None:
        from tui.app import JobChoice

        if self.app.job is None or len(self.experiments) < 2 or self.job is None:
            return
        following = self.experiments[(self.experiments.index(self.job.name) + 1) % len(self.experiments)]
        self.app.job = JobChoice(self.app.job.path, following)

    def action_dispatch(self) -> None:
        from tui.screens.dispatch import DispatchScreen

        plan = self._current()
        if plan is None or self.job is None:
            return
        if not plan.passes:
            self.notify("; ".join(plan.reasons), title=f"{plan.host} refuses this job", severity="error")
            return
        job = self.job

        def confirmed(go: bool | None) -> None:
            if go:
                self.notify(f"dispatching {job.name} to {plan.host}…")
                self.dispatch(job, plan)

        self.app.push_screen(DispatchScreen(job, plan), confirmed)

    @work(thread=True, group="dispatch")
    def dispatch(self, job: Job, plan: Plan) -> None:
        from runner import dispatch
        from runner.calibration import Calibration

        store = self.app.open_store()
        try:
            inventory = self.app.load_inventory()
            prepared = dispatch.prepare(job.file, experiment=job.name, host=plan.host,
                                        sets=list(self.app.settings.sets), inventory=inventory,
                                        throughput=Calibration.from_store(store))
            run = dispatch.launch(store, prepared[0], say=lambda text: self.post_message(self.Said(text)))
        except (UserError, UserErrors) as exc:
            errors = exc.errors if isinstance(exc, UserErrors) else [exc]
            self.post_message(self.Dispatched(None, "\n".join(e.render() for e in errors)))
            return
        finally:
            store.close()
        self.post_message(self.Dispatched(run.id, None))

    def action_probe(self) -> None:
        plan = self._current()
        if plan is None or self.job is None:
            return
        if plan.profile is None:
            self.notify("; ".join(plan.reasons), title=f"{plan.host} cannot be probed yet", severity="error")
            return
        self.notify(f"probing {self.job.name} on {plan.host}: its micro-batch, then half and a quarter of it…")
        self.probe(self.job, plan.host)

    @work(thread=True, group="probe")
    def probe(self, job: Job, host: str) -> None:
        """`runner probe HOST --job FILE` for the job on screen: what settles a plan at the limit, and calibrates it."""
        from runner import capacity

        store = self.app.open_store()
        try:
            found = capacity.probe_experiment(store, host, Path(job.file), experiment=job.name,
                                              sets=list(self.app.settings.sets), inventory=self.app.load_inventory(),
                                              say=lambda text: self.post_message(self.Said(text)))
        except (UserError, UserErrors) as exc:
            errors = exc.errors if isinstance(exc, UserErrors) else [exc]
            self.post_message(self.Probed(host, "\n".join(e.render() for e in errors)))
            return
        finally:
            store.close()
        self.post_message(self.Probed(host, None if found[0].stable else found[0].detail))

    def on_plan_screen_probed(self, message: Probed) -> None:
        if message.error:
            self.notify(message.error, title=f"the probe on {message.host} did not run cleanly", severity="error",
                        timeout=10)
        self.plan()  # what the probe measured decides the plan there from now on, out of memory included

    def on_plan_screen_said(self, message: Said) -> None:
        self.notify(message.text, timeout=8)

    def on_plan_screen_dispatched(self, message: Dispatched) -> None:
        if message.run_id is None:
            self.notify(message.error or "", title="dispatch failed", severity="error", timeout=10)
            return
        self.app.supervise(message.run_id)
        self.app.show_run(message.run_id)


def _title(job: Job, plans: list[Plan], experiments: list[str]) -> str:
    from runner.units import format_count

    first = next((p for p in plans if p.profile), plans[0] if plans else None)
    parts = [f"[b]{escape(job.name)}[/b]"]
    if len(experiments) > 1:
        parts.append(f"({experiments.index(job.name) + 1}/{len(experiments)}, x: next)")
    if first is not None and first.params:
        budget = job.spec.budget
        amount = (f"{format_count(first.budget_tokens)} tokens" if first.budget_tokens else
                  f"{budget.epochs:g} epochs" if budget.epochs else f"{budget.max_steps:,} steps")
        parts.append(f"· {format_count(first.params)} params · budget {amount}")
    return " ".join(parts)


def _cells(p: Plan, marks: str) -> tuple[str, ...]:
    from runner.units import format_bytes, format_duration

    if p.memory is None:
        return (p.host, "no: unknown", "-", "-", "-", "-", "-", marks)
    fits = p.said_ok()
    batches = " / ".join(dict.fromkeys(f"{s.micro_batch}x{s.grad_accum}" for s in p.stages))
    return (p.host, fits, f"{format_bytes(p.memory.peak_bytes)} / {format_bytes(p.memory.capacity_bytes)}",
            batches, f"{p.steps:,}", format_duration(p.seconds), f"${p.cost_usd:,.2f}", marks)


def _detail(plan: Plan) -> Table | str:
    from rich.console import Group

    from runner.units import format_bytes, format_count

    notes: list[Text] = []
    for reason in plan.reasons:
        notes.append(Text.assemble(("✗ ", "red"), reason))
    for fix in plan.fixes:
        hint = fix.command_hint()
        notes.append(Text.assemble("  fix: ", fix.summary, (f"  ({hint})" if hint else "", "dim")))
    for warning in plan.warnings:
        notes.append(Text.assemble(("! ", "yellow"), warning))
    m = plan.memory
    if m is None:
        return Group(*notes) if notes else ""
    seq = max((s.seq_len for s in plan.stages), default=0)
    table = Table(title=f"memory on {plan.host} ({plan.profile}, {plan.precision}, micro-batch {plan.micro_batch}"
                        f" x seq {seq}) · {format_count(plan.tokens_per_s)} tokens/s",
                  title_justify="left", show_edge=False, box=None, header_style="bold", expand=False)
    table.add_column("term")
    table.add_column("bytes", justify="right")
    table.add_column("how")
    for term, nbytes, note in m.rows():
        if nbytes:
            table.add_row(term, format_bytes(nbytes), note)
    table.add_row(Text("peak", style="bold"), Text(format_bytes(m.peak_bytes), style="bold"),
                  f"{format_bytes(m.allocated_bytes)} in tensors")
    share = "unified memory" if m.device == "mps" else "memory"
    table.add_row("capacity", format_bytes(m.capacity_bytes),
                  f"{m.usable_share:.0%} of {format_bytes(m.memory_bytes)} {share}")
    table.add_row(Text("verdict", style="bold"), format_bytes(abs(m.margin_bytes)), m.verdict())
    return Group(*notes, table)
