"""Fixtures shared by the whole suite: a real Docker Engine, real SSH test hosts, a private HOME.

Integration fixtures skip with the reason when their infrastructure cannot be
had, except in CI (the CI environment variable is set), where they fail, so a
broken machine cannot pass by skipping everything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import docker
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Containers a test starts carry this label; the docker_engine fixture removes them, and only them.
TEST_CONTAINER_LABEL = "runner.test=1"

# Test modules import the test-host library as `sshhosts`, whichever import mode pytest uses.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sshhosts import SSHTestHost, make_hosts  # noqa: E402


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


def _ensure(script: str) -> None:
    """Run one of scripts/ensure-*.sh; skip or fail with its output when it cannot do its job."""
    result = subprocess.run([str(REPO_ROOT / "scripts" / script)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        not_root = "" if os.geteuid() == 0 else " (not running as root)"
        output = (result.stdout + result.stderr).strip().splitlines()[-15:]
        _unavailable(f"scripts/{script} failed{not_root}:\n" + "\n".join(output))


def _remove_test_containers(client: docker.DockerClient) -> None:
    for container in client.containers.list(all=True, filters={"label": TEST_CONTAINER_LABEL}):
        container.remove(force=True)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[docker.DockerClient]:
    """A docker.DockerClient for a running engine that has runner-base and runner-python images.

    Label every container a test starts with ``runner.test=1``; those are removed when the test run ends.
    """
    _ensure("ensure-docker.sh")
    client = docker.from_env()
    _remove_test_containers(client)  # left over from a run that was killed
    yield client
    _remove_test_containers(client)
    client.close()


@pytest.fixture(scope="session")
def ssh_hosts() -> Iterator[list[SSHTestHost]]:
    """Two SSH test hosts (tests/sshhosts.py) shared by the whole test run.

    A test that changes one (link_down, stop_sshd, rotate_host_key) restores it before it ends.
    """
    if os.geteuid() != 0:
        _unavailable("SSH test hosts need root (network namespaces, useradd)")
    _ensure("ensure-sshd.sh")
    with make_hosts(2) as hosts:
        yield hosts


@pytest.fixture
def tmp_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh HOME for CLI tests, with XDG_CONFIG_HOME, XDG_DATA_HOME and RUNNER_HOME inside it."""
    home = tmp_path / "home"
    locations = {
        "HOME": home,
        "XDG_CONFIG_HOME": home / ".config",
        "XDG_DATA_HOME": home / ".local" / "share",
        "RUNNER_HOME": home / ".runner",
    }
    for variable, path in locations.items():
        path.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(variable, str(path))
    return home
