"""Trust a host's key: show its fingerprint (and the old one when it changed), then record it or not."""

from __future__ import annotations

from rich.markup import escape
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Static

from runner.ssh import HostKey


class TrustScreen(ModalScreen[bool]):
    """A yes/no question about one host key; dismisses with True to record it."""

    BINDINGS = [
        Binding("y", "answer(True)", "Trust"),
        Binding("n,escape", "answer(False)", "Cancel"),
    ]

    def __init__(self, key: HostKey):
        super().__init__()
        self.key = key

    def compose(self) -> ComposeResult:
        key = self.key
        lines = [f"[b]Trust the host key of {escape(key.host)}?[/b]", "",
                 f"{escape(key.known_hosts_name)} presents {escape(key.key_type)}",
                 f"[b]{escape(key.fingerprint)}[/b]", ""]
        if key.status == "changed":
            lines += ["[red b]THE KEY CHANGED.[/red b] known_hosts has "
                      f"{escape(', '.join(key.known_fingerprints))}.",
                      "Someone may be intercepting the connection, or the host was rebuilt.", ""]
        lines.append("Check the fingerprint with the host's provider before you trust it.")
        with Vertical(classes="dialog"):
            yield Static("\n".join(lines))
            with Horizontal(classes="buttons"):
                yield Button("Trust (y)", id="yes", variant="warning" if key.status == "changed" else "primary")
                yield Button("Cancel (n)", id="no")
        yield Footer()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, trust: bool) -> None:
        self.dismiss(trust)
