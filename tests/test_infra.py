"""The test infrastructure itself: a real Docker Engine and real SSH test hosts that clean up after themselves."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import paramiko
import pytest

from conftest import TEST_SESSION
from sshhosts import SSHTestHost, known_hosts_line, make_hosts

LINK_DOWN_CONNECT_TIMEOUT_S = 1.5


def _login(host: SSHTestHost, known_hosts: Path) -> paramiko.SSHClient:
    """Log in as the host's user, trusting only the host keys listed in known_hosts."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        host.address,
        port=host.port,
        username=host.user,
        key_filename=str(host.client_key_path),
        look_for_keys=False,
        timeout=5,
    )
    return client


def _run(client: paramiko.SSHClient, command: str) -> str:
    _, stdout, _ = client.exec_command(command, timeout=10)
    output = stdout.read().decode()
    assert stdout.channel.recv_exit_status() == 0, f"{command!r} failed: {output}"
    return output


def _known_hosts(tmp_path: Path, host: SSHTestHost) -> Path:
    path = tmp_path / "known_hosts"
    path.write_text(known_hosts_line(host) + "\n")
    return path


@pytest.mark.docker
def test_python_image_runs_python3_in_a_container(docker_engine):
    container = docker_engine.containers.run(
        "runner-python:bookworm",
        ["python3", "-c", "print(1+1)"],
        labels={"runner.test": TEST_SESSION},
        detach=True,
    )
    try:
        assert container.wait(timeout=60)["StatusCode"] == 0
        assert container.logs().decode().strip() == "2"
    finally:
        container.remove(force=True)


@pytest.mark.ssh
def test_ssh_host_accepts_a_key_login_verified_against_its_host_key(ssh_hosts, tmp_path):
    host = ssh_hosts[0]
    with _login(host, _known_hosts(tmp_path, host)) as client:
        assert _run(client, "whoami").strip() == host.user
        assert _run(client, "pwd").strip() == str(host.home)


@pytest.mark.ssh
def test_ssh_hosts_are_separate_machines(ssh_hosts):
    first, second = ssh_hosts
    assert len({first.address, second.address}) == 2
    assert len({first.user, second.user}) == 2
    assert first.host_public_key != second.host_public_key
    assert first.run_as_user("whoami").stdout.strip() == first.user


@pytest.mark.ssh
def test_rotated_host_key_is_rejected_until_known_hosts_is_updated(ssh_hosts, tmp_path):
    host = ssh_hosts[1]
    known_hosts = _known_hosts(tmp_path, host)
    host.rotate_host_key()
    with pytest.raises(paramiko.BadHostKeyException):
        _login(host, known_hosts)
    with _login(host, _known_hosts(tmp_path, host)) as client:
        assert _run(client, "whoami").strip() == host.user


@pytest.mark.ssh
def test_link_down_makes_connects_time_out_and_link_up_restores_them(ssh_hosts, tmp_path):
    host = ssh_hosts[0]
    host.link_down()
    try:
        with pytest.raises(TimeoutError):
            socket.create_connection((host.address, host.port), timeout=LINK_DOWN_CONNECT_TIMEOUT_S)
    finally:
        host.link_up()
    with _login(host, _known_hosts(tmp_path, host)) as client:
        assert _run(client, "echo back").strip() == "back"


@pytest.mark.ssh
def test_stopped_sshd_refuses_connections_until_started(ssh_hosts):
    host = ssh_hosts[1]
    host.stop_sshd()
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host.address, host.port), timeout=2)
    finally:
        host.start_sshd()
    socket.create_connection((host.address, host.port), timeout=2).close()


@pytest.mark.docker
@pytest.mark.ssh
def test_ssh_host_user_can_use_the_docker_engine(docker_engine, ssh_hosts):
    result = ssh_hosts[0].run_as_user("docker image inspect --format '{{.Id}}' runner-python:bookworm")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("sha256:")


@pytest.mark.ssh
@pytest.mark.usefixtures("ssh_hosts")  # for its checks of root and sshd, and its skip-or-fail policy
def test_make_hosts_tears_everything_down_even_when_the_test_fails(tmp_path):
    with pytest.raises(RuntimeError, match="test failed"):
        with make_hosts(1) as (host,):
            with _login(host, _known_hosts(tmp_path, host)) as client:
                _run(client, "nohup sleep 600 >/dev/null 2>&1 &")
            sshd_pid = host.sshd_pid
            leftover = host.run_as_user("pgrep -u \"$USER\" -x sleep").stdout.split()
            assert leftover, "the background process did not start"
            raise RuntimeError("test failed")

    assert host.namespace not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not Path("/sys/class/net", host.veth_host).exists()
    for pid in [sshd_pid, *map(int, leftover)]:
        assert not _runs(pid), f"process {pid} survived teardown"
    assert subprocess.run(["id", host.user], capture_output=True).returncode != 0
    assert not host.workdir.exists()


def _runs(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
