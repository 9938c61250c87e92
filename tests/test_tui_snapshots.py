"""Snapshots of every screen at 80x24, from a fixed inventory, probe cache, job directory and run store."""

from __future__ import annotations

import pytest
from test_tui_world import fill_store, settle, world  # noqa: F401  (world is a fixture)

from tui.app import RunnerApp


def go(*keys: str):
    async def run_before(pilot) -> None:
        await settle(pilot)
        for key in keys:
            await pilot.press(key)
            await settle(pilot)
    return run_before


@pytest.fixture
def stored(world, monkeypatch):  # noqa: F811
    fill_store(world, monkeypatch)
    return world


def test_experiments_screen_shows_errors_by_line(snap_compare, world):  # noqa: F811
    assert snap_compare(RunnerApp(world.settings()), run_before=go())


def test_experiments_screen_previews_a_valid_job(snap_compare, world):  # noqa: F811
    assert snap_compare(RunnerApp(world.settings()), run_before=go("down"))


def test_hosts_screen(snap_compare, stored):
    assert snap_compare(RunnerApp(stored.settings()), run_before=go("1"))


def test_add_host_form(snap_compare, world):  # noqa: F811
    async def run_before(pilot) -> None:
        await go("1", "a")(pilot)
        for field in pilot.app.screen.query("Input"):
            field.cursor_blink = False  # a blinking cursor would make the picture depend on the moment
        await pilot.pause()

    assert snap_compare(RunnerApp(world.settings()), run_before=run_before)


def test_trust_dialog_for_a_changed_key(snap_compare, world, monkeypatch):  # noqa: F811
    from runner import ssh

    presented = ssh.HostKey(host="rtx4090", known_hosts_name="[127.0.0.1]:1", key_type="ssh-ed25519",
                            fingerprint="SHA256:7r2QxkVnXJ0a3bq8m1Yt5WcZ9uHfLpEoR4sKdNgA6iI", key_base64="AAAA",
                            status="changed", known_fingerprints=("SHA256:Qm9vZnR5LXRlc3Qta2V5LWZpbmdlcnByaW50MDA",))
    monkeypatch.setattr(ssh, "fetch_host_key", lambda ep, timeout_s=15.0: presented)
    assert snap_compare(RunnerApp(world.settings()), run_before=go("1", "down", "t"))


def test_plan_screen_marks_cheapest_and_fastest(snap_compare, world):  # noqa: F811
    assert snap_compare(RunnerApp(world.settings()), run_before=go("down", "enter"))


def test_plan_screen_at_120x40(snap_compare, world):  # noqa: F811
    assert snap_compare(RunnerApp(world.settings()), terminal_size=(120, 40), run_before=go("down", "enter"))


def test_dispatch_confirmation(snap_compare, world):  # noqa: F811
    assert snap_compare(RunnerApp(world.settings()), run_before=go("down", "enter", "d"))


def test_runs_screen_loss_plot(snap_compare, stored):
    assert snap_compare(RunnerApp(stored.settings()), run_before=go("4"))


def test_runs_screen_log_tail(snap_compare, stored):
    assert snap_compare(RunnerApp(stored.settings()), run_before=go("4", "l"))


def test_compare_screen(snap_compare, stored):
    assert snap_compare(RunnerApp(stored.settings()), run_before=go("5"))
