"""Two hosts, one torchrun each, a rendezvous on the first: DDP over gloo between two SSH test hosts.

Each test host is its own network namespace, user and sshd (tests/sshhosts.py).
The torchruns are started over SSH with the command lines ``runner.launch``
builds; ranks on different hosts reach each other only through the hosts'
addresses, routed through this machine for the length of the test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import pytest

from runner import ssh
from runner.launch import RENDEZVOUS_PORT, launch_env, node_argvs
from sshhosts import known_hosts_line
from test_distributed_train import resolved_run, train_losses

pytestmark = [pytest.mark.ssh, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
# The test users cannot enter root's home, where this virtual environment's interpreter lives; the
# system Python of the same minor version runs the same packages from the environment's site-packages.
REMOTE_PYTHON = "/usr/bin/python3"


def remote_python_available() -> bool:
    try:
        out = subprocess.run([REMOTE_PYTHON, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
    except OSError:
        return False
    return out == str(sys.version_info[:2])


@pytest.fixture
def routed(ssh_hosts):
    """Routes (and forwarding rules) between the two hosts' subnets, removed afterwards."""
    a, b = ssh_hosts[:2]
    gateway = {h.name: h.address.rsplit(".", 1)[0] + ".1" for h in (a, b)}
    subnet = {h.name: h.address.rsplit(".", 1)[0] + ".0/24" for h in (a, b)}
    undo = []
    try:
        for here, there in ((a, b), (b, a)):
            subprocess.run(["ip", "-n", here.namespace, "route", "add", subnet[there.name], "via",
                            gateway[here.name]], check=True)
            undo.append(["ip", "-n", here.namespace, "route", "del", subnet[there.name]])
            rule = ["FORWARD", "-i", here.veth_host, "-o", there.veth_host, "-j", "ACCEPT"]
            subprocess.run(["iptables", "-I", *rule], check=True)
            undo.append(["iptables", "-D", *rule])
        yield a, b
    finally:
        for command in reversed(undo):
            subprocess.run(command, check=False)


@pytest.fixture
def connections(routed, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    known = ssh.runner_known_hosts_path()
    known.parent.mkdir(parents=True)
    known.write_text("".join(known_hosts_line(h) + "\n" for h in routed))
    conns = [ssh.connect(ssh.Endpoint(name=h.name, hostname=h.address, port=h.port, user=h.user,
                                      key_paths=(str(h.client_key_path),), identities_only=True)) for h in routed]
    yield list(zip(routed, conns))
    for conn in conns:
        conn.close()


def test_a_job_over_two_hosts_trains_as_one_ddp_run_with_rank_0_on_the_first(connections, tmp_path):
    if not remote_python_available():
        pytest.skip(f"{REMOTE_PYTHON} is missing or not Python {sys.version_info[0]}.{sys.version_info[1]}")
    # one process on each of two hosts, with the global batch of the single-process run
    resolved = resolved_run(2).model_copy(update={"gpus": 1, "nodes": 2})
    first = connections[0][0]
    argvs = node_argvs(REMOTE_PYTHON, "plan.json", "run", gpus=1, addresses=[h.address for h, _ in connections],
                       port=RENDEZVOUS_PORT)
    env = {"PYTHONPATH": f"{sysconfig.get_paths()['purelib']}:{REPO}", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **launch_env(60)}
    results: dict[str, ssh.CommandResult] = {}

    def start(host, conn, argv) -> None:
        sftp = conn.sftp()
        with sftp.open(f"{host.home}/plan.json", "wb") as f:
            f.write(resolved.model_dump_json().encode())
        command = ["sh", "-c", 'cd "$1" && shift && exec env "$@"', "sh", str(host.home),
                   f"RUNNER_CACHE_DIR={host.home}/cache", *(f"{k}={v}" for k, v in env.items()), *argv]
        results[host.name] = ssh.run(conn, command, timeout_s=240)

    threads = [threading.Thread(target=start, args=(host, conn, argv))
               for (host, conn), argv in zip(connections, argvs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for host, _ in connections:
        result = results[host.name]
        assert result.exit_code == 0, (host.name, result.text()[-3000:], result.stderr.decode(errors="replace")[-3000:])

    first_out = results[first.name].text()
    assert "training 8 steps, 2048 tokens on cpu x 2 processes (DDP)" in first_out
    run_dir = first.home / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["exit_reason"] == "budget_reached" and summary["tokens"] == 2048
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000004", "step-0000008"]
    second = connections[1][0].home / "run"
    assert not (second / "summary.json").exists() and not (second / "checkpoints").exists()  # rank 1 writes nothing
    # the same global batch as one process: the same losses
    from runner.trainer.loop import train

    single_dir = tmp_path / "single"
    assert train(resolved_run(1), single_dir).exit_reason == "budget_reached"
    single, two_hosts = train_losses(single_dir), train_losses(run_dir)
    for step in single:
        assert two_hosts[step] == pytest.approx(single[step], rel=1e-3, abs=1e-4), step
