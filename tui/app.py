"""The ``runner tui`` application: the screens, the shared selection and the command palette."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.message import Message
from textual.reactive import reactive
from textual.screen import Screen

from tui.screens.compare import CompareScreen
from tui.screens.experiments import ExperimentsScreen
from tui.screens.hosts import HostsScreen
from tui.screens.plan import PlanScreen
from tui.screens.runs import RunsScreen

SUPERVISE_POLL_S = 1.0
SCREENS_IN_ORDER = (
    ("hosts", "Hosts", "the inventory: status, add, trust, probe"),
    ("experiments", "Experiments", "the job files, their preview and errors"),
    ("plan", "Plan", "the selected job on every host; dispatch"),
    ("runs", "Runs", "live and finished runs: progress, loss, log"),
    ("compare", "Compare", "one job's runs across hardware"),
)


@dataclass(frozen=True)
class Settings:
    """Where the app reads from: the job directory, the inventory and the run store."""

    jobs_dir: Path = Path("jobs")
    hosts_file: Path | None = None  # None: the core's own search ($RUNNER_HOSTS, ./hosts.yaml, ...)
    store_path: Path | None = None  # None: the core's default ($RUNNER_HOME/runs.db, ...)
    sets: tuple[str, ...] = ()  # --set FIELD=VALUE overrides applied to every job, as on the command line
    clock: Callable[[], float] = time.time  # tests fix it so that elapsed times and ETAs are stable


@dataclass(frozen=True)
class JobChoice:
    """The job file picked on the Experiments screen, and the experiment in it."""

    path: Path
    experiment: str | None = None  # None: the first in the file


class RunnerApp(App[None]):
    """Hosts, experiments, plans, runs and comparisons, one key away from each other."""

    CSS_PATH = "runner.tcss"
    TITLE = "runner"
    MODES = {
        "hosts": HostsScreen,
        "experiments": ExperimentsScreen,
        "plan": PlanScreen,
        "runs": RunsScreen,
        "compare": CompareScreen,
    }
    DEFAULT_MODE = "experiments"
    BINDINGS = [
        *(Binding(str(i), f"switch_mode('{mode}')", title, id=f"screen.{mode}")
          for i, (mode, title, _) in enumerate(SCREENS_IN_ORDER, start=1)),
        Binding("q", "quit", "Quit"),
    ]

    job: reactive[JobChoice | None] = reactive(None)
    selected_run: reactive[str | None] = reactive(None)

    def __init__(self, settings: Settings | None = None):
        super().__init__()
        self.settings = settings or Settings()

    class RunEnded(Message):
        """A run this app launched has ended."""

        def __init__(self, run_id: str, state: str, reason: str):
            super().__init__()
            self.run_id, self.state, self.reason = run_id, state, reason

    def open_store(self):
        """A connection to the run store; each worker thread opens its own."""
        from runner.store import Store
        return Store.open(self.settings.store_path)

    def load_inventory(self):
        from runner.hosts import load_inventory
        return load_inventory(self.settings.hosts_file)

    def choose_job(self, choice: JobChoice) -> None:
        self.job = choice
        self.switch_mode("plan")

    def show_run(self, run_id: str) -> None:
        self.selected_run = run_id
        self.switch_mode("runs")

    @work(thread=True, group="supervise")
    def supervise(self, run_id: str) -> None:
        """Watch a run launched from here to its end, stopping it at its money or time cap.

        What ``runner run --wait`` does, one poll at a time so that quitting the app
        stops the watching (the run goes on; ``runner runs`` reconciles it later).
        """
        from textual.worker import get_current_worker

        from runner import dispatch
        from runner.store import TERMINAL

        worker = get_current_worker()
        store = self.open_store()
        try:
            while not worker.is_cancelled:
                run = dispatch.reconcile_run(store, store.get(run_id))
                if run.state in TERMINAL:
                    self.post_message(self.RunEnded(run.id, run.state, run.reason))
                    return
                why = dispatch.cap_reached(run, self.settings.clock())
                if why and run.state == "running":
                    dispatch.cancel(store, run.id, reason=f"{why}; stopping with a checkpoint")
                    continue
                worker.cancelled_event.wait(SUPERVISE_POLL_S)
        finally:
            store.close()

    def on_ready(self) -> None:
        # What is up by the first frame (modules, styles, the first screen) lives as long as
        # the app. Frozen, it is no longer rescanned by each full garbage collection, which
        # otherwise took 100-200 ms while a run streamed its log: the whole budget of a key press.
        gc.collect()
        gc.freeze()

    def on_runner_app_run_ended(self, message: RunEnded) -> None:
        self.notify(f"run {message.run_id} {message.state}: {message.reason}",
                    severity="information" if message.state == "succeeded" else "warning", timeout=10)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for mode, title, help_text in SCREENS_IN_ORDER:
            yield SystemCommand(f"Go to {title}", help_text, lambda mode=mode: self.switch_mode(mode))
        # Every key the current screen offers, so the palette reaches everything the footer shows.
        for active in screen.active_bindings.values():
            binding = active.binding
            if binding.show and binding.description and not binding.action.startswith("switch_mode"):
                yield SystemCommand(binding.description, f"key: {binding.key_display or binding.key}",
                                    lambda action=binding.action, node=active.node: self.run_action(action, node))
