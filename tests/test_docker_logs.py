"""The Docker backend's log: every line of the trainer's output once, whole and redacted, in ``RUN_DIR/logs/train.log``.

The docker tests run a stand-in trainer in the session's trainer image: it
prints many numbered lines in bursts, a secret in two writes, a line longer
than Docker's 16 KiB log messages, and a last line without a newline.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import TEST_SESSION
from runner.backends import LOG_FILE, LaunchSpec
from runner.backends.docker import DockerBackend, unsent_output
from runner.catalog import profile
from runner.resolved import ResolvedRun, StagePlan
from runner.spec import load_jobs

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-value-0123"  # not shaped like a Hugging Face token: redacted by its value
LINES = 3000

TRAINER = rf"""
import os, sys, time
secret = os.environ["HF_TOKEN"]
for i in range(1, {LINES} + 1):
    print(f"line {{i}} " + "." * (i % 97), flush=True)
    if i % 100 == 0:
        time.sleep(0.05)
sys.stdout.write("token " + secret[:6]); sys.stdout.flush(); time.sleep(0.3)
sys.stdout.write(secret[6:] + " end\n"); sys.stdout.flush()
print("long " + "x" * 40000, flush=True)
sys.stdout.write("tail without a newline"); sys.stdout.flush()
"""
EXPECTED = "".join([*(f"line {i} " + "." * (i % 97) + "\n" for i in range(1, LINES + 1)),
                    "token [redacted] end\n", "long " + "x" * 40000 + "\n", "tail without a newline"])


def test_dockers_log_of_a_running_container_is_copied_to_its_last_whole_line_and_the_tail_once_it_ended():
    output = b"one\ntwo\nthr"
    assert unsent_output(output, 0, running=True) == b"one\ntwo\n"
    assert unsent_output(output, 8, running=True) == b""
    assert unsent_output(output, 8, running=False) == b"thr"
    assert unsent_output(output, 11, running=False) == b""


def follow(handle: str, run_dir: Path) -> None:
    """Poll as ``runner`` does until the container ends, restarting the runner once its log is half written."""
    backend, restarted = DockerBackend(), False
    while backend.poll(handle, run_dir).running:
        backend.sync_logs(handle, run_dir)
        log = run_dir / LOG_FILE
        if not restarted and log.exists() and f"line {LINES // 2} ".encode() in log.read_bytes():
            backend, restarted = DockerBackend(), True  # a new runner process, with only the run directory
        time.sleep(0.02)
    backend.sync_logs(handle, run_dir)  # as dispatch.finish does
    backend.sync_logs(handle, run_dir)  # and again: nothing is copied twice
    assert restarted, "the container ended before the runner restarted; print more lines"


@pytest.mark.docker
def test_a_long_log_arrives_once_whole_and_redacted_over_many_polls_and_a_runner_restart(
        docker_engine, trainer_image, tmp_path, monkeypatch):
    monkeypatch.setattr("runner.backends.docker.trainer_argv", lambda *args, **kwargs: ["python", "-c", TRAINER])
    [job] = load_jobs(REPO / "jobs" / "quickstart.yaml")
    resolved = ResolvedRun(experiment=job.spec, job_dir=str(job.base_dir),
                           stages=[StagePlan(seq_len=128, micro_batch=16, grad_accum=1)])
    run_dir = tmp_path / "run"
    spec = LaunchSpec(run_id=f"logs-{TEST_SESSION}", attempt=1, run_dir=run_dir, resolved=resolved,
                      profile=profile("cpu"), gpus=1, env={"HF_TOKEN": SECRET}, image=trainer_image)
    backend = DockerBackend()
    handle = backend.launch(spec)
    try:
        follow(handle, run_dir)
        assert (run_dir / LOG_FILE).read_text() == EXPECTED
        assert backend.poll(handle, run_dir).exit_code == 0
        assert docker_engine.containers.get(handle).logs() == b""  # the Engine keeps no second copy
    finally:
        backend.release(handle)


@pytest.mark.docker
def test_a_container_started_by_an_earlier_runner_is_copied_from_dockers_log_once_across_a_restart(
        docker_engine, trainer_image, tmp_path, monkeypatch):
    # Before the supervisor ran in the container, the trainer printed to Docker's log and the
    # runner copied it from there, keeping its offset in the run directory.
    monkeypatch.setenv("HF_TOKEN", SECRET)  # that runner redacted the secrets of its own environment
    container = docker_engine.containers.run(trainer_image, ["-c", TRAINER], entrypoint=["python"], detach=True,
                                             init=True, environment={"HF_TOKEN": SECRET},
                                             labels={"runner.test": TEST_SESSION})
    run_dir = tmp_path / "run"
    try:
        follow(container.id, run_dir)
        assert (run_dir / LOG_FILE).read_text() == EXPECTED
    finally:
        container.remove(force=True)
