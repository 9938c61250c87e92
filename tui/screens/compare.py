"""Compare: one job's finished runs across hardware, as the comparison table, verdict and loss curves."""

from __future__ import annotations

from rich.markup import escape
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import HorizontalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Static
from textual_plotext import PlotextPlot

from runner.errors import UserError
from tui.widgets.nav import NavBar

AXES = (("tokens", "tokens"), ("wall_s", "wall time (s)"), ("usd", "cost (USD)"))


class CompareScreen(Screen):
    """The runs of one job, side by side: by run or by hardware profile; loss against tokens, time or cost."""

    BINDINGS = [
        Binding("j", "next_job", "Next job"),
        Binding("g", "toggle_group", "By run/profile"),
        Binding("x", "next_axis", "Loss vs tokens/time/$"),
        Binding("r", "reload", "Reload"),
    ]

    class Compared(Message):
        def __init__(self, jobs: list[str], job: str | None, records: list, curves: list, error: str | None):
            super().__init__()
            self.jobs, self.job, self.records, self.curves, self.error = jobs, job, records, curves, error

    def __init__(self) -> None:
        super().__init__()
        self.job: str | None = None
        self.jobs: list[str] = []
        self.records: list = []  # runner.compare.RunRecord
        self.curves: list = []  # runner.plots.Curve
        self.by = "run"
        self.axis = 0

    def compose(self) -> ComposeResult:
        yield NavBar("compare")
        yield Static(id="compare-title")
        with HorizontalScroll(id="compare-table-scroll"):
            yield Static(id="compare-table")
        yield Static(id="compare-verdict")
        yield PlotextPlot(id="compare-plot")
        yield Footer()

    def on_mount(self) -> None:
        self.watch(self.app, "job", self._job_changed, init=False)

    def on_screen_resume(self) -> None:
        self.load()

    def _job_changed(self) -> None:
        self.job = None  # follow the job picked on Experiments
        self.load()

    @work(thread=True, exclusive=True, group="compare")
    def load(self) -> None:
        from runner.compare import records
        from runner.plots import curves

        store = self.app.open_store()
        try:
            finished = [r for r in store.runs() if not r.active]
            jobs = list(dict.fromkeys(r.experiment for r in finished))
            job = self.job if self.job in jobs else self._preferred(jobs)
            found = records(store, job=job) if job else []
            drawn = curves(found)  # reads each run's metrics.jsonl
        except UserError as exc:
            self.post_message(self.Compared([], None, [], [], exc.render()))
            return
        finally:
            store.close()
        self.post_message(self.Compared(jobs, job, found, drawn, None))

    def _preferred(self, jobs: list[str]) -> str | None:
        """The experiment picked on Experiments when it has runs, else the one run most recently."""
        choice = self.app.job
        if choice is not None:
            for name in jobs:
                if name == choice.experiment or (choice.experiment is None and name == choice.path.stem):
                    return name
        return jobs[0] if jobs else None

    def on_compare_screen_compared(self, message: Compared) -> None:
        self.jobs, self.job = message.jobs, message.job
        self.records, self.curves = message.records, message.curves
        title = self.query_one("#compare-title", Static)
        if message.error:
            title.update(f"[red]{escape(message.error)}[/red]")
            return
        if self.job is None:
            title.update("no finished runs yet: dispatch a job from Plan (3), watch it in Runs (4)")
        else:
            position = f" ({self.jobs.index(self.job) + 1}/{len(self.jobs)}, j: next)" if len(self.jobs) > 1 else ""
            title.update(f"[b]{escape(self.job)}[/b]{position} · {len(self.records)} finished run"
                         f"{'s' if len(self.records) != 1 else ''} · by {self.by}")
        self._draw()

    def _draw(self) -> None:
        from runner.compare import rows, table, verdicts

        self.query_one("#compare-table", Static).update(table(rows(self.records, by=self.by)) if self.records else "")
        lines = [v.line() for v in verdicts(self.records)]
        self.query_one("#compare-verdict", Static).update(escape("\n".join(lines)))
        field, label = AXES[self.axis]
        plot = self.query_one(PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        plt.xlabel(label)
        for c in self.curves:
            plt.plot(list(getattr(c, field)), list(c.loss), label=f"{c.label} {c.kind}")
        plot.refresh()

    def action_next_job(self) -> None:
        if self.jobs:
            self.job = self.jobs[(self.jobs.index(self.job) + 1) % len(self.jobs)] if self.job in self.jobs \
                else self.jobs[0]
            self.load()

    def action_toggle_group(self) -> None:
        self.by = "profile" if self.by == "run" else "run"
        self.load()

    def action_next_axis(self) -> None:
        self.axis = (self.axis + 1) % len(AXES)
        self._draw()

    def action_reload(self) -> None:
        self.load()
