"""Each flow of the terminal UI driven with the Pilot: keys in, the screen and the core's records out."""

from __future__ import annotations

import paramiko
import pytest
from test_tui_world import REPO, fill_store, screen_text, settle, world  # noqa: F401  (world is a fixture)

from tui.app import JobChoice, RunnerApp

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


@pytest.fixture
def stored(world, monkeypatch):  # noqa: F811
    fill_store(world, monkeypatch)
    return world


async def test_experiments_lists_job_files_and_shows_errors_with_their_line_numbers(world):  # noqa: F811
    app = RunnerApp(world.settings())
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        text = screen_text(app)
        assert "✗ 2 broken.yaml" in text and "✓ quickstart.yaml" in text
        assert "line 6:12  data.seq_len" in text
        assert "line 8:3  train.batch_sise: unknown field" in text and "did you mean 'batch_size'" in text
        await pilot.press("enter")  # a broken job is not planned
        await settle(pilot)
        assert app.current_mode == "experiments" and app.job is None


async def test_enter_plans_the_job_on_every_host_and_marks_cheapest_and_fastest(world):  # noqa: F811
    app = RunnerApp(world.settings())
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("down", "enter")
        await settle(pilot)
        assert app.current_mode == "plan"
        screen = app.screen
        assert list(screen.plans) == ["local", "rtx4090", "a100", "h100", "spare"]
        text = screen_text(app)
        assert "cheapest" in text and "fastest" in text
        assert "no: unknown" in text  # spare has profile auto and was never probed
        assert "memory on local" in text  # the cursor starts on the cheapest host that fits
        await pilot.press("down")
        await settle(pilot)
        assert "memory on rtx4090" in screen_text(app)


async def test_dispatch_is_refused_on_a_host_that_does_not_fit_and_cancelled_with_n(world):  # noqa: F811
    from tui.screens.dispatch import DispatchScreen

    app = RunnerApp(world.settings())
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.press("down", "enter")
        await settle(pilot)
        await pilot.press("down", "down", "down", "down", "d")  # spare: unknown hardware
        await settle(pilot)
        assert not isinstance(app.screen, DispatchScreen)
        await pilot.press("up", "up", "up", "up", "d")
        await settle(pilot)
        assert isinstance(app.screen, DispatchScreen)
        text = screen_text(app)
        assert "Dispatch quickstart to local?" in text and "budget" in text and "cost cap" in text
        assert "estimate" in text and "time cap 30m" in text
        await pilot.press("n")
        await settle(pilot)
        assert app.current_mode == "plan" and not isinstance(app.screen, DispatchScreen)
    assert not world.store_path.exists() or not _store_runs(world)


async def test_hosts_show_reachability_probe_cache_and_running_jobs(stored):
    app = RunnerApp(stored.settings())
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("1")
        await settle(pilot)
        lines = {line.split()[0]: line for line in screen_text(app).splitlines()[2:7]}
        rows = {name: line.split() for name, line in lines.items()}
        assert rows["local"][1:4] == ["yes", "-", "cpu"] and rows["local"][6] == "1"  # one running job
        assert rows["rtx4090"][1] == "no"  # port 1 refuses
        assert "1.2 GiB/24.0 GiB" in lines["rtx4090"] and "2026-11-20" in lines["rtx4090"]
        assert rows["spare"][3] == "auto"


async def test_a_host_whose_probe_found_an_old_driver_says_why_its_image_cannot_run_there(world):  # noqa: F811
    from dataclasses import replace

    from runner import probe

    found = probe.read_cached("rtx4090")
    probe.save(replace(found, cuda_version="11.8", gpus=(replace(found.gpus[0], driver_version="520.61.05"),)))
    app = RunnerApp(world.settings())
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("1")
        await settle(pilot)
        await pilot.press("down")  # local, then rtx4090
        await settle(pilot)
        text = " ".join(screen_text(app).split())
        assert ("cannot run the cuda-ampere image: driver 520.61.05 runs CUDA 11.8 at most; the cuda-ampere image "
                "runs CUDA 12.6, which needs driver 525.60.13 or newer") in text


async def test_probing_local_fills_in_its_last_probe(world):  # noqa: F811
    app = RunnerApp(world.settings())
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("1")
        await settle(pilot)
        assert screen_text(app).splitlines()[2].split()[-1] == "never"
        await pilot.press("p")
        await settle(pilot, timeout_s=60)
        assert screen_text(app).splitlines()[2].split()[-1] != "never"


async def test_trust_shows_the_fingerprint_and_records_the_key(world, monkeypatch):  # noqa: F811
    from runner import ssh
    from tui.screens.trust import TrustScreen

    key = paramiko.RSAKey.generate(1024)
    presented = ssh.HostKey(host="rtx4090", known_hosts_name="[127.0.0.1]:1", key_type=key.get_name(),
                            fingerprint=ssh.fingerprint(key), key_base64=key.get_base64(), status="unknown")
    monkeypatch.setattr(ssh, "fetch_host_key", lambda ep, timeout_s=15.0: presented)
    app = RunnerApp(world.settings())
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("1")
        await settle(pilot)
        await pilot.press("down", "t")
        await settle(pilot)
        assert isinstance(app.screen, TrustScreen)
        assert presented.fingerprint in screen_text(app)
        await pilot.press("y")
        await settle(pilot)
    assert presented.key_base64 in ssh.runner_known_hosts_path().read_text()


async def test_add_host_shows_form_errors_inline_then_appends_the_host_to_the_inventory(world):  # noqa: F811
    from runner.hosts import load_inventory
    from tui.screens.add_host import AddHostScreen

    before = world.hosts_file.read_text()
    app = RunnerApp(world.settings())
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("1")
        await settle(pilot)
        await pilot.press("a", *"bad name", "enter")
        await settle(pilot)
        assert isinstance(app.screen, AddHostScreen)
        assert "name: use letters, digits" in screen_text(app)
        assert world.hosts_file.read_text() == before
        await pilot.press(*["backspace"] * 8, *"rtx4090", "enter")  # taken: the core says so
        await settle(pilot)
        assert "rtx4090 is already in the inventory" in screen_text(app)
        await pilot.press(*["backspace"] * 7, *"box2", "tab", *"10.1.2.3", "tab", "tab", *"2222", "ctrl+s")
        await settle(pilot)
        assert not isinstance(app.screen, AddHostScreen)
        assert "box2" in app.screen.rows
    assert world.hosts_file.read_text().startswith(before)  # appended: the file's own text is kept
    box = load_inventory(world.hosts_file).hosts["box2"]
    assert (box.address, box.port, box.profile) == ("10.1.2.3", 2222, "auto")


async def test_runs_follow_the_highlighted_run_show_its_directory_and_sync_it(stored):
    app = RunnerApp(stored.settings())
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("4")
        await settle(pilot)
        text = screen_text(app)
        assert "261124-000004 quickstart on local · running" in text
        assert "41%" in text and "990 tokens/s" in text and "ETA 4m" in text
        await pilot.press("l")
        await settle(pilot)
        assert "step     80/196" in screen_text(app)
        await pilot.press("down")
        await settle(pilot)
        text = screen_text(app)
        assert "261124-000003 quickstart on h100 · succeeded" in text and "100%" in text
        await pilot.press("o")
        await settle(pilot)
        assert app.clipboard.endswith("runs/261124-000003")
        await pilot.press("s")  # sync now: the core checks the run against its backend and says where it stands
        await settle(pilot)
        assert any("run 261124-000003: succeeded (budget_reached" in n.message for n in app._notifications)


async def test_resume_of_a_succeeded_run_is_refused_with_the_core_reason(stored):
    app = RunnerApp(stored.settings())
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("4")
        await settle(pilot)
        await pilot.press("down", "u")
        await settle(pilot)
        assert any("nothing to resume" in n.message for n in app._notifications)


async def test_compare_shows_every_host_and_the_verdict(stored):
    app = RunnerApp(stored.settings())
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("5")
        await settle(pilot)
        text = screen_text(app)
        for host in ("local", "rtx4090", "h100"):
            assert f"quickstart  {host}" in text
        assert "fastest: h100" in text
        await pilot.press("g")
        await settle(pilot)
        assert "by profile" in screen_text(app)


def test_the_loss_plot_draws_at_most_300_points_spread_over_the_run_and_always_the_newest():
    from tui.screens.runs import PLOT_POINTS, _thin

    events = [{"tokens": i} for i in range(10_000)]
    thinned = _thin(events)
    assert len(thinned) == PLOT_POINTS
    assert thinned[0]["tokens"] == 0 and thinned[-1]["tokens"] == 9_999
    assert max(b["tokens"] - a["tokens"] for a, b in zip(thinned, thinned[1:])) <= 10_000 / PLOT_POINTS + 1
    assert _thin(events[:50]) == events[:50]


async def test_the_palette_reaches_every_screen_and_the_current_screens_actions(world):  # noqa: F811
    app = RunnerApp(world.settings())
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("1")
        await settle(pilot)
        titles = [c.title for c in app.get_system_commands(app.screen)]
        assert {"Go to Hosts", "Go to Experiments", "Go to Plan", "Go to Runs", "Go to Compare"} <= set(titles)
        assert {"Add host", "Trust key", "Probe", "Reload"} <= set(titles)
        await pilot.press("ctrl+p")
        await pilot.press(*"go to runs")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await settle(pilot)
        assert app.current_mode == "runs"


async def test_the_mouse_switches_screens_from_the_top_line(world):  # noqa: F811
    app = RunnerApp(world.settings())
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(pilot)
        await pilot.click("#nav", offset=(3, 0))
        await settle(pilot)
        assert app.current_mode == "hosts"


async def _wait_for(pilot, text: str, timeout_s: float) -> str:
    for _ in range(int(timeout_s * 10)):
        await pilot.pause(0.1)
        if text in screen_text(pilot.app):
            break
    screen = screen_text(pilot.app)
    assert text in screen, screen
    return screen


def app_on_this_machine(tmp_path, monkeypatch, *sets: str) -> RunnerApp:
    """The app over the repository's jobs, with local as the only host and a fresh store, under --set ``sets``."""
    from tui.app import Settings

    for name in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("RUNNER_HOME", str(tmp_path / "runner-home"))
    hosts_file = tmp_path / "hosts.yaml"
    hosts_file.write_text("hosts:\n  local:\n    profile: cpu\n")
    return RunnerApp(Settings(jobs_dir=REPO / "jobs", hosts_file=hosts_file, store_path=tmp_path / "runs.db",
                              sets=sets))


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_dispatch_quickstart_to_local_cancel_resume_watch_it_finish_and_compare_it(tmp_path, monkeypatch):
    """The whole loop on this machine: pick jobs/quickstart.yaml, plan, dispatch, cancel, resume, watch, compare.

    The native backend keeps it short (no image to build); a small budget comes in
    through the same --set overrides as on the command line. The cancel lands after
    the first logged step (logged every 2 of 15), so the resume continues from the
    checkpoint the cancel wrote.
    """
    app = app_on_this_machine(tmp_path, monkeypatch, "budget.tokens=30k", "backend=native", "train.log_every_steps=2")
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        options = app.screen.query_one("OptionList")
        options.highlighted = next(i for i in range(options.option_count)
                                   if options.get_option_at_index(i).id.endswith("quickstart.yaml"))
        await pilot.press("enter")
        await settle(pilot)
        assert app.current_mode == "plan"
        await pilot.press("d")
        await settle(pilot)
        await pilot.press("y")
        await _wait_for(pilot, "quickstart on local · running", 60)
        await _wait_for(pilot, "· step ", 60)  # the trainer has logged a step: cancel it mid-run
        await pilot.press("c")
        await _wait_for(pilot, "quickstart on local · cancelled", 60)
        await pilot.press("u")
        text = await _wait_for(pilot, "quickstart on local · succeeded", 120)
        assert "100%" in text
        await pilot.press("l")
        await _wait_for(pilot, "--- attempt 2: continues from step-", 5)
        await pilot.press("5")
        await settle(pilot)
        text = screen_text(app)
        assert "quickstart  local" in text and "cheapest to reach" in text, text
    run = _store_runs_at(tmp_path / "runs.db")[0]
    assert (run.state, run.attempt) == ("succeeded", 2) and run.reason.startswith("budget_reached")


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_probe_runs_the_planned_job_on_the_host_and_the_plan_is_calibrated_by_it(tmp_path, monkeypatch):
    # What settles a plan at the limit of a GPU (its outcome decides there), and calibrates its time anywhere.
    app = app_on_this_machine(tmp_path, monkeypatch, "backend=native")
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(pilot)
        app.choose_job(JobChoice(REPO / "jobs" / "quickstart.yaml"))
        await settle(pilot)
        assert app.screen.plans["local"].throughput_source.startswith("catalog default")
        await pilot.press("p")
        for _ in range(900):  # three short runs (its micro-batch, half and a quarter), then the plan is made again
            await pilot.pause(0.2)
            if app.screen.plans["local"].throughput_source.startswith("calibrated from 3 probes on local"):
                break
        assert app.screen.plans["local"].throughput_source.startswith("calibrated from 3 probes on local")
    from runner import capacity
    from runner.store import Store

    store = Store.open(tmp_path / "runs.db")
    try:
        assert sorted(o.micro_batch for o in capacity.probe_observations(store)) == [4, 8, 16]
    finally:
        store.close()


def _store_runs(world) -> list:  # noqa: F811
    return _store_runs_at(world.store_path)


def _store_runs_at(path) -> list:
    from runner.store import Store

    store = Store.open(path)
    try:
        return store.runs()
    finally:
        store.close()
