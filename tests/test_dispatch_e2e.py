"""`runner run` end to end: real containers on a real Docker Engine, and the native backend.

Every test drives the CLI as a user would, in a private HOME whose environment
holds a Hugging Face token. The trainer image is the session's ``trainer_image``
(built offline from this tree, reused while the sources do not change).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import OFFLINE_IMAGE_ENV

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = "jobs/quickstart.yaml"
SECRET = "hf_TestSecretValue0123456789abcdefXYZ"

# The quickstart shrunk to train in seconds on two CPU cores (9 steps of 512 tokens), checkpointing often.
TINY = ["--set", "train.batch_size=4", "--set", "budget.tokens=5k", "--set", "checkpoint.every_steps=5",
        "--set", "eval.every_steps=5", "--set", "eval.max_batches=2"]
# Long enough to stop part way (58 steps), with a checkpoint every 3 steps.
LONGER = ["--set", "train.batch_size=4", "--set", "budget.tokens=30k", "--set", "checkpoint.every_steps=3",
          "--set", "eval.on_start=false", "--set", "eval.every_steps=1000", "--set", "eval.max_batches=1",
          "--set", "train.log_every_steps=1"]


def runner_cli(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``runner ARGS`` in the repository, as a user would type it."""
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def json_out(result: subprocess.CompletedProcess) -> list | dict:
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout)


def train_events(run_dir: Path) -> list[dict]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line being written
        if event.get("event") == "train":
            events.append(event)
    return events


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*") if (p / "manifest.json").exists())


def wait_until(condition: Callable[[], object], timeout_s: float = 120, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


@pytest.fixture
def env(tmp_home: Path) -> dict[str, str]:
    """The environment of a user with a Hugging Face token, in a private HOME, building images offline.

    One CPU thread per trainer: on a busy machine torch's threads wait on each other for whole time slices.
    """
    return {**os.environ, **OFFLINE_IMAGE_ENV, "HF_TOKEN": SECRET, "OMP_NUM_THREADS": "1"}


def store_dir(env: dict[str, str]) -> Path:
    return Path(env["RUNNER_HOME"])


def containers_of(client, run_id: str) -> list:
    return client.containers.list(all=True, filters={"label": f"runner.run_id={run_id}"})


@pytest.mark.docker
@pytest.mark.slow
def test_run_wait_trains_in_a_container_and_records_the_run_without_the_secret(docker_engine, trainer_image, env):
    result = runner_cli("run", QUICKSTART, "--host", "local", "--wait", "--json", *TINY, env=env)
    assert result.returncode == 0, result.stderr
    [run] = json_out(result)
    assert run["state"] == "succeeded" and run["backend"] == "docker" and run["image"] == trainer_image
    assert [t["to_state"] for t in run["transitions"]] == ["queued", "starting", "running", "succeeded"]
    # What the store recorded: measured speed beside the prediction, wall time, cost, memory, losses.
    assert run["steps"] == run["summary"]["steps"] == run["summary"]["planned_steps"] > 0
    assert run["tokens_per_s"] > 0 and run["predicted_tokens_per_s"] > 0
    assert run["wall_s"] > 0 and run["cost_usd"] == 0  # local costs nothing an hour
    assert run["peak_bytes"] > 0 and run["exit_code"] == 0 and run["exit_reason"] == "budget_reached"
    assert run["final_eval_loss"] is not None and run["best_eval_loss"] <= run["final_eval_loss"]
    # The run directory: log (also streamed to stderr under --json), metrics, checkpoint, summary.
    run_dir = Path(run["run_dir"])
    assert run_dir.parent == store_dir(env) / "runs"
    log = (run_dir / "logs" / "train.log").read_text()
    assert "done: budget_reached" in log and "done: budget_reached" in result.stderr
    assert train_events(run_dir) and checkpoints(run_dir) and (run_dir / "summary.json").exists()
    # The container read the data through read-only mounts, at rewritten paths.
    resolved = json.loads((run_dir / "resolved.json").read_text())
    assert all(s["path"].startswith("/inputs/") for s in resolved["experiment"]["data"]["sources"])
    assert containers_of(docker_engine, run["id"]) == []  # removed once its end was recorded
    # HF_TOKEN was in the environment: it reaches neither the output, nor the store, nor the run directory.
    assert SECRET not in result.stdout + result.stderr
    assert files_containing(store_dir(env), SECRET.encode()) == []

    listed = json_out(runner_cli("runs", "--json", env=env))
    assert [(r["id"], r["state"]) for r in listed] == [(run["id"], "succeeded")]


@pytest.mark.docker
@pytest.mark.slow
def test_detach_status_logs_then_cancel_checkpoints_and_resume_continues_from_it(docker_engine, trainer_image, env):
    detached = runner_cli("run", QUICKSTART, "--detach", "--json", *LONGER, env=env)
    assert detached.returncode == 0, detached.stderr
    [run] = json_out(detached)
    assert run["state"] == "running"
    run_dir = Path(run["run_dir"])
    [container] = containers_of(docker_engine, run["id"])
    # The token was passed to the trainer (it may need the hub) through the allow-list, and nothing else.
    container_env = dict(e.split("=", 1) for e in container.attrs["Config"]["Env"])
    assert container_env["HF_TOKEN"] == SECRET and "RUNNER_HOME" not in container_env
    wait_until(lambda: checkpoints(run_dir), what="the first checkpoint")

    status = json_out(runner_cli("status", run["id"], "--json", env=env))
    assert status["state"] == "running"
    logs = runner_cli("logs", run["id"][:11], env=env)  # a unique prefix is enough
    assert logs.returncode == 0 and "training " in logs.stdout

    cancelled = runner_cli("cancel", run["id"], env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    status = json_out(runner_cli("status", run["id"], "--json", env=env))
    assert status["state"] == "cancelled" and "cancelled by the user" in status["reason"]
    assert status["summary"]["exit_reason"] == "cancelled"
    stopped_at = status["summary"]["steps"]
    assert f"step-{stopped_at:07d}" in checkpoints(run_dir)  # the trainer checkpointed on SIGTERM
    assert stopped_at < status["summary"]["planned_steps"], "it ended before the cancel; make LONGER longer"
    assert [t["to_state"] for t in status["transitions"]][-2:] == ["stopping", "cancelled"]
    assert containers_of(docker_engine, run["id"]) == []

    resumed = runner_cli("resume", run["id"], "--wait", "--json", env=env)
    assert resumed.returncode == 0, resumed.stderr
    [done] = json_out(resumed)
    assert done["state"] == "succeeded" and done["attempt"] == 2
    assert done["summary"]["resumed_from_step"] == stopped_at
    steps = [e["step"] for e in train_events(run_dir)]
    second = steps[steps.index(stopped_at) + 1:]
    assert second and second[0] == stopped_at + 1, "the second attempt restarted instead of continuing"
    assert done["steps"] == done["summary"]["planned_steps"]
    # The log holds both attempts, each progress line once and in order.
    log = (run_dir / "logs" / "train.log").read_text()
    second_attempt = log[log.index(f"--- attempt 2: continues from step-{stopped_at:07d}\n"):]
    assert f"resuming from step-{stopped_at:07d}" in second_attempt
    logged = [int(line.split()[1].split("/")[0]) for line in log.splitlines() if line.startswith("step ")]
    assert logged == list(range(1, done["steps"] + 1))
    assert files_containing(store_dir(env), SECRET.encode()) == []


@pytest.mark.docker
@pytest.mark.slow
def test_a_crashed_runner_leaves_the_run_to_be_followed_and_recorded_by_the_next_one(docker_engine, trainer_image,
                                                                                    env):
    waiting = subprocess.Popen([sys.executable, "-m", "runner.cli", "run", QUICKSTART, "--wait", *LONGER], cwd=REPO,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        run_dir = wait_until(lambda: next((d for d in (store_dir(env) / "runs").glob("*") if train_events(d)), None),
                             what="the first training step")
        waiting.send_signal(signal.SIGKILL)  # the runner dies; the container it started does not
    finally:
        waiting.kill()
        waiting.wait()
    run_id = run_dir.name
    assert json_out(runner_cli("status", run_id, "--json", env=env))["state"] == "running"

    followed = runner_cli("logs", "-f", run_id, env=env)
    assert followed.returncode == 0, followed.stderr
    assert "done: budget_reached" in followed.stdout
    [run] = json_out(runner_cli("runs", "--json", env=env))
    assert run["state"] == "succeeded" and run["tokens_per_s"] > 0 and run["steps"] > 0
    assert containers_of(docker_engine, run_id) == []


@pytest.mark.docker
@pytest.mark.slow
def test_a_container_killed_from_outside_is_marked_failed_with_the_reason(docker_engine, trainer_image, env):
    [run] = json_out(runner_cli("run", QUICKSTART, "--detach", "--json", *LONGER, env=env))
    [container] = containers_of(docker_engine, run["id"])
    container.kill()
    status = json_out(runner_cli("status", run["id"], "--json", env=env))
    assert status["state"] == "failed"
    assert "SIGKILL from outside the runner" in status["reason"] and status["exit_code"] == 137


# Run inside the container: stop (SIGSTOP) the trainer, not its supervisor, so that it cannot act on
# SIGTERM, as a hung one.
FREEZE_TRAINER = ("import os, signal\n"
                  "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
                  "    cmd = open(f'/proc/{pid}/cmdline', 'rb').read()\n"
                  "    if cmd.split(b'\\0')[1:3] == [b'-m', b'runner.trainer']:\n"
                  "        os.kill(int(pid), signal.SIGSTOP)\n"
                  "        print('frozen', pid)\n")


@pytest.mark.docker
@pytest.mark.slow
def test_cancel_kills_a_trainer_that_does_not_stop_within_the_grace_period(docker_engine, trainer_image, env):
    [run] = json_out(runner_cli("run", QUICKSTART, "--detach", "--json", *LONGER, env=env))
    [container] = containers_of(docker_engine, run["id"])
    wait_until(lambda: b"frozen" in container.exec_run(["python", "-c", FREEZE_TRAINER]).output,
               what="the trainer process")

    started = time.monotonic()
    cancelled = runner_cli("cancel", run["id"], "--grace", "2", env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert time.monotonic() - started < 20
    status = json_out(runner_cli("status", run["id"], "--json", env=env))
    assert status["state"] == "cancelled" and status["exit_code"] == 137
    assert "did not stop within the grace period and was killed" in status["reason"]


@pytest.mark.docker
@pytest.mark.slow
def test_a_refused_job_exits_3_with_the_reason_and_force_runs_it_under_its_time_cap(docker_engine, trainer_image,
                                                                                   env):
    # 50M tokens cannot be trained within 0.003 h (11 s) on this CPU: the planner says no.
    over_budget = ["--set", "budget.tokens=50M", "--set", "budget.max_hours=0.003",
                   "--set", "checkpoint.every_steps=2", "--set", "eval.on_start=false"]
    refused = runner_cli("run", QUICKSTART, "--wait", *over_budget, env=env)
    assert refused.returncode == 3, refused.stderr
    assert "refused on local" in refused.stderr and "max_hours" in refused.stderr and "--force" in refused.stderr
    assert not (store_dir(env) / "runs").exists()

    forced = runner_cli("run", QUICKSTART, "--wait", "--json", "--force", *over_budget, env=env)
    assert forced.returncode == 1, forced.stderr  # it ran, but did not finish its budget
    assert "running anyway (--force)" in forced.stderr
    [run] = json_out(forced)
    assert run["state"] == "cancelled" and "max_hours" in run["reason"]
    assert checkpoints(Path(run["run_dir"])) and run["steps"] < run["summary"]["planned_steps"]


@pytest.mark.docker
def test_a_job_that_does_not_fit_is_refused_before_any_container_starts(docker_engine, env):
    result = runner_cli("run", QUICKSTART, "--wait", "--set", "model.preset=llama-7b", env=env)
    assert result.returncode == 3
    assert "refused on local" in result.stderr and "fix:" in result.stderr
    assert not (store_dir(env) / "runs.db").exists() and not (store_dir(env) / "runs").exists()


def test_a_missing_data_file_is_reported_before_launch(env):
    result = runner_cli("run", QUICKSTART, "--set", "data.sources.1.path=../data/sample/missing.txt", env=env)
    assert result.returncode == 2
    assert "data.sources[1].path: data file not found" in result.stderr
    assert "Traceback" not in result.stderr and not (store_dir(env) / "runs").exists()


@pytest.mark.slow
def test_the_native_backend_runs_the_same_job_without_docker(env):
    result = runner_cli("run", QUICKSTART, "--backend", "native", "--wait", "--json", *TINY, env=env)
    assert result.returncode == 0, result.stderr
    [run] = json_out(result)
    assert run["state"] == "succeeded" and run["backend"] == "native" and run["image"] is None
    run_dir = Path(run["run_dir"])
    assert "done: budget_reached" in (run_dir / "logs" / "train.log").read_text()
    assert train_events(run_dir) and checkpoints(run_dir) and run["summary"]["exit_reason"] == "budget_reached"
    assert run["tokens_per_s"] > 0 and run["peak_bytes"] > 0
    resolved = json.loads((run_dir / "resolved.json").read_text())
    assert resolved["experiment"]["data"]["sources"][0]["path"] == "../data/sample/news.jsonl"  # the job's own
    assert files_containing(store_dir(env), SECRET.encode()) == []
