"""Dispatch logic without Docker: caps, how an ended trainer is judged, reconciliation, secrets, mounts."""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from runner import dispatch
from runner.backends import Status, choose_backend, redact, trainer_env
from runner.backends.docker import container_inputs
from runner.catalog import profile
from runner.errors import UserError
from runner.resolved import ResolvedRun, StagePlan
from runner.spec import load_jobs
from runner.store import Store

REPO = Path(__file__).resolve().parent.parent


class FakeBackend:
    """Plays a trainer: running until stopped, then ending the way the test says."""

    name = "docker"

    def __init__(self, ending: Status, summary: dict | None = None):
        self.ending, self.summary, self.stopped, self.released = ending, summary, False, False
        self.running = True

    def sync_logs(self, handle: str, run_dir: Path) -> None:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        with open(run_dir / "logs" / "train.log", "a") as log:
            log.write("step\n")

    def poll(self, handle: str, run_dir: Path) -> Status:
        return Status(running=True) if self.running else self.ending

    def stop(self, handle: str, grace_s: float = 0) -> None:
        self.stopped, self.running = True, False
        if self.summary is not None:
            self.end_with_summary(Path(self._run_dir))

    def end_with_summary(self, run_dir: Path) -> None:
        (run_dir / "summary.json").write_text(json.dumps(self.summary))

    def release(self, handle: str) -> None:
        self.released = True


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store.open(tmp_path / "runs.db")
    yield s
    s.close()


def running_run(store: Store, backend: FakeBackend, monkeypatch, *, started_ago_s: float = 5, **fields):
    monkeypatch.setitem(dispatch._BACKENDS, "docker", backend)
    run = store.create(job_file="q.yaml", experiment="quickstart", resolved_json="{}", host="local",
                       profile="cpu", backend="docker", **fields)
    Path(run.run_dir).mkdir(parents=True)
    backend._run_dir = run.run_dir
    store.transition(run.id, "starting", "go")
    store.update(run.id, handle="c0ffee")
    return store.transition(run.id, "running", "started", started_at=time.time() - started_ago_s)


CANCELLED = {"exit_reason": "cancelled", "steps": 12, "tokens": 100, "checkpoint": "checkpoints/step-0000012"}


def test_wait_stops_a_run_at_its_time_cap_with_a_checkpoint_and_records_why(store, monkeypatch):
    backend = FakeBackend(Status(running=False, exit_code=0), CANCELLED)
    run = running_run(store, backend, monkeypatch, started_ago_s=40, max_hours=0.01)
    out = io.BytesIO()
    done = dispatch.wait(store, run.id, out=out, poll_s=0.01)
    assert backend.stopped and backend.released
    assert done.state == "cancelled" and "max_hours cap reached" in done.reason
    assert done.steps == 12 and b"step" in out.getvalue()
    assert [t.to_state for t in store.transitions(run.id)][-2:] == ["stopping", "cancelled"]


def test_wait_stops_a_run_when_its_cost_reaches_max_cost_usd(store, monkeypatch):
    backend = FakeBackend(Status(running=False, exit_code=0), CANCELLED)
    run = running_run(store, backend, monkeypatch, started_ago_s=20, price_usd_per_hour=36.0, max_cost_usd=0.1)
    done = dispatch.wait(store, run.id, poll_s=0.01)
    assert done.state == "cancelled" and "max_cost_usd cap reached: $0.20" in done.reason
    assert done.cost_usd == pytest.approx(0.2, abs=0.01)


def test_no_cap_no_stop():
    class R:
        max_hours, max_cost_usd, price_usd_per_hour = None, 5.0, 0.0

        def elapsed_s(self, now=None):
            return 1e6
    assert dispatch.cap_reached(R()) is None  # a free host never reaches a money cap


@pytest.mark.parametrize("status, summary, state, words", [
    (Status(False, 0), {"exit_reason": "budget_reached", "steps": 9, "tokens": 9}, "succeeded", "budget_reached"),
    (Status(False, 0), {"exit_reason": "early_stop"}, "succeeded", "early_stop"),
    (Status(False, 0), {"exit_reason": "cancelled", "checkpoint": "x"}, "cancelled", "outside the runner"),
    (Status(False, 1), {"exit_reason": "error", "error": "boom"}, "failed", "boom"),
    (Status(False, 137), None, "failed", "SIGKILL from outside the runner"),
    (Status(False, 137, detail="out of memory: the kernel killed the trainer (OOMKilled)"), None, "failed", "OOM"),
    (Status(False, gone=True, detail="the container no longer exists"), None, "lost", "no longer exists"),
    (Status(False, 0), None, "failed", "without writing summary.json"),
])
def test_how_an_ended_trainer_is_judged(store, monkeypatch, status, summary, state, words):
    backend = FakeBackend(status)
    run = running_run(store, backend, monkeypatch)
    if summary is not None:
        (Path(run.run_dir) / "summary.json").write_text(json.dumps(summary))
    backend.running = False
    done = dispatch.reconcile_run(store, store.get(run.id))
    assert done.state == state and words in done.reason


def test_a_trainer_stopped_by_a_cancel_from_another_process_is_recorded_as_the_users_cancel(store, monkeypatch):
    # A follower read the run while it was running; then `runner cancel` elsewhere began stopping it.
    backend = FakeBackend(Status(False, 0), CANCELLED)
    run = running_run(store, backend, monkeypatch)
    followed = store.get(run.id)
    store.transition(run.id, "stopping", "cancelled by the user", expect={"running"})
    backend.stop("c0ffee")
    done = dispatch.finish(store, followed, backend.poll("c0ffee", Path(run.run_dir)))
    assert done.state == "cancelled" and done.reason == "cancelled by the user (checkpoint checkpoints/step-0000012)"


def test_reconcile_reads_measurements_from_summary_json(store, monkeypatch):
    backend = FakeBackend(Status(False, 0))
    run = running_run(store, backend, monkeypatch)
    summary = {"exit_reason": "budget_reached", "tokens_per_s": 8000.0, "tokens": 18432, "steps": 9,
               "peak_bytes": 123, "mfu": 0.04, "final_eval_loss": 6.1, "best_eval_loss": 6.0}
    (Path(run.run_dir) / "summary.json").write_text(json.dumps(summary))
    backend.running = False
    [done] = [r for r in dispatch.reconcile(store) if r.id == run.id]
    assert (done.state, done.tokens_per_s, done.peak_bytes, done.best_eval_loss) == ("succeeded", 8000.0, 123, 6.0)


def test_a_running_trainer_stays_running_after_reconcile(store, monkeypatch):
    run = running_run(store, FakeBackend(Status(False, 0)), monkeypatch)
    assert dispatch.reconcile_run(store, store.get(run.id)).state == "running"


def test_a_run_whose_launcher_died_before_the_start_is_failed_not_stuck(store):
    dead = subprocess.Popen(["true"])
    dead.wait()
    run = store.create(job_file="q.yaml", experiment="q", resolved_json="{}", host="local", profile="cpu",
                       backend="docker")
    store.transition(run.id, "starting", "building the image")
    store._db.execute("UPDATE runs SET launcher_pid = ? WHERE id = ?", (dead.pid, run.id))
    done = dispatch.reconcile_run(store, store.get(run.id))
    assert done.state == "failed" and "exited before the trainer started" in done.reason


def test_a_run_being_launched_by_this_process_is_left_alone(store):
    run = store.create(job_file="q.yaml", experiment="q", resolved_json="{}", host="local", profile="cpu",
                       backend="docker")
    assert run.launcher_pid == os.getpid()
    assert dispatch.reconcile_run(store, run).state == "queued"


def test_secrets_are_redacted_by_value_and_by_shape():
    token = b"hf_abcdefghijklmnopqrstuvwxyz012345"
    text = b"token=" + token + b" other=s3cr3t-value plain\n"
    cleaned = redact(text, [b"s3cr3t-value"])
    assert token not in cleaned and b"s3cr3t-value" not in cleaned and b"plain" in cleaned
    assert redact(b"hf_" + b"x" * 30, []) == b"[redacted]"


def test_only_allow_listed_variables_reach_the_trainer():
    env = trainer_env({"HF_TOKEN": "hf_x", "AWS_SECRET_ACCESS_KEY": "no", "HOME": "/root", "HF_HUB_OFFLINE": "1"})
    assert env == {"HF_TOKEN": "hf_x", "HF_HUB_OFFLINE": "1"}


def test_backend_choice_follows_the_profile_and_what_the_machine_has():
    cpu, apple = profile("cpu"), profile("apple-m1-max")
    assert choose_backend(cpu, None, lambda: True) == "docker"
    assert choose_backend(cpu, "auto", lambda: False) == "native"
    assert choose_backend(apple, None, lambda: True) == "native"
    assert choose_backend(cpu, "native", lambda: True) == "native"
    with pytest.raises(UserError, match="Apple"):
        choose_backend(apple, "docker", lambda: True)
    with pytest.raises(UserError, match="no Docker Engine"):
        choose_backend(cpu, "docker", lambda: False)


def test_container_paths_replace_local_paths_and_each_data_directory_is_mounted_read_only():
    [job] = load_jobs(REPO / "jobs" / "quickstart.yaml")
    resolved = ResolvedRun(experiment=job.spec, job_dir=str(job.base_dir),
                           stages=[StagePlan(seq_len=128, micro_batch=16, grad_accum=1)])
    inside, mounts = container_inputs(resolved)
    sample = str((REPO / "data" / "sample").resolve())
    assert mounts == {sample: "/inputs/0"}
    assert [s.path for s in inside.experiment.data.sources] == ["/inputs/0/news.jsonl", "/inputs/0/filings.txt"]
    assert inside.job_dir == "/inputs" and inside.experiment.model.preset == "tiny"
