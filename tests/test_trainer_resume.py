"""Checkpoints and resume: exact continuation, crash safety, SIGTERM, corrupt checkpoints skipped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.resolved import ResolvedRun, StagePlan
from runner.spec import Experiment
from runner.trainer import checkpoint
from runner.trainer.loop import train

ROOT = Path(__file__).resolve().parent.parent
STEPS = 12


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trainer-cache")


@pytest.fixture(autouse=True)
def shared_cache(cache_dir, monkeypatch):
    monkeypatch.setenv("RUNNER_CACHE_DIR", str(cache_dir))


def resolved_run(every_steps: int = 4) -> ResolvedRun:
    experiment = Experiment.model_validate({
        "name": "resume", "budget": {"tokens": 10**6},
        "model": {"preset": "tiny", "overrides": {"hidden": 64, "layers": 2, "heads": 2, "intermediate": 128,
                                                  "vocab_size": 512}},
        "data": {"sources": [{"path": "data/sample/news.jsonl"}, {"path": "data/sample/reports.parquet"}],
                 "mixture": "sqrt", "seq_len": 32, "validation": 0.02},
        "train": {"lr": 3e-3, "warmup_steps": 2, "log_every_steps": 1, "deterministic": True, "seed": 9},
        "lora": None, "checkpoint": {"every_steps": every_steps, "keep_last": 10},
        "eval": {"every_steps": 4, "max_batches": 2},
    })
    return ResolvedRun(experiment=experiment, job_dir=str(ROOT), device="cpu", token_budget=10**6,
                       stages=[StagePlan(seq_len=32, micro_batch=4, grad_accum=2, steps=STEPS)])


def losses(run_dir: Path) -> dict[int, float]:
    found = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "train":
            found[event["step"]] = event["loss"]
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    os.environ["RUNNER_CACHE_DIR"] = str(cache_dir)
    summary = train(resolved_run(), run_dir)
    assert summary.exit_reason == "budget_reached", summary.error
    return run_dir


def start_trainer(resolved: ResolvedRun, run_dir: Path, cache_dir: Path, **env: str) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.json").write_text(resolved.model_dump_json())
    return subprocess.Popen([sys.executable, "-m", "runner.trainer", str(run_dir / "plan.json"), "--out", str(run_dir)],
                            cwd=ROOT, env={**os.environ, "RUNNER_CACHE_DIR": str(cache_dir), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


def test_losses_of_a_resumed_run_match_the_uninterrupted_run_step_for_step(uninterrupted, tmp_path):
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(uninterrupted / "checkpoints" / "step-0000004", resumed / "checkpoints" / "step-0000004")
    shutil.copytree(uninterrupted / "tokenizer", resumed / "tokenizer")
    summary = train(resolved_run(), resumed)
    assert summary.exit_reason == "budget_reached" and summary.resumed_from_step == 4
    expected = {s: v for s, v in losses(uninterrupted).items() if s > 4}
    assert losses(resumed) == expected
    assert summary.tokens == json.loads((uninterrupted / "summary.json").read_text())["tokens"]


def test_every_checkpoint_has_a_manifest_of_sizes_and_hashes(uninterrupted):
    path = uninterrupted / "checkpoints" / "step-0000012"
    manifest = json.loads((path / "manifest.json").read_text())
    names = {f["path"] for f in manifest["files"]}
    assert names == {"model.safetensors", "config.json", "optimizer.pt", "state.json"}
    assert all(len(f["sha256"]) == 64 and f["size"] == (path / f["path"]).stat().st_size for f in manifest["files"])
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 12 and state["tokens"] == 12 * 256 and set(state["rng"]) >= {"python", "numpy", "torch"}
    assert state["streams"][0]["rows"] == 12 * 8


def test_a_corrupt_newest_checkpoint_is_skipped_for_the_newest_intact_one(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted / "checkpoints", run_dir / "checkpoints")
    with open(run_dir / "checkpoints" / "step-0000012" / "optimizer.pt", "r+b") as f:
        f.write(b"garbage")
    assert checkpoint.latest_intact(run_dir).name == "step-0000008"


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_leaves_the_previous_checkpoint_intact_and_loadable(tmp_path, cache_dir,
                                                                                            uninterrupted):
    run_dir = tmp_path / "run"
    proc = start_trainer(resolved_run(every_steps=2), run_dir, cache_dir, RUNNER_TEST_CHECKPOINT_SLEEP_S="1.5")
    try:
        root = run_dir / "checkpoints"
        wait_for(lambda: (root / "step-0000002").is_dir() and any(root.glob(".tmp-step-0000004-*")))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any(root.glob(".tmp-step-0000004-*"))  # the write really was cut off
    latest = checkpoint.latest_intact(run_dir)
    assert latest is not None and latest.name == "step-0000002"
    summary = train(resolved_run(every_steps=2), run_dir)  # loads it and finishes the run
    assert summary.exit_reason == "budget_reached" and summary.resumed_from_step == 2
    assert losses(run_dir) == losses(uninterrupted)
    assert not any(root.glob(".tmp-step-*"))


@pytest.mark.slow
def test_sigterm_leaves_a_resumable_checkpoint_and_a_cancelled_summary(tmp_path, cache_dir, uninterrupted):
    run_dir = tmp_path / "run"
    proc = start_trainer(resolved_run(every_steps=100), run_dir, cache_dir)
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and len(losses(run_dir)) >= 3)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["exit_reason"] == "cancelled"
    stopped = summary["steps"]
    assert 3 <= stopped < STEPS
    assert checkpoint.latest_intact(run_dir).name == f"step-{stopped:07d}"
    resumed = train(resolved_run(every_steps=100), run_dir)
    assert resumed.exit_reason == "budget_reached" and resumed.resumed_from_step == stopped
    assert losses(run_dir) == losses(uninterrupted)  # interrupted-and-resumed matches step for step
