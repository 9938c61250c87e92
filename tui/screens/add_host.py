"""Add a host: a form for one inventory entry, checked by the core's Host model, appended to the inventory."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, Select, Static

from runner.errors import UserError, UserErrors
from runner.hosts import Host

FIELDS = (  # (input id = Host field alias, label, placeholder)
    ("name", "name", "gpu-box"),
    ("address", "address", "hostname, IP or ~/.ssh/config alias (default: the name)"),
    ("user", "user", "default: from ~/.ssh/config or yours"),
    ("port", "port", "22"),
    ("key", "key file", "default: what ssh picks"),
    ("price_usd_per_hour", "$/hour", "default: the profile's price"),
)


class AddHostScreen(ModalScreen[str | None]):
    """Dismisses with the new host's name once it is written, or None when cancelled."""

    BINDINGS = [
        Binding("ctrl+s", "add", "Add"),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self, hosts_file: Path | None):
        super().__init__()
        self.hosts_file = hosts_file

    def compose(self) -> ComposeResult:
        from runner.catalog import load_catalog

        profiles = [(f"{p.id}  ({p.name})", p.id) for p in load_catalog().profiles.values()]
        with Vertical(classes="dialog", id="add-host-dialog"):
            yield Static("[b]Add a host reached over SSH[/b]")
            for field, label, placeholder in FIELDS:
                with Horizontal(classes="form-row"):
                    yield Label(label)
                    yield Input(placeholder=placeholder, id=f"host-{field}", compact=True)
            with Horizontal(classes="form-row"):
                yield Label("profile")
                yield Select([("auto (probe it)", "auto"), *profiles], value="auto", allow_blank=False, compact=True,
                             id="host-profile")
            yield Static(id="add-host-errors")
            with Horizontal(classes="buttons"):
                yield Button("Add (ctrl+s)", id="add", variant="primary")
                yield Button("Cancel (esc)", id="cancel")
        yield Footer()

    def host(self) -> Host | None:
        """The form as a Host, or None after showing what is wrong with it."""
        given: dict[str, object] = {field: self.query_one(f"#host-{field}", Input).value.strip()
                                    for field, _, _ in FIELDS}
        given = {field: value for field, value in given.items() if value}
        given["profile"] = self.query_one("#host-profile", Select).value
        try:
            return Host.model_validate(given)
        except ValidationError as exc:
            labels = {field: label for field, label, _ in FIELDS}
            lines = []
            for err in exc.errors(include_url=False):
                where = labels.get(str(err["loc"][0]), str(err["loc"][0])) if err["loc"] else "host"
                message = err["msg"].removeprefix("Value error, ")
                if err["type"] == "string_pattern_mismatch":
                    message = "use letters, digits, . _ - (at most 64, starting with a letter or digit)"
                lines.append(f"{where}: {message}")
            self.show_errors(lines)
            return None

    def show_errors(self, lines: list[str]) -> None:
        self.query_one("#add-host-errors", Static).update(Text("\n".join(lines), style="red"))

    @work(thread=True, exclusive=True, group="add-host")
    def write(self, host: Host) -> None:
        from runner.hosts import add_host

        try:
            add_host(host, self.hosts_file)
        except (UserError, UserErrors) as exc:
            errors = exc.errors if isinstance(exc, UserErrors) else [exc]
            self.app.call_from_thread(self.show_errors, [e.render() for e in errors])
            return
        self.app.call_from_thread(self.dismiss, host.name)

    def action_add(self) -> None:
        host = self.host()
        if host is not None:
            self.write(host)

    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Input.Submitted)
    def _submitted(self) -> None:
        self.action_add()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "add":
            self.action_add()
        else:
            self.dismiss(None)
