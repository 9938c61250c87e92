"""The line of screen names at the top: which screen is showing, and the key (or click) for each."""

from __future__ import annotations

from textual.widgets import Static


class NavBar(Static):
    """``1 Hosts  2 Experiments  3 Plan  4 Runs  5 Compare``, the current one highlighted."""

    def __init__(self, current: str):
        super().__init__(id="nav")
        self.current = current

    def on_mount(self) -> None:
        from tui.app import SCREENS_IN_ORDER

        parts = []
        for i, (mode, title, _) in enumerate(SCREENS_IN_ORDER, start=1):
            style = "reverse bold " if mode == self.current else ""
            parts.append(f"[{style}@click=app.switch_mode('{mode}')] {i} {title} [/]")
        self.update(" ".join(parts))
