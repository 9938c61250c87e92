"""The trainer under torchrun on CPU (gloo): DDP and FSDP match one process, rank 0 writes, resume across counts."""

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

from runner.launch import launch_env, trainer_argv
from runner.resolved import ResolvedRun, StagePlan
from runner.spec import Experiment
from runner.trainer.loop import train

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8
GLOBAL_ROWS = 8  # sequences per optimizer step, over all processes


def resolved_run(processes: int = 1, parallelism: str = "ddp", steps: int = STEPS) -> ResolvedRun:
    """The same global batch (8 rows: 4 x 2 accumulation in all) whatever the number of processes."""
    experiment = Experiment.model_validate({
        "name": "dist", "budget": {"tokens": steps * GLOBAL_ROWS * 32},
        "model": {"preset": "tiny", "overrides": {"hidden": 64, "layers": 2, "heads": 2, "intermediate": 128,
                                                  "vocab_size": 512}},
        "data": {"sources": [{"path": "data/sample/news.jsonl"}, {"path": "data/sample/reports.parquet"}],
                 "mixture": "sqrt", "seq_len": 32, "validation": 0.02},
        "train": {"lr": 3e-3, "warmup_steps": 2, "log_every_steps": 1, "deterministic": True, "seed": 9,
                  "gpus": processes, "distributed_on_cpu": True},
        "checkpoint": {"every_steps": 4, "keep_last": 10},
        "eval": {"every_steps": 4, "max_batches": 2},
    })
    micro_batch = GLOBAL_ROWS // 2 // processes
    return ResolvedRun(experiment=experiment, job_dir=str(ROOT), device="cpu", token_budget=steps * GLOBAL_ROWS * 32,
                       gpus=processes,
                       parallelism=parallelism,  # type: ignore[arg-type]
                       stages=[StagePlan(seq_len=32, micro_batch=micro_batch, grad_accum=2, steps=steps)])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed-cache")


@pytest.fixture(autouse=True)
def shared_cache(cache_dir, monkeypatch):
    monkeypatch.setenv("RUNNER_CACHE_DIR", str(cache_dir))


def start_torchrun(resolved: ResolvedRun, run_dir: Path, cache_dir: Path) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.json").write_text(resolved.model_dump_json())
    argv = trainer_argv(sys.executable, str(run_dir / "plan.json"), str(run_dir), gpus=resolved.gpus)
    env = {**os.environ, "RUNNER_CACHE_DIR": str(cache_dir), **launch_env(60)}
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def torchrun(resolved: ResolvedRun, run_dir: Path, cache_dir: Path) -> str:
    process = start_torchrun(resolved, run_dir, cache_dir)
    out, _ = process.communicate(timeout=240)
    assert process.returncode == 0, out
    return out


def train_losses(run_dir: Path) -> dict[int, float]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in events if e["event"] == "train"]
    assert len(steps) == len(set(steps)), "one metrics line per step: only rank 0 writes"
    return {e["step"]: e["loss"] for e in events if e["event"] == "train"}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def resume_dir(source: Path, step: int, target: Path) -> Path:
    """A run directory holding only ``source``'s checkpoint at ``step`` (and its tokenizer)."""
    name = f"step-{step:07d}"
    shutil.copytree(source / "checkpoints" / name, target / "checkpoints" / name)
    shutil.copytree(source / "tokenizer", target / "tokenizer")
    return target


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("one")
    os.environ["RUNNER_CACHE_DIR"] = str(cache_dir)
    result = train(resolved_run(1), run_dir)
    assert result.exit_reason == "budget_reached", result.error
    return run_dir


@pytest.fixture(scope="module")
def ddp_two(tmp_path_factory, cache_dir, one_process) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp2")
    out = torchrun(resolved_run(2, "ddp"), run_dir, cache_dir)
    assert "x 2 processes (DDP)" in out
    return run_dir


@pytest.fixture(scope="module")
def fsdp_two(tmp_path_factory, cache_dir, one_process) -> Path:
    run_dir = tmp_path_factory.mktemp("fsdp2")
    out = torchrun(resolved_run(2, "fsdp"), run_dir, cache_dir)
    assert "x 2 processes (FSDP)" in out
    return run_dir


def test_two_ddp_processes_match_one_process_with_the_same_global_batch(one_process, ddp_two):
    one, two = train_losses(one_process), train_losses(ddp_two)
    assert sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-3, abs=1e-4), step
    assert summary(ddp_two)["tokens"] == summary(one_process)["tokens"] == STEPS * GLOBAL_ROWS * 32
    # the eval batches are split over the ranks and averaged: the same eval loss
    assert summary(ddp_two)["final_eval_loss"] == pytest.approx(summary(one_process)["final_eval_loss"], rel=1e-3)


def test_only_rank_0_writes_the_run_directory(ddp_two):
    assert sorted(p.name for p in (ddp_two / "checkpoints").iterdir()) == ["step-0000004", "step-0000008"]
    state = json.loads((ddp_two / "checkpoints" / "step-0000008" / "state.json").read_text())
    assert state["processes"] == 2 and state["optimizer_layout"] == "by_index"
    assert not list(ddp_two.glob("**/.tmp-*"))


def test_two_ddp_processes_checkpoint_resumes_in_one_and_the_losses_continue(ddp_two, tmp_path, capfd):
    run_dir = resume_dir(ddp_two, 4, tmp_path / "resumed")
    result = train(resolved_run(1), run_dir)
    assert result.exit_reason == "budget_reached", result.error
    assert result.resumed_from_step == 4
    assert "written by 2 processes" in capfd.readouterr().out
    resumed, original = train_losses(run_dir), train_losses(ddp_two)
    assert sorted(resumed) == [5, 6, 7, 8]
    for step in resumed:
        assert resumed[step] == pytest.approx(original[step], rel=1e-3, abs=1e-4), step


def test_fsdp_shards_match_one_process_and_gather_a_full_checkpoint(one_process, fsdp_two):
    one, sharded = train_losses(one_process), train_losses(fsdp_two)
    for step in one:
        assert sharded[step] == pytest.approx(one[step], rel=1e-3, abs=1e-4), step
    from safetensors import safe_open

    def tensors(run_dir: Path) -> dict[str, tuple]:
        with safe_open(run_dir / "checkpoints/step-0000008/model.safetensors", "pt") as f:
            return {k: tuple(f.get_tensor(k).shape) for k in f.keys()}  # noqa: SIM118

    full, gathered = tensors(one_process), tensors(fsdp_two)
    assert len(gathered) == len(full)  # every tensor whole, the tied embedding once
    assert set(gathered.values()) == set(full.values())
    state = json.loads((fsdp_two / "checkpoints" / "step-0000008" / "state.json").read_text())
    assert state["optimizer_layout"] == "by_name"


def test_fsdp_checkpoint_resumes_in_one_process(fsdp_two, tmp_path):
    run_dir = resume_dir(fsdp_two, 4, tmp_path / "resumed")
    result = train(resolved_run(1), run_dir)
    assert result.exit_reason == "budget_reached", result.error
    resumed, original = train_losses(run_dir), train_losses(fsdp_two)
    for step in resumed:
        assert resumed[step] == pytest.approx(original[step], rel=1e-3, abs=1e-4), step


def test_sigterm_to_torchrun_stops_every_rank_after_one_step_with_a_checkpoint(tmp_path, cache_dir):
    run_dir = tmp_path / "stopped"
    process = start_torchrun(resolved_run(2, "ddp", steps=10_000), run_dir, cache_dir)
    deadline = time.monotonic() + 120
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and '"train"' in metrics.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    ended = summary(run_dir)
    assert ended["exit_reason"] == "cancelled", out
    assert (run_dir / ended["checkpoint"] / "manifest.json").is_file()
    assert ended["steps"] == int(ended["checkpoint"].rsplit("-", 1)[1]) < 10_000


def test_a_multi_process_plan_started_without_torchrun_says_how_to_start_it(tmp_path):
    result = train(resolved_run(2), tmp_path / "run")
    assert result.exit_reason == "error"
    assert "the plan trains on 2 processes but only one was started" in result.error
    assert "torchrun" in result.error
