"""`runner plan` and `runner run` for several processes: torchrun natively and in the container, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import OFFLINE_IMAGE_ENV

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = "jobs/quickstart.yaml"
# The quickstart as two gloo processes of 4 sequences each: 4 steps of 1,024 tokens.
TWO_PROCESSES = ["--set", "train.batch_size=4", "--set", "budget.tokens=5k", "--set", "checkpoint.every_steps=2",
                 "--set", "eval.every_steps=5", "--set", "eval.max_batches=2", "--set", "train.gpus=2",
                 "--set", "train.distributed_on_cpu=true"]


def runner_cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def env(tmp_home: Path) -> dict[str, str]:
    return {**os.environ, **OFFLINE_IMAGE_ENV, "OMP_NUM_THREADS": "1"}


def check_two_process_run(result: subprocess.CompletedProcess, backend: str) -> None:
    assert result.returncode == 0, result.stderr
    [run] = json.loads(result.stdout)
    assert run["state"] == "succeeded" and run["backend"] == backend
    assert run["summary"]["steps"] == 4 and run["summary"]["tokens"] == 4 * 2 * 4 * 128
    run_dir = Path(run["run_dir"])
    log = (run_dir / "logs" / "train.log").read_text()
    assert "training 4 steps, 4096 tokens on cpu x 2 processes (DDP)" in log
    assert log.count("done: budget_reached") == 1  # rank 0 alone reports
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-0000002", "step-0000004"]
    resolved = json.loads((run_dir / "resolved.json").read_text())
    assert (resolved["gpus"], resolved["parallelism"]) == (2, "ddp")


def test_plan_json_says_ddp_and_why_for_two_cpu_processes(env):
    result = runner_cli("plan", QUICKSTART, "--json", *TWO_PROCESSES, env=env)
    assert result.returncode == 0, result.stderr
    [job] = json.loads(result.stdout)
    [plan] = job["plans"]
    assert plan["parallelism"] == "ddp" and plan["gpus"] == 2
    assert plan["parallelism_reason"].startswith("DDP: a full copy of the model and its states fits one GPU")


def test_plan_says_how_many_processes_and_why_ddp(env):
    result = runner_cli("plan", QUICKSTART, *TWO_PROCESSES, env=env)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # rich wraps long lines
    assert "local: 2 processes, the batch is per process; DDP: a full copy of the model and its states fits one GPU" \
        in text


def test_two_processes_on_a_cpu_host_are_refused_without_the_gloo_test_switch(env):
    result = runner_cli("run", QUICKSTART, "--backend", "native", "--wait", *TWO_PROCESSES[:-2], env=env)
    assert result.returncode == 3
    assert "a CPU host has none" in result.stderr and "distributed_on_cpu" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_runner_run_starts_torchrun_natively_with_two_gloo_processes(env):
    check_two_process_run(runner_cli("run", QUICKSTART, "--backend", "native", "--wait", "--json", *TWO_PROCESSES,
                                     env=env), "native")


@pytest.mark.docker
@pytest.mark.slow
def test_runner_run_starts_torchrun_in_the_container_with_two_gloo_processes(docker_engine, trainer_image, env):
    check_two_process_run(runner_cli("run", QUICKSTART, "--backend", "docker", "--wait", "--json", *TWO_PROCESSES,
                                     env=env), "docker")


def test_runner_run_refuses_a_job_over_two_hosts_with_this_machine_among_them_before_anything_starts(env, tmp_path):
    (tmp_path / "d.txt").write_text("some text\n" * 100)
    job = tmp_path / "two-hosts.yaml"
    job.write_text("name: tn\nmodel: tiny\ndata: {sources: [{path: d.txt}], seq_len: 64}\n"
                   "train: {gpus: 1, nodes: 2, distributed_on_cpu: true}\nbudget: {tokens: 10k}\nhosts: [local, local]\n")
    result = runner_cli("run", str(job), "--backend", "native", "--wait", env=env)
    assert result.returncode == 2
    assert f"{job}:6:" in result.stderr and "one torchrun per SSH host; local is this machine" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (Path(env["RUNNER_HOME"]) / "runs").exists() or not any((Path(env["RUNNER_HOME"]) / "runs").iterdir())
