"""Dispatch: confirm the budget, the cost cap and the estimate before a job starts on a host."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Static

from runner.plan import Plan
from runner.spec import Job


class DispatchScreen(ModalScreen[bool]):
    """A yes/no question: run this job on this host, for this much?"""

    BINDINGS = [
        Binding("y", "answer(True)", "Dispatch"),
        Binding("n,escape", "answer(False)", "Cancel"),
    ]

    def __init__(self, job: Job, plan: Plan):
        super().__init__()
        self.job, self.plan = job, plan

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="dispatch-dialog"):
            yield Static(confirmation(self.job, self.plan))
            with Horizontal(classes="buttons"):
                yield Button("Dispatch (y)", id="yes", variant="primary")
                yield Button("Cancel (n)", id="no")
        yield Footer()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, go: bool) -> None:
        self.dismiss(go)


def confirmation(job: Job, plan: Plan) -> str:
    """The text of the question: what is spent, what caps it, what the planner expects."""
    from runner.units import format_count, format_duration

    budget = job.spec.budget
    amount = (f"{format_count(plan.tokens)} tokens" if budget.tokens is not None else
              f"{budget.epochs:g} epochs" if budget.epochs else f"{budget.max_steps:,} steps")
    cost_cap = f"${budget.max_cost_usd:,.2f}" if budget.max_cost_usd is not None else "none"
    time_cap = format_duration(budget.max_hours * 3600) if budget.max_hours else "none"
    rows = [
        ("budget", f"{amount} in {plan.steps:,} steps"),
        ("cost cap", f"{cost_cap} · time cap {time_cap}"),
        ("estimate", f"{format_duration(plan.seconds)} · ${plan.cost_usd:,.2f} · "
                     f"{format_count(plan.tokens_per_s)} tokens/s"),
        ("price", f"${plan.price_usd_per_hour:g}/hour ({plan.throughput_source})"),
    ]
    lines = [f"[b]Dispatch {escape(job.name)} to {escape(plan.host)}?[/b]",
             f"[dim]{escape(Path(job.file).name if job.file else '')} · {plan.profile} · {plan.precision}[/dim]", ""]
    lines += [f"[b]{name:>9}[/b]  {escape(value)}" for name, value in rows]
    if plan.overrides:
        lines.append(f"[b]{'overrides':>9}[/b]  {escape(', '.join(plan.overrides))}")
    return "\n".join(lines)
