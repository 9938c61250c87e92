"""Fixtures shared by the whole suite: a real Docker Engine, real SSH test hosts, a private HOME.

Integration fixtures skip with the reason when their infrastructure cannot be
had, except in CI (the CI environment variable is set), where they fail, so a
broken machine cannot pass by skipping everything.
"""

from __future__ import annotations

import os
import subprocess
import time
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import docker
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Containers a test starts carry the label runner.test=<this session's id> (the docker backend adds it
# from RUNNER_TEST_LABEL); the docker_engine fixture removes this session's, and those of sessions that
# are gone, never those of a test session running beside this one.
TEST_SESSION = str(os.getpid())
os.environ["RUNNER_TEST_LABEL"] = TEST_SESSION

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


def _session_alive(session: str) -> bool:
    try:
        return b"pytest" in Path(f"/proc/{int(session)}/cmdline").read_bytes()
    except (ValueError, OSError):
        return False


def _remove_test_containers(client: docker.DockerClient, *, ours: bool) -> None:
    """Remove this session's test containers (ours) or those left by sessions that are gone."""
    for container in client.containers.list(all=True, filters={"label": "runner.test"}):
        session = container.labels.get("runner.test", "")
        if (session == TEST_SESSION) if ours else (session != TEST_SESSION and not _session_alive(session)):
            container.remove(force=True)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[docker.DockerClient]:
    """A docker.DockerClient for a running engine that has runner-base and runner-python images.

    Label every container a test starts with ``runner.test=TEST_SESSION``; those are removed when the test
    run ends.
    """
    _ensure("ensure-docker.sh")
    client = docker.from_env()
    _remove_test_containers(client, ours=False)  # left over from a run that was killed
    yield client
    _remove_test_containers(client, ours=True)
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


# Build every trainer image on the local base with the wheels in the build context: no registry is reachable.
OFFLINE_IMAGE_ENV = {"RUNNER_BASE_IMAGE": "runner-python:bookworm", "RUNNER_IMAGE_OFFLINE": "1"}


@pytest.fixture(scope="session")
def trainer_image(docker_engine: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The CPU trainer image of this source tree, built offline unless its tag exists; its tag.

    ``images.ensure_image`` fetches the wheels into the build context first (once per requirements).

    Tests that dispatch to docker set OFFLINE_IMAGE_ENV too, so the runner picks this same tag.
    """
    from runner import images

    ref = images.image_for(images.load_images().get("cpu"), REPO_ROOT, {**os.environ, **OFFLINE_IMAGE_ENV})
    log = tmp_path_factory.mktemp("build") / "build.log"
    started = time.monotonic()
    try:
        built = images.ensure_image(docker_engine, ref, log)
    except images.BuildFailed as exc:
        pytest.fail(f"{exc.render()}\n{log.read_text()[-3000:]}", pytrace=False)
    print(f"\ntrainer image {ref.tag}: {'built' if built else 'reused'} in {time.monotonic() - started:.1f}s")
    return ref.tag


@pytest.fixture
def tmp_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh HOME for CLI tests, with XDG_CONFIG_HOME, XDG_DATA_HOME, XDG_CACHE_HOME and RUNNER_HOME inside it."""
    home = tmp_path / "home"
    locations = {
        "HOME": home,
        "XDG_CONFIG_HOME": home / ".config",
        "XDG_DATA_HOME": home / ".local" / "share",
        "XDG_CACHE_HOME": home / ".cache",
        "RUNNER_HOME": home / ".runner",
    }
    for variable, path in locations.items():
        path.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(variable, str(path))
    return home
