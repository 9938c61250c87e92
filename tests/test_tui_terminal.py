"""The app in a real terminal: started under tmux at 80x24, driven with keys, read back from the pane."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest
from test_tui_world import REPO, fill_store, world  # noqa: F401  (world is a fixture)

pytestmark = pytest.mark.timeout(90)


def _tmux(socket: str, *args: str) -> str:
    return subprocess.run(["tmux", "-L", socket, *args], capture_output=True, text=True, check=True).stdout


def _wait_for(socket: str, text: str, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    screen = ""
    while time.monotonic() < deadline:
        screen = _tmux(socket, "capture-pane", "-p", "-t", "tui")
        if text in screen:
            return screen
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared; the pane shows:\n{screen}")


def test_runner_tui_starts_in_a_terminal_switches_screens_by_key_and_quits(world, monkeypatch):  # noqa: F811
    if shutil.which("tmux") is None:
        if os.environ.get("CI"):
            pytest.fail("tmux is missing on CI")
        pytest.skip("tmux is not installed")
    fill_store(world, monkeypatch)
    env = {name: os.environ[name] for name in ("HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME",
                                               "RUNNER_HOME", "RUNNER_HOSTS")}
    env.update(TERM="xterm-256color", PYTHONPATH=str(REPO))
    command = " ".join(["env", *(f"{k}={shlex.quote(v)}" for k, v in env.items()),
                        shlex.quote(sys.executable), "-m", "runner.cli", "tui", shlex.quote(str(world.jobs_dir)),
                        "--store", shlex.quote(str(world.store_path))])
    socket = f"runner-tui-test-{os.getpid()}"  # a tmux server of our own, removed at the end
    _tmux(socket, "new-session", "-d", "-s", "tui", "-x", "80", "-y", "24", command)
    try:
        screen = _wait_for(socket, "quickstart.yaml")
        assert "line 8:3  train.batch_sise" in screen
        _tmux(socket, "send-keys", "-t", "tui", "1")
        screen = _wait_for(socket, "reach")
        assert "rtx4090" in screen and "Probe" in screen
        _tmux(socket, "send-keys", "-t", "tui", "4")
        screen = _wait_for(socket, "261124-000004 quickstart on local")
        _tmux(socket, "send-keys", "-t", "tui", "q")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if subprocess.run(["tmux", "-L", socket, "has-session", "-t", "tui"], capture_output=True).returncode:
                break  # the app quit, and its pane and session with it
            time.sleep(0.2)
        else:
            raise AssertionError("the app did not quit on q")
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)
