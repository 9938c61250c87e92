"""One job over two hosts through ``runner run``: a torchrun per host, a rendezvous on the first, DDP over gloo.

Each test host is its own network namespace, user and sshd (tests/sshhosts.py),
and runs the trainer natively (``backend: native``): this machine's Docker
Engine is not inside the hosts' namespaces, so its containers could not reach
each other at the hosts' addresses. Ranks on different hosts meet only through
those addresses, routed through this machine for the length of the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

from runner import dispatch, ssh
from runner.backends.ssh import node_handles
from runner.cli import main
from runner.resolved import ResolvedRun
from runner.store import Store
from sshhosts import known_hosts_line
from test_distributed_train import train_losses

pytestmark = [pytest.mark.ssh, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
# The test users cannot enter root's home, where this virtual environment's interpreter lives; the
# system Python of the same minor version runs the same packages from the environment's site-packages.
SYSTEM_PYTHON = "/usr/bin/python3"


def system_python_matches() -> bool:
    try:
        out = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
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
def host_python():
    """An interpreter both test users can run, with this tree and its environment's packages (a .pth file)."""
    if not system_python_matches():
        pytest.skip(f"{SYSTEM_PYTHON} is missing or not Python {sys.version_info[0]}.{sys.version_info[1]}")
    root = Path(tempfile.mkdtemp(prefix="runner-host-python-"))
    try:
        root.chmod(0o755)
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
        site = Path(subprocess.run([str(root / "venv" / "bin" / "python"), "-c",
                                    "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
        (site / "runner-test.pth").write_text(f"{sysconfig.get_paths()['purelib']}\n{REPO}\n")
        yield str(root / "venv" / "bin" / "python")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def native_hosts(routed, host_python, tmp_home, monkeypatch):
    """Both hosts as `backend: native` in a fresh hosts.yaml, trusted; quick syncs."""
    inventory = tmp_home / "hosts.yaml"
    lines = ["hosts:"]
    for host in routed:
        lines += [f"  {host.name}:", f"    address: {host.address}", f"    user: {host.user}",
                  f"    key: {host.client_key_path}", "    profile: cpu", "    backend: native",
                  f"    python: {host_python}"]
    inventory.write_text("\n".join(lines) + "\n")
    known = ssh.runner_known_hosts_path()
    known.parent.mkdir(parents=True, exist_ok=True)
    known.write_text("".join(known_hosts_line(h) + "\n" for h in routed))
    for name, value in {"RUNNER_HOSTS": str(inventory), "RUNNER_SYNC_EVERY_S": "2", "OMP_NUM_THREADS": "1",
                        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, value)
    dispatch._BACKENDS.pop("ssh", None)
    yield routed
    backend = dispatch._BACKENDS.pop("ssh", None)
    if backend is not None:
        store = Store.open()
        for run in store.runs(states={"starting", "running", "stopping"}):
            if run.handle:
                backend.release(run.handle)  # a failed test's nodes stop now, not at the session's end
        store.close()
        backend.close()


def two_host_job(path: Path, hosts: list[str], tokens: int = 2048, checkpoint_every: int = 4) -> Path:
    """The distributed trainer tests' tiny job: 8 rows a step over all processes (2 x 2 accumulation x 2 hosts)."""
    job = {
        "name": "two-hosts", "model": {"preset": "tiny", "overrides": {"hidden": 64, "layers": 2, "heads": 2,
                                                                      "intermediate": 128, "vocab_size": 512}},
        "data": {"sources": [{"path": str(REPO / "data/sample/news.jsonl")},
                             {"path": str(REPO / "data/sample/reports.parquet")}],
                 "mixture": "sqrt", "seq_len": 32, "validation": 0.02},
        "train": {"lr": 3e-3, "warmup_steps": 2, "log_every_steps": 1, "deterministic": True, "seed": 9,
                  "batch_size": 2, "grad_accum": 2, "gpus": 1, "nodes": 2, "distributed_on_cpu": True},
        "budget": {"tokens": tokens},
        "checkpoint": {"every_steps": checkpoint_every, "keep_last": 10},
        "eval": {"on_start": False, "every_steps": 4, "max_batches": 2},
        "hosts": hosts,
    }
    path.write_text(json.dumps(job))  # JSON is YAML
    return path


def test_runner_run_spreads_a_two_node_job_over_two_hosts_and_matches_one_process(native_hosts, tmp_path, capfd):
    a, b = native_hosts
    job = two_host_job(tmp_path / "two-hosts.yaml", [a.name, b.name])
    assert main(["run", str(job), "--wait"]) == 0
    err = capfd.readouterr().err
    store = Store.open()
    (run,) = store.runs()
    store.close()
    assert run.state == "succeeded" and run.host == a.name, (run.state, run.reason, err[-3000:])
    assert [(h, p.startswith("pid-")) for h, p in node_handles(run.handle)] == [(a.name, True), (b.name, True)]
    local = Path(run.run_dir)
    log = (local / "logs" / "train.log").read_text()
    assert "training 8 steps, 2048 tokens on cpu x 2 processes (DDP)" in log, log[-3000:]
    # rank 0's host holds the run directory; node 1's log comes home beside it, and it wrote nothing else
    remote_a, remote_b = (h.home / ".runner" / "runs" / run.id for h in (a, b))
    assert (local / "logs" / "node-1.log").read_bytes() == (remote_b / "logs" / "node-1.log").read_bytes()
    assert not (remote_b / "summary.json").exists() and not (remote_b / "checkpoints").exists()
    assert not (remote_b / "metrics.jsonl").exists()
    assert (local / "summary.json").read_bytes() == (remote_a / "summary.json").read_bytes()
    assert sorted(p.name for p in (local / "checkpoints").iterdir()) == ["step-0000004", "step-0000008"]
    # the same global batch in one process: the same losses
    from runner.trainer.loop import train

    resolved = ResolvedRun.model_validate_json(run.resolved_json)
    stages = [s.model_copy(update={"micro_batch": s.micro_batch * 2}) for s in resolved.stages]
    single = resolved.model_copy(update={"nodes": 1, "stages": stages, "host": "local"})
    assert train(single, tmp_path / "single").exit_reason == "budget_reached"
    one, two = train_losses(tmp_path / "single"), train_losses(local)
    assert sorted(one) == sorted(two) == list(range(1, 9))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-3, abs=1e-4), step


def start_long_run(hosts, tmp_path) -> tuple[str, list[int], Path]:
    """A detached two-host run far from its end, once rank 0 has logged a step: its id, pids (process groups), dir."""
    a, b = hosts
    # no checkpoint until it is stopped: none is written, and none rotated away, while the test looks on
    job = two_host_job(tmp_path / "long.yaml", [a.name, b.name], tokens=2_000_000, checkpoint_every=100_000)
    assert main(["run", str(job), "--detach"]) == 0
    store = Store.open()
    (run,) = store.runs()
    store.close()
    metrics = a.home / ".runner" / "runs" / run.id / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while not (metrics.is_file() and '"train"' in metrics.read_text()):
        assert time.monotonic() < deadline, "rank 0 logged no step in 90 s"
        time.sleep(0.5)
    return run.id, [int(p.removeprefix("pid-")) for _, p in node_handles(run.handle)], Path(run.run_dir)


def process_group_ends(pgid: int, within_s: float = 30) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_cancelling_a_two_host_run_stops_both_nodes_after_a_checkpoint(native_hosts, tmp_path):
    run_id, pids, local = start_long_run(native_hosts, tmp_path)
    assert main(["cancel", run_id, "--grace", "60"]) == 0
    store = Store.open()
    run = store.get(run_id)
    store.close()
    assert run.state == "cancelled", run.reason
    assert all(process_group_ends(pid) for pid in pids)
    summary = json.loads((local / "summary.json").read_text())
    assert summary["exit_reason"] == "cancelled" and (local / "checkpoints" / Path(summary["checkpoint"]).name).is_dir()


def test_a_node_whose_process_vanishes_marks_the_run_lost_and_the_other_node_is_stopped(native_hosts, tmp_path):
    run_id, pids, _ = start_long_run(native_hosts, tmp_path)
    os.killpg(pids[1], signal.SIGKILL)  # host b's supervisor and torchrun, as a reboot would
    store = Store.open()
    run = dispatch.wait(store, run_id, poll_s=0.5)
    store.close()
    assert run.state == "lost", run.reason
    assert f"node 1 on {native_hosts[1].name}" in run.reason and "vanished" in run.reason
    assert process_group_ends(pids[0])
