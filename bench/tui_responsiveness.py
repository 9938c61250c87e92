"""How fast the TUI answers a key while it is busy: 20 hosts, 500 stored runs, a run logging 2,000 lines/s.

The app runs under Textual's Pilot on the Runs screen, following the streaming
run (its log and loss plot both live); a separate process writes that run's log
and metrics, as the trainer does. Each press is timed from the moment the key is
delivered (as the terminal driver delivers it) to the first frame the app renders
for the terminal that shows its effect:
``l`` flips to the log, then back to the loss plot; ``down`` then ``up`` move the
run table's cursor off the streaming run and back (the summary line names the
newly highlighted run, and the streaming run's log is read again). Prints the
median, 95th percentile, maximum and the share within 100 ms per kind of press.

    .venv/bin/python bench/tui_responsiveness.py [--presses 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import tempfile
import multiprocessing
import time
from pathlib import Path

HOSTS = 20
RUNS = 500
LINES_PER_S = 2000
TIMEOUT_S = 5.0
TARGET_MS = 100.0
PROFILES = ("rtx-4090", "a100-80gb", "h100-80gb", "l4", "a10g")


def make_world(root: Path) -> tuple[Path, Path, str]:
    """An inventory of 20 hosts and a store of 500 finished runs plus one running; returns the running run's id."""
    from runner.catalog import load_catalog
    from runner.store import Store

    known = [p for p in PROFILES if p in load_catalog().profiles]
    lines = ["hosts:", "  local:", "    profile: cpu"]
    for i in range(HOSTS - 1):  # port 1 on the loopback refuses at once: every host reads "unreachable"
        lines += [f"  gpu{i:02d}:", "    address: 127.0.0.1", "    port: 1", f"    profile: {known[i % len(known)]}"]
    hosts_file = root / "hosts.yaml"
    hosts_file.write_text("\n".join(lines) + "\n")

    store = Store.open(root / "home" / "runs.db")
    for i in range(RUNS):
        run = _create(store, experiment=f"exp{i % 7}", host=f"gpu{i % (HOSTS - 1):02d}", profile=known[i % len(known)],
                      backend="docker", price_usd_per_hour=1.0)
        store.transition(run.id, "starting", "launching")
        store.transition(run.id, "running", "trainer started", handle="none")
        store.transition(run.id, "succeeded", "budget_reached", tokens=400_000, tokens_per_s=20_000.0,
                         best_eval_loss=3.0)
    live = _create(store, experiment="streaming", host="local", profile="cpu", backend="native",
                   price_usd_per_hour=0.0)
    store.transition(live.id, "starting", "launching")
    store.transition(live.id, "running", "trainer started")  # no handle: reconcile leaves it to its launcher
    store.close()
    (Path(live.run_dir) / "logs").mkdir(parents=True, exist_ok=True)
    return hosts_file, root / "home" / "runs.db", live.id


def _create(store, **fields):
    # Run ids are a timestamp to the second and 4 random hex digits: 500 in one second can collide.
    while True:
        try:
            return store.create(job_file="jobs/quickstart.yaml", resolved_json="{}", **fields)
        except sqlite3.IntegrityError:
            continue


def stream(run_dir: Path, stop) -> None:
    """Append LINES_PER_S lines a second to the run's log (in 10 ms slices) and a train event every 50 lines."""
    log = open(run_dir / "logs" / "train.log", "a", buffering=1 << 16)
    metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)
    n, start = 0, time.perf_counter()
    while not stop.is_set():
        due = int((time.perf_counter() - start) * LINES_PER_S)
        while n < due:
            n += 1
            log.write(f"step {n:>8} | loss {8 - n / 1e5:.4f} | lr 3.00e-04 | 20.0k tok/s | mfu 41.0% | 0:00:00\n")
            if n % 50 == 0:
                metrics.write(json.dumps({"event": "train", "step": n // 50, "loss": 8 - n / 1e5, "tokens": n * 100,
                                          "tokens_per_s": 20_000.0, "budget_pct": min(99.0, n / 1e4),
                                          "elapsed_s": n / LINES_PER_S}) + "\n")
        log.flush()
        time.sleep(0.01)
    log.close()
    metrics.close()


def screen_text(app) -> str:
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


def send_key(app, key: str) -> None:
    """Deliver a key as the terminal driver does, without Pilot.press's wait for the app to go idle.

    Under a constant stream of log lines the app is never idle for long, so that wait
    would be counted as latency; here the clock stops when the screen shows the change.
    """
    from textual.events import Key

    app.post_message(Key(key, key if len(key) == 1 else None))


class Frames:
    """Stamps the first frame, after a press, that shows the press's effect.

    The app hands every frame to ``_display`` (a no-op for the headless test
    driver); the stamp is taken there, before the check reads the screen back, so
    reading it costs the measurement nothing.
    """

    def __init__(self, app):
        self.check = None
        self.shown_at: float | None = None
        display = app._display

        def stamped(screen, renderable) -> None:
            at = time.perf_counter()
            display(screen, renderable)
            if renderable is not None and self.check is not None and self.check():
                self.shown_at, self.check = at, None

        app._display = stamped

    async def press(self, app, key: str, shows, what: str) -> float:
        """Seconds from delivering ``key`` until a frame for which ``shows()`` holds."""
        self.shown_at, self.check = None, shows
        t0 = time.perf_counter()
        send_key(app, key)
        while self.shown_at is None:
            await asyncio.sleep(0.002)
            if time.perf_counter() - t0 > TIMEOUT_S:
                raise SystemExit(f"{what} not on the screen after {TIMEOUT_S} s")
        return self.shown_at - t0


async def measure(app, presses: int, live_id: str) -> dict[str, list[float]]:
    from textual.widgets import DataTable, TabbedContent

    timings: dict[str, list[float]] = {"l (to the log)": [], "l (to the loss plot)": [], "down/up (run table)": []}
    frames = Frames(app)
    async with app.run_test(size=(120, 40)) as pilot:
        app.show_run(live_id)
        for _ in range(300):  # until the table is filled and the streaming run is followed
            await pilot.pause(0.05)
            if (app.current_mode == "runs" and app.screen.query_one(DataTable).row_count > RUNS
                    and app.screen.followed == live_id):
                break
        await pilot.pause(1.0)
        screen = app.screen
        table = screen.query_one(DataTable)
        tabs = screen.query_one(TabbedContent)
        for _ in range(presses):
            for want, marker, name in (("log-tab", "| lr 3.00e-04", "l (to the log)"),
                                       ("loss-tab", "┤", "l (to the loss plot)")):
                timings[name].append(await frames.press(
                    app, "l", lambda: tabs.active == want and marker in screen_text(app), name))
                await pilot.pause(0.05)
            for key in ("down", "up"):
                target = table.cursor_row + (1 if key == "down" else -1)
                row_id = table.coordinate_to_cell_key((target, 0)).row_key.value
                timings["down/up (run table)"].append(await frames.press(
                    app, key, lambda: table.cursor_row == target and screen.followed == row_id
                    and f"{row_id} {screen.runs[row_id].experiment} on" in screen_text(app), key))
                await pilot.pause(0.05)
        await pilot.press("q")
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presses", type=int, default=50, help="rounds of l, l, down, up (default 50)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ("HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME"):
            os.environ[name] = str(root / name.lower())
        os.environ["RUNNER_HOME"] = str(root / "home")
        hosts_file, store_path, live_id = make_world(root)
        from runner.store import Store
        from tui.app import RunnerApp, Settings

        run_dir = Path(Store.open(store_path).get(live_id).run_dir)
        stop = multiprocessing.Event()
        writer = multiprocessing.Process(target=stream, args=(run_dir, stop), daemon=True)
        writer.start()
        app = RunnerApp(Settings(jobs_dir=root, hosts_file=hosts_file, store_path=store_path))
        started = time.perf_counter()
        timings = asyncio.run(measure(app, args.presses, live_id))
        elapsed = time.perf_counter() - started
        stop.set()
        writer.join()
        with open(run_dir / "logs" / "train.log") as f:
            written = sum(1 for _ in f)
    print(f"{HOSTS} hosts, {RUNS + 1} stored runs, one run logging {LINES_PER_S} lines/s "
          f"({written:,} lines in {elapsed:.0f} s)")
    print(f"{'key':<22}{'presses':>8}{'median ms':>10}{'p95 ms':>10}{'max ms':>10}{'<= 100 ms':>11}")
    for key, values in timings.items():
        values_ms = sorted(v * 1000 for v in values)
        p95 = values_ms[min(len(values_ms) - 1, round(0.95 * (len(values_ms) - 1)))]
        within = sum(v <= TARGET_MS for v in values_ms) / len(values_ms)
        print(f"{key:<22}{len(values_ms):>8}{statistics.median(values_ms):>10.1f}{p95:>10.1f}{values_ms[-1]:>10.1f}"
              f"{within:>11.0%}")


if __name__ == "__main__":
    main()
