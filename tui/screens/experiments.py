"""Experiments: the job files in the job directory, a preview of one, and its errors by line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape
from rich.syntax import Syntax
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, OptionList, Static
from textual.widgets.option_list import Option

from runner.errors import UserError, UserErrors
from tui.widgets.nav import NavBar


@dataclass(frozen=True)
class JobFile:
    """One job file as read and checked by the core."""

    path: Path
    text: str
    experiments: tuple[str, ...]
    errors: tuple[UserError, ...]


class ExperimentsScreen(Screen):
    """Pick a job file; Enter plans it."""

    BINDINGS = [
        Binding("enter", "plan", "Plan it", priority=True),
        Binding("r", "rescan", "Rescan"),
    ]

    class Scanned(Message):
        def __init__(self, files: list[JobFile], error: str | None):
            super().__init__()
            self.files, self.error = files, error

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, JobFile] = {}

    def compose(self) -> ComposeResult:
        yield NavBar("experiments")
        with Horizontal():
            yield OptionList(id="job-files")
            with Vertical(id="job-view"):
                with VerticalScroll(id="preview-scroll"):
                    yield Static(id="preview")
                yield Static(id="job-errors", classes="detail")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(OptionList).border_title = self.app.settings.jobs_dir.name or str(self.app.settings.jobs_dir)
        self.scan()

    @work(thread=True, exclusive=True, group="scan")
    def scan(self) -> None:
        from runner.spec import check_job, load_jobs

        jobs_dir = self.app.settings.jobs_dir
        try:
            paths = sorted(p for p in jobs_dir.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
            known_hosts = self.app.load_inventory().names
        except OSError as exc:
            self.post_message(self.Scanned([], f"cannot read {jobs_dir}: {exc.strerror or exc}"))
            return
        except (UserError, UserErrors) as exc:
            errors = exc.errors if isinstance(exc, UserErrors) else [exc]
            self.post_message(self.Scanned([], "\n".join(e.render() for e in errors)))
            return
        files = []
        for path in paths:
            try:
                text = path.read_text()
            except OSError as exc:
                files.append(JobFile(path, "", (), (UserError(exc.strerror or str(exc), file=str(path)),)))
                continue
            try:
                jobs = load_jobs(path, list(self.app.settings.sets))
            except UserErrors as exc:
                files.append(JobFile(path, text, (), tuple(exc.errors)))
                continue
            except UserError as exc:
                files.append(JobFile(path, text, (), (exc,)))
                continue
            errors = tuple(e for job in jobs for e in check_job(job, known_hosts))
            files.append(JobFile(path, text, tuple(job.name for job in jobs), errors))
        self.post_message(self.Scanned(files, None))

    def on_experiments_screen_scanned(self, message: Scanned) -> None:
        options = self.query_one(OptionList)
        highlighted = options.highlighted_option.id if options.highlighted_option else None
        options.clear_options()
        self.files = {str(f.path): f for f in message.files}
        if message.error:
            self.query_one("#job-errors", Static).update(escape(message.error))
            return
        for f in message.files:
            mark = f"[red]✗ {len(f.errors)}[/red]" if f.errors else "[green]✓[/green]"
            options.add_option(Option(f"{mark} {escape(f.path.name)}", id=str(f.path)))
        if not message.files:
            self.query_one("#job-errors", Static).update(f"no job files in {self.app.settings.jobs_dir}")
            return
        chosen = self.app.job.path if self.app.job else None
        wanted = highlighted or (str(chosen) if chosen else None)
        index = next((i for i, f in enumerate(message.files) if str(f.path) == wanted), 0)
        options.highlighted = index
        self._preview(message.files[index])

    @on(OptionList.OptionHighlighted)
    def _highlighted(self, event: OptionList.OptionHighlighted) -> None:
        found = self.files.get(event.option.id or "")
        if found is not None:
            self._preview(found)

    def _preview(self, f: JobFile) -> None:
        lines = {e.line for e in f.errors if e.line is not None}
        self.query_one("#preview", Static).update(
            Syntax(f.text, "yaml", line_numbers=True, highlight_lines=lines, word_wrap=True, theme="ansi_dark"))
        self.query_one("#preview-scroll").border_title = f.path.name
        errors = self.query_one("#job-errors", Static)
        if f.errors:
            errors.update("\n".join(_error_line(e) for e in f.errors))
            errors.add_class("-errors")
        else:
            names = ", ".join(f.experiments)
            errors.update(f"[green]valid[/green]: {len(f.experiments)} experiment"
                          f"{'s' if len(f.experiments) != 1 else ''} ({escape(names)}) · Enter plans it")
            errors.remove_class("-errors")

    def action_plan(self) -> None:
        from tui.app import JobChoice

        option = self.query_one(OptionList).highlighted_option
        found = self.files.get(option.id or "") if option else None
        if found is None:
            return
        if found.errors:
            self.notify("fix the errors first", title=found.path.name, severity="warning")
            return
        self.app.choose_job(JobChoice(found.path))

    def action_rescan(self) -> None:
        self.scan()


def _error_line(error: UserError) -> str:
    where = f"line {error.line}" if error.line is not None else "file"
    if error.col is not None and error.line is not None:
        where += f":{error.col}"
    field = f"{error.field}: " if error.field else ""
    hint = f"\n    [dim]hint: {escape(error.hint)}[/dim]" if error.hint else ""
    return f"[red]{where}[/red]  {escape(field + error.message)}{hint}"
