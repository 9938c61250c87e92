"""Hosts: the inventory with live status; add a host, trust its key, probe it."""

from __future__ import annotations

from dataclasses import dataclass

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from runner.errors import UserError, UserErrors
from runner.hosts import Host, Inventory
from runner.probe import HostProbe, blockers, image_family
from runner.ssh import HostKey
from tui.widgets.nav import NavBar

CHECK_TIMEOUT_S = 5.0
RUNS_REFRESH_S = 5.0
COLUMNS = ("host", "reach", "key", "profile", "GPUs", "mem used", "jobs", "$/h", "probed")


@dataclass(frozen=True)
class HostRow:
    """What the inventory, the hardware resolution and the probe cache say about one host."""

    host: Host
    profile: str
    gpus: str
    price: str
    source: str
    probe: HostProbe | None


@dataclass(frozen=True)
class Reach:
    """The outcome of reaching a host's SSH server (no login): reachable, and its key's status."""

    reachable: bool
    key_status: str  # known | unknown | changed, or "-" when it was not reached
    detail: str


class HostsScreen(Screen):
    """The inventory, one row per host, with status filled in by workers as it arrives."""

    BINDINGS = [
        Binding("a", "add_host", "Add host"),
        Binding("t", "trust", "Trust key"),
        Binding("p", "probe", "Probe"),
        Binding("r", "reload", "Reload"),
    ]

    class Loaded(Message):
        def __init__(self, inventory: Inventory | None, rows: list[HostRow], error: str | None):
            super().__init__()
            self.inventory, self.rows, self.error = inventory, rows, error

    class Checked(Message):
        def __init__(self, name: str, reach: Reach):
            super().__init__()
            self.name, self.reach = name, reach

    class RunsCounted(Message):
        def __init__(self, active_by_host: dict[str, int]):
            super().__init__()
            self.active_by_host = active_by_host

    class Probed(Message):
        def __init__(self, name: str, error: str | None):
            super().__init__()
            self.name, self.error = name, error

    class KeyFetched(Message):
        def __init__(self, name: str, key: HostKey | None, error: str | None):
            super().__init__()
            self.name, self.key, self.error = name, key, error

    def __init__(self) -> None:
        super().__init__()
        self.inventory: Inventory | None = None
        self.rows: dict[str, HostRow] = {}
        self.reach: dict[str, Reach] = {}
        self.active: dict[str, int] = {}

    def compose(self) -> ComposeResult:
        yield NavBar("hosts")
        yield DataTable(id="hosts", cursor_type="row", zebra_stripes=True)
        yield Static(id="host-detail", classes="detail")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for name in COLUMNS:
            table.add_column(name, key=name)
        self.load()
        self.count_runs()
        self.set_interval(RUNS_REFRESH_S, self.count_runs)

    # --- workers: everything here reads disk, runs a probe or opens a socket -----------------

    @work(thread=True, exclusive=True, group="load")
    def load(self) -> None:
        from runner.hosts import NotProbed, hardware
        from runner.probe import read_cached

        try:
            inventory = self.app.load_inventory()
        except (UserError, UserErrors) as exc:
            self.post_message(self.Loaded(None, [], _render(exc)))
            return
        rows = []
        for host in inventory.hosts.values():
            cached = read_cached(host.name)
            try:
                hw = hardware(host)
                rows.append(HostRow(host, hw.profile.id, str(hw.gpus), f"{hw.price_usd_per_hour:g}", hw.source,
                                    cached))
            except NotProbed as exc:
                rows.append(HostRow(host, "auto", "?", "?", exc.message, cached))
            except UserError as exc:
                rows.append(HostRow(host, "?", "?", "?", exc.render(), cached))
        self.post_message(self.Loaded(inventory, rows, None))
        for host in inventory.hosts.values():
            if host.kind == "ssh":
                self.check(host)

    @work(thread=True, group="check")
    def check(self, host: Host) -> None:
        from runner.ssh import endpoint_for, fetch_host_key

        try:
            key = fetch_host_key(endpoint_for(host), timeout_s=CHECK_TIMEOUT_S)
        except UserError as exc:
            self.post_message(self.Checked(host.name, Reach(False, "-", exc.message)))
            return
        self.post_message(self.Checked(host.name, Reach(True, key.status, f"{key.key_type} {key.fingerprint}")))

    @work(thread=True, exclusive=True, group="runs")
    def count_runs(self) -> None:
        from runner.store import ACTIVE

        store = self.app.open_store()
        try:
            active: dict[str, int] = {}
            for run in store.runs(states=set(ACTIVE)):
                active[run.host] = active.get(run.host, 0) + 1
        finally:
            store.close()
        self.post_message(self.RunsCounted(active))

    @work(thread=True, group="probe")
    def probe(self, host: Host) -> None:
        from runner.probe import probe_host

        try:
            probe_host(host)
        except UserError as exc:
            self.post_message(self.Probed(host.name, exc.render()))
            return
        self.post_message(self.Probed(host.name, None))

    @work(thread=True, group="trust")
    def fetch_key(self, host: Host) -> None:
        from runner.ssh import endpoint_for, fetch_host_key

        try:
            key = fetch_host_key(endpoint_for(host))
        except UserError as exc:
            self.post_message(self.KeyFetched(host.name, None, exc.render()))
            return
        self.post_message(self.KeyFetched(host.name, key, None))

    @work(thread=True, group="trust")
    def record_key(self, key: HostKey) -> None:
        from runner.ssh import record_host_key

        try:
            path = record_host_key(key)
        except (OSError, UserError) as exc:
            self.app.call_from_thread(self.notify, f"could not record the key: {exc}", severity="error")
            return
        self.app.call_from_thread(self.notify, f"trusted {key.host}: {key.fingerprint} (in {path})")
        self.post_message(self.Checked(key.host, Reach(True, "known", f"{key.key_type} {key.fingerprint}")))

    # --- messages back from the workers ------------------------------------------------------

    def on_hosts_screen_loaded(self, message: Loaded) -> None:
        table = self.query_one(DataTable)
        table.clear()
        if message.error:
            self.query_one("#host-detail", Static).update(message.error)
            return
        self.inventory = message.inventory
        self.rows = {row.host.name: row for row in message.rows}
        for row in message.rows:
            table.add_row(*self._cells(row), key=row.host.name)
        self._show_detail()

    def on_hosts_screen_checked(self, message: Checked) -> None:
        self.reach[message.name] = message.reach
        self._refresh_row(message.name)

    def on_hosts_screen_runs_counted(self, message: RunsCounted) -> None:
        changed = {name for name in {*self.active, *message.active_by_host}
                   if self.active.get(name, 0) != message.active_by_host.get(name, 0)}
        self.active = message.active_by_host
        for name in changed:
            self._refresh_row(name)

    def on_hosts_screen_probed(self, message: Probed) -> None:
        if message.error:
            self.notify(message.error, title=f"probe of {message.name} failed", severity="error")
        else:
            self.notify(f"probed {message.name}")
        self.load()

    def on_hosts_screen_key_fetched(self, message: KeyFetched) -> None:
        from tui.screens.trust import TrustScreen

        if message.key is None:
            self.notify(message.error or "", title=f"cannot fetch the key of {message.name}", severity="error")
            return
        key = message.key
        if key.status == "known":
            self.notify(f"{message.name}: key already trusted ({key.fingerprint})")
            self.post_message(self.Checked(key.host, Reach(True, "known", f"{key.key_type} {key.fingerprint}")))
            return

        def answered(trust: bool | None) -> None:
            if trust:
                self.record_key(key)

        self.app.push_screen(TrustScreen(key), answered)

    @on(DataTable.RowHighlighted)
    def _highlighted(self) -> None:
        self._show_detail()

    # --- actions -----------------------------------------------------------------------------

    def action_reload(self) -> None:
        self.reach.clear()
        self.load()
        self.count_runs()

    def action_probe(self) -> None:
        host = self._current()
        if host is not None:
            self.notify(f"probing {host.name}…")
            self.probe(host)

    def action_trust(self) -> None:
        host = self._current()
        if host is None:
            return
        if host.kind == "local":
            self.notify("local needs no host key", severity="warning")
            return
        self.fetch_key(host)

    def action_add_host(self) -> None:
        from tui.screens.add_host import AddHostScreen

        def added(name: str | None) -> None:
            if name:
                self.notify(f"added {name}")
                self.load()

        self.app.push_screen(AddHostScreen(self.app.settings.hosts_file), added)

    # --- rendering ---------------------------------------------------------------------------

    def _current(self) -> Host | None:
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        row = self.rows.get(key or "")
        return row.host if row else None

    def _cells(self, row: HostRow) -> tuple[str, ...]:
        from runner.units import format_bytes

        name = row.host.name
        if row.host.kind == "local":
            reach, key = "yes", "-"
        elif name in self.reach:
            reach = "yes" if self.reach[name].reachable else "no"
            key = self.reach[name].key_status
        else:
            reach, key = "…", "…"
        used = "-"
        if row.probe is not None and row.probe.gpus:
            used_bytes = sum(g.memory_used_bytes for g in row.probe.gpus)
            total_bytes = sum(g.memory_total_bytes for g in row.probe.gpus)
            used = f"{format_bytes(used_bytes)}/{format_bytes(total_bytes)}"
        probed = row.probe.probed_at.replace("T", " ")[:16] if row.probe else "never"
        return (name, reach, key, row.profile, row.gpus, used, str(self.active.get(name, 0)), row.price, probed)

    def _refresh_row(self, name: str) -> None:
        table = self.query_one(DataTable)
        row = self.rows.get(name)
        if row is None:
            return
        for column, value in zip(COLUMNS, self._cells(row)):
            table.update_cell(name, column, value, update_width=True)
        self._show_detail()

    def _show_detail(self) -> None:
        host = self._current()
        detail = self.query_one("#host-detail", Static)
        if host is None:
            detail.update("")
            return
        row = self.rows[host.name]
        address = "this machine" if host.kind == "local" else f"{host.ssh_target}:{host.port}"
        lines = [f"[b]{host.name}[/b]  {address}  ·  {row.source}"]
        if host.name in self.reach:
            lines.append(f"ssh: {self.reach[host.name].detail}")
        if row.probe is not None:
            p = row.probe
            gpus = ", ".join(dict.fromkeys(g.name for g in p.gpus)) or "no GPU"
            lines.append(f"probe: {p.os_name} · {gpus} · CUDA {p.cuda_version or '-'} · "
                         f"docker {p.docker_version or '-'}{' (nvidia runtime)' if p.nvidia_runtime else ''}")
            family = image_family(host, p.profile)
            lines += [f"[red]cannot run the {family.name} image:[/red] {problem}" for problem in blockers(p, family)]
        detail.update("\n".join(lines))


def _render(exc: UserError | UserErrors) -> str:
    errors = exc.errors if isinstance(exc, UserErrors) else [exc]
    return "\n".join(e.render() for e in errors)
