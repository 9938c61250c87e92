"""Runs: every stored run, and for the highlighted one its progress, loss curve and log tail."""

from __future__ import annotations

import time
from pathlib import Path

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Log, ProgressBar, Static, TabbedContent, TabPane
from textual.worker import get_current_worker
from textual_plotext import PlotextPlot

from runner.errors import UserError, UserErrors
from runner.store import Run
from tui.widgets.nav import NavBar
from tui.widgets.run_feed import LOG_FILE, LOG_TAIL_BYTES, METRICS_FILE, POLL_S, FileTail, parse_events

STORE_REFRESH_S = 1.0
RECONCILE_S = 5.0
LOG_LINES = 1000
PLOT_EVERY_S = 0.5  # a busy run sends events many times a second; the plot is redrawn at most this often
PLOT_POINTS = 300  # more points than a terminal has columns only slow plotext down
COLUMNS = ("run", "experiment", "host", "state", "tokens", "tok/s", "cost", "best eval")


class RunsScreen(Screen):
    """The run store as a table; the highlighted run followed live."""

    BINDINGS = [
        Binding("c", "cancel", "Cancel run"),
        Binding("u", "resume", "Resume"),
        Binding("s", "sync", "Sync now"),
        Binding("o", "show_dir", "Run dir"),
        Binding("l", "toggle_view", "Loss/log"),
    ]

    class Listed(Message):
        def __init__(self, runs: list[Run]):
            super().__init__()
            self.runs = runs

    class Fed(Message):
        """New log lines and metrics events of the followed run."""

        def __init__(self, run_id: str, lines: list[str], events: list[dict]):
            super().__init__()
            self.run_id, self.lines, self.events = run_id, lines, events

    class Acted(Message):
        def __init__(self, text: str, error: bool = False):
            super().__init__()
            self.text, self.error = text, error

    def __init__(self) -> None:
        super().__init__()
        self.runs: dict[str, Run] = {}
        self.order: list[str] = []
        self.followed: str | None = None
        self.train: list[dict] = []  # the followed run's train events, for progress and speed
        self.evals: list[dict] = []
        self.plot_due = False
        self.plotted_at = 0.0  # monotonic time of the last plot with data in it

    def compose(self) -> ComposeResult:
        yield NavBar("runs")
        yield DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        yield Static(id="run-summary")
        yield ProgressBar(id="run-progress", total=100, show_eta=False)
        with TabbedContent(id="run-views"):
            with TabPane("Loss", id="loss-tab"):
                yield PlotextPlot(id="loss-plot")
            with TabPane("Log", id="log-tab"):
                yield Log(id="run-log", max_lines=LOG_LINES, auto_scroll=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for name in COLUMNS:
            table.add_column(name, key=name, width=9 if name == "state" else None)
        self.list_runs()
        self.set_interval(STORE_REFRESH_S, self.list_runs)
        self.set_interval(RECONCILE_S, self.reconcile)
        self.set_interval(PLOT_EVERY_S, self._plot_if_due)
        self.watch(self.app, "selected_run", self._selected_changed, init=False)

    # --- workers -----------------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="list")
    def list_runs(self) -> None:
        store = self.app.open_store()
        try:
            runs = store.runs()
        finally:
            store.close()
        self.post_message(self.Listed(runs))

    @work(thread=True, exclusive=True, group="reconcile")
    def reconcile(self) -> None:
        """Bring runs started elsewhere in line with their containers (and copy their logs)."""
        from runner import dispatch

        store = self.app.open_store()
        try:
            dispatch.reconcile(store)
        except UserError as exc:
            self.post_message(self.Acted(exc.render(), error=True))
        finally:
            store.close()

    @work(thread=True, exclusive=True, group="follow")
    def follow(self, run_id: str, run_dir: Path) -> None:
        worker = get_current_worker()
        log = FileTail(run_dir / LOG_FILE, start_bytes=LOG_TAIL_BYTES)
        metrics = FileTail(run_dir / METRICS_FILE)
        while not worker.is_cancelled:
            lines = log.read_lines()
            events = parse_events(metrics.read_lines())
            if lines or events:
                self.post_message(self.Fed(run_id, lines, events))
            worker.cancelled_event.wait(POLL_S)

    @work(thread=True, group="act")
    def act(self, verb: str, run_id: str) -> None:
        from runner import dispatch

        store = self.app.open_store()
        try:
            if verb == "cancel":
                run = dispatch.cancel(store, run_id)
            elif verb == "resume":
                run = dispatch.resume(store, run_id, say=lambda text: self.post_message(self.Acted(text)))
                self.app.call_from_thread(self.app.supervise, run.id)
            else:
                run = store.get(run_id)
                if run.backend == "ssh":  # a remote run's directory comes home now
                    dispatch.remote_backend(self.app.load_inventory())
                    report = dispatch.sync_run(store, run_id)
                    self.post_message(self.Acted(f"run {run.id}: {len(report.moved)} files moved from {run.host}"))
                run = dispatch.reconcile_run(store, run)
        except (UserError, UserErrors) as exc:
            errors = exc.errors if isinstance(exc, UserErrors) else [exc]
            self.post_message(self.Acted("\n".join(e.render() for e in errors), error=True))
            return
        finally:
            store.close()
        self.post_message(self.Acted(f"run {run.id}: {run.state} ({run.reason})"))

    # --- messages ----------------------------------------------------------------------------

    def on_runs_screen_listed(self, message: Listed) -> None:
        table = self.query_one(DataTable)
        order = [run.id for run in message.runs]
        fresh = {run.id: run for run in message.runs}
        if order != self.order:
            keep = self._current_id() or self.app.selected_run
            table.clear()
            for run in message.runs:
                table.add_row(*self._cells(run), key=run.id)
            self.order = order
            wanted = self.app.selected_run or keep
            if wanted in fresh:
                table.move_cursor(row=order.index(wanted), scroll=True)
        else:
            for run in message.runs:
                old = self.runs.get(run.id)
                if old is None or old.updated_at != run.updated_at or run.active:
                    for column, value in zip(COLUMNS, self._cells(run)):
                        table.update_cell(run.id, column, value)
        self.runs = fresh
        current = self._current_id()
        if current and current != self.followed:
            self._follow(current)
        self._show_summary()

    def on_runs_screen_fed(self, message: Fed) -> None:
        if message.run_id != self.followed:
            return  # a late batch from the run followed before
        if message.lines:
            self.query_one(Log).write_lines(message.lines)
        if message.events:
            self.train += [e for e in message.events if e.get("event") == "train"]
            self.evals += [e for e in message.events if e.get("event") == "eval"]
            self.plot_due = True
            if time.monotonic() - self.plotted_at >= PLOT_EVERY_S:
                self._plot_if_due()
            self._show_summary()

    def on_runs_screen_acted(self, message: Acted) -> None:
        self.notify(message.text, severity="error" if message.error else "information")
        self.list_runs()

    @on(DataTable.RowHighlighted)
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        run_id = event.row_key.value
        if run_id and run_id != self.followed:
            self._follow(run_id)
            self._show_summary()

    @on(TabbedContent.TabActivated)
    def _tab_shown(self) -> None:
        self._plot_if_due()  # the plot was left alone while hidden; bring it up to date before it shows

    def _selected_changed(self) -> None:
        wanted = self.app.selected_run
        if wanted in self.order:
            self.query_one(DataTable).move_cursor(row=self.order.index(wanted), scroll=True)
        else:
            self.list_runs()

    # --- actions -----------------------------------------------------------------------------

    def action_cancel(self) -> None:
        run = self._current()
        if run is not None:
            self.notify(f"cancelling {run.id} (the trainer checkpoints first)…")
            self.act("cancel", run.id)

    def action_resume(self) -> None:
        run = self._current()
        if run is not None:
            self.act("resume", run.id)

    def action_sync(self) -> None:
        run = self._current()
        if run is not None:
            self.act("sync", run.id)

    def action_show_dir(self) -> None:
        run = self._current()
        if run is not None:
            self.app.copy_to_clipboard(run.run_dir)
            self.notify(run.run_dir, title=f"run directory of {run.id} (copied)", timeout=10)

    def action_toggle_view(self) -> None:
        tabs = self.query_one(TabbedContent)
        tabs.active = "log-tab" if tabs.active == "loss-tab" else "loss-tab"

    # --- rendering ---------------------------------------------------------------------------

    def _current_id(self) -> str | None:
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    def _current(self) -> Run | None:
        return self.runs.get(self._current_id() or "")

    def _follow(self, run_id: str) -> None:
        run = self.runs.get(run_id)
        if run is None:
            return
        self.followed = run_id
        self.train, self.evals = [], []
        self.query_one(Log).clear()
        self._plot()
        self.follow(run_id, Path(run.run_dir))

    def _cells(self, run: Run) -> tuple[str, ...]:
        from runner.units import format_count

        return (run.id, run.experiment, run.host, run.state,
                format_count(run.tokens) if run.tokens is not None else "-",
                format_count(run.tokens_per_s) if run.tokens_per_s is not None else "-",
                f"${self._cost(run):,.2f}",
                f"{run.best_eval_loss:.4f}" if run.best_eval_loss is not None else "-")

    def _cost(self, run: Run) -> float:
        return run.elapsed_s(self.app.settings.clock()) / 3600 * run.price_usd_per_hour

    def _show_summary(self) -> None:
        from runner.units import format_count, format_duration

        run = self.runs.get(self.followed or "")
        summary = self.query_one("#run-summary", Static)
        bar = self.query_one(ProgressBar)
        if run is None:
            summary.update("no runs yet: dispatch one from Plan (3)" if not self.runs else "")
            bar.update(progress=0)
            return
        last = self.train[-1] if self.train else None
        share = (last.get("budget_pct") or 0.0) / 100 if last else 0.0
        if run.state == "succeeded":
            share = 1.0
        bar.update(progress=round(share * 100, 1))
        speed = last.get("tokens_per_s") if last else run.tokens_per_s
        eta = "-"
        if run.active and last and share > 0 and speed:
            planned = last["tokens"] / share
            eta = format_duration(max(0.0, planned - last["tokens"]) / speed)
        step = f"step {last['step']:,} · loss {last['loss']:.4f}" if last else "no steps yet"
        summary.update(
            f"[b]{escape(run.id)}[/b] {escape(run.experiment)} on {escape(run.host)} · "
            f"[b]{run.state}[/b] ({escape(run.reason)})\n"
            f"ETA {eta} · ${self._cost(run):,.2f} so far · "
            f"{format_count(speed) if speed else '-'} tokens/s · {step}")

    def _plot_if_due(self) -> None:
        if self.plot_due and self.query_one(TabbedContent).active == "loss-tab":
            self._plot()

    def _plot(self) -> None:
        self.plot_due = False
        self.plotted_at = time.monotonic() if self.train or self.evals else 0.0
        plot = self.query_one(PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        plt.xlabel("tokens")
        train, evals = _thin(self.train), _thin(self.evals)
        if train:
            plt.plot([e["tokens"] for e in train], [e["loss"] for e in train], label="train")
        if evals:
            plt.plot([e["tokens"] for e in evals], [e["eval_loss"] for e in evals], label="eval", marker="dot")
        plot.refresh()


def _thin(events: list[dict]) -> list[dict]:
    """At most PLOT_POINTS events, evenly spaced, always with the newest."""
    if len(events) <= PLOT_POINTS:
        return events
    stride = (len(events) - 1) / (PLOT_POINTS - 1)
    return [events[round(i * stride)] for i in range(PLOT_POINTS)]
