"""The trainer end to end on the sample data: budgets, curriculum, phases, early stopping, LoRA, tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from runner.resolved import ResolvedRun, StagePlan
from runner.spec import Experiment
from runner.trainer.loop import Run, train

ROOT = Path(__file__).resolve().parent.parent
TINY = {"preset": "tiny", "overrides": {"hidden": 64, "layers": 2, "heads": 2, "intermediate": 128, "vocab_size": 512}}
NEWS_AND_FILINGS = {"sources": [{"path": "data/sample/news.jsonl"}, {"path": "data/sample/filings.txt"}],
                    "validation": 0.05, "seq_len": 32}


@pytest.fixture(autouse=True)
def shared_cache(tmp_path_factory, monkeypatch):
    """Tokenizers and token buffers are cached across tests, as RUNNER_CACHE_DIR does across runs."""
    monkeypatch.setenv("RUNNER_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "trainer-cache"))


def resolved_run(stages: list[tuple[int, int, int, int]], token_budget: int | None = None, **experiment) -> ResolvedRun:
    """A resolved run on the CPU: stages are (seq_len, micro_batch, grad_accum, steps)."""
    values = {"name": "t", "model": TINY, "data": NEWS_AND_FILINGS,
              "train": {"lr": 3e-3, "warmup_steps": 2, "log_every_steps": 1, "seed": 3},
              "budget": {"tokens": token_budget or 10**9}, "eval": {"every_steps": 10, "max_batches": 4}}
    values.update(experiment)
    return ResolvedRun(experiment=Experiment.model_validate(values), job_dir=str(ROOT), device="cpu",
                       stages=[StagePlan(seq_len=s, micro_batch=m, grad_accum=a, steps=n) for s, m, a, n in stages],
                       token_budget=token_budget)


def events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


@pytest.mark.slow
def test_a_tiny_model_trains_and_its_eval_loss_falls(tmp_path):
    summary = train(resolved_run([(32, 8, 1, 40)]), tmp_path)
    assert summary.exit_reason == "budget_reached", summary.error
    evals = [e["eval_loss"] for e in events(tmp_path, "eval")]
    assert evals[0] > evals[-1] + 1.0, evals
    train_event = events(tmp_path, "train")[-1]
    assert set(train_event) >= {"step", "loss", "lr", "tokens", "tokens_per_s", "mfu", "peak_bytes", "elapsed_s",
                                "budget_pct", "seq_len"}
    assert train_event["budget_pct"] == 100.0
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["final_eval_loss"] == pytest.approx(evals[-1]) and written["best_eval_loss"] == pytest.approx(min(evals))
    memory = written["memory"]
    assert memory["params_bytes"] > 0 and memory["optimizer_bytes"] >= 2 * memory["params_bytes"]  # AdamW: m and v


def test_the_token_budget_is_hit_exactly_and_never_exceeded(tmp_path):
    budget = 10_000
    steps = budget // (32 * 4 * 2)  # whole steps that fit
    summary = train(resolved_run([(32, 4, 2, steps)], token_budget=budget), tmp_path)
    assert summary.exit_reason == "budget_reached", summary.error
    assert summary.tokens == summary.planned_tokens == steps * 32 * 4 * 2 <= budget
    assert events(tmp_path, "train")[-1]["tokens"] == summary.tokens


def test_curriculum_switches_seq_len_and_batch_at_stage_boundaries(tmp_path):
    summary = train(resolved_run([(16, 8, 1, 3), (32, 4, 1, 2), (64, 2, 1, 2)], token_budget=2000), tmp_path)
    assert summary.exit_reason == "budget_reached", summary.error
    seen = [(e["step"], e["seq_len"], e["tokens"]) for e in events(tmp_path, "train")]
    assert seen == [(1, 16, 128), (2, 16, 256), (3, 16, 384), (4, 32, 512), (5, 32, 640), (6, 64, 768), (7, 64, 896)]


def test_phases_pretrain_then_sft_switch_data_and_lr_at_their_token_share(tmp_path):
    phases = [{"name": "pretrain", "share": 0.75},
              {"name": "sft", "share": 0.25, "lr": 1e-4,
               "data": {"sources": [{"path": "data/sample/qa.jsonl", "text_fields": ["question", "answer"]}],
                        "seq_len": 32, "packing": False, "validation": 0.05}}]
    summary = train(resolved_run([(32, 4, 1, 8)], token_budget=1024, phases=phases,
                                 train={"lr": 3e-3, "warmup_steps": 1, "log_every_steps": 1}), tmp_path)
    assert summary.exit_reason == "budget_reached", summary.error
    train_events = events(tmp_path, "train")
    assert [e["phase"] for e in train_events] == ["pretrain"] * 6 + ["sft"] * 2
    assert train_events[6]["lr"] == pytest.approx(1e-4)  # the SFT phase warms up to its own peak
    assert train_events[5]["lr"] < 3e-3


def test_an_epoch_budget_counts_steps_from_the_tokenized_data(tmp_path):
    qa = {"sources": [{"path": "data/sample/qa.jsonl", "text_fields": ["question", "answer"]}],
          "seq_len": 48, "packing": False, "validation": 0.1}
    resolved = resolved_run([(48, 16, 4, None)], data=qa, budget={"epochs": 0.25})
    summary = train(resolved.model_copy(update={"token_budget": None, "epochs": 0.25}), tmp_path)
    assert summary.exit_reason == "budget_reached", summary.error
    train_rows = 1602 - round(1602 * 0.1)
    assert summary.steps == -(-train_rows // 4 // 64)  # ceil(0.25 epoch of rows / 64 rows per step)


@pytest.mark.slow
def test_early_stopping_fires_on_a_plateau(tmp_path):
    resolved = resolved_run([(32, 4, 1, 200)], train={"lr": 1e-7, "warmup_steps": 0, "log_every_steps": 5},
                            eval={"every_steps": 2, "max_batches": 2},
                            early_stopping={"patience_steps": 6, "min_delta": 0.01})
    summary = train(resolved, tmp_path)
    assert summary.exit_reason == "early_stop", summary.error
    assert summary.steps == 6  # improvements are below min_delta from the first eval on, so 6 steps of patience
    assert (tmp_path / "checkpoints" / "step-0000006" / "manifest.json").is_file()


def test_a_lora_job_trains_only_adapter_weights_and_leaves_the_base_unchanged(tmp_path):
    resolved = resolved_run([(32, 4, 1, 4)], lora={"rank": 4, "alpha": 8, "dropout": 0.0})
    run = Run(resolved, tmp_path)
    torch.manual_seed(resolved.experiment.train.seed)
    run.execute()
    assert run.summary.exit_reason == "budget_reached"
    fresh = Run(resolved, tmp_path / "fresh")
    fresh._setup()  # the same seed builds the same initial weights
    trained = dict(run.model.named_parameters())
    for name, before in fresh.model.named_parameters():
        if "lora_" in name:
            assert trained[name].requires_grad
        else:
            assert not trained[name].requires_grad
            assert torch.equal(trained[name], before), name
    assert any("lora_B" in n and trained[n].abs().sum() > 0 for n in trained)  # B starts at zero, so it moved
    from safetensors import safe_open

    with safe_open(str(tmp_path / "checkpoints" / "step-0000004" / "model.safetensors"), "pt") as f:
        assert f.keys() and all("lora_" in k for k in f.keys())


def test_a_from_scratch_preset_trains_a_tokenizer_that_is_saved_with_the_run(tmp_path):
    summary = train(resolved_run([(32, 4, 1, 1)], eval={"on_start": False}), tmp_path)
    assert summary.exit_reason == "budget_reached", summary.error
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    assert 258 <= len(tokenizer) <= 512  # at most the model's vocab; the model's vocab stays 512
    assert tokenizer.decode(tokenizer("Revenue rose 4.3%")["input_ids"]) == "Revenue rose 4.3%"
    config = json.loads((tmp_path / "checkpoints" / "step-0000001" / "config.json").read_text())
    assert config["vocab_size"] == 512


def test_a_user_error_ends_the_run_with_exit_reason_error_and_a_message(tmp_path):
    data = {**NEWS_AND_FILINGS, "sources": [{"path": "data/sample/missing.jsonl"}]}
    summary = train(resolved_run([(32, 4, 1, 1)], data=data), tmp_path)
    assert summary.exit_reason == "error"
    assert "data file not found" in summary.error
    assert json.loads((tmp_path / "summary.json").read_text())["exit_reason"] == "error"


CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.53 GiB of which 1.12 GiB "
            "is free. Process 4242 has 3.10 GiB memory in use. Including non-PyTorch memory, this process has 19.20 GiB "
            "memory in use. Of the allocated memory 18.50 GiB is allocated by PyTorch, and 290.00 MiB is reserved by "
            "PyTorch but unallocated. If reserved but unallocated memory is large try setting "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory "
            "Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)")


def test_running_out_of_memory_ends_the_run_with_where_and_the_devices_figures_and_no_traceback(tmp_path, monkeypatch,
                                                                                               capsys):
    # A CPU has no device memory to run out of: the third step fails the way CUDA's allocator does.
    from runner.trainer.engine import Engine

    real_step, calls = Engine.step, []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError(CUDA_OOM)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "step", step)
    summary = train(resolved_run([(32, 4, 1, 5)], eval={"on_start": False}), tmp_path)
    assert summary.exit_reason == "error" and summary.steps == 2
    assert summary.error == ("out of memory in step 3 (micro-batch 4 at seq 32): CUDA out of memory. Tried to allocate "
                             "2.00 GiB. GPU 0 has a total capacity of 23.53 GiB of which 1.12 GiB is free. Including "
                             "non-PyTorch memory, this process has 19.20 GiB memory in use. Of the allocated memory "
                             "18.50 GiB is allocated by PyTorch, and 290.00 MiB is reserved by PyTorch but unallocated.")
    err = capsys.readouterr().err
    assert f"error: {summary.error}" in err and "Traceback" not in err
    assert json.loads((tmp_path / "summary.json").read_text())["error"] == summary.error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_step_too_big_for_the_gpu_ends_the_run_out_of_memory_in_that_step(tmp_path):
    # The allocator capped 96 MiB above what the process holds already (earlier tests' cache given back): the tiny
    # model and its states fit, a step of 2048 x 32 tokens does not.
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_reserved()
    torch.cuda.set_per_process_memory_fraction((held + 96 * 2**20) / torch.cuda.get_device_properties(0).total_memory)
    try:
        resolved = resolved_run([(32, 2048, 1, 3)], eval={"on_start": False}).model_copy(
            update={"device": "cuda", "precision": "bf16"})
        summary = train(resolved, tmp_path)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert summary.exit_reason == "error" and summary.steps == 0
    assert summary.error.startswith("out of memory in step 1 (micro-batch 2048 at seq 32): CUDA out of memory. "
                                    "Tried to allocate ")
    assert "If reserved" not in summary.error and summary.peak_bytes <= held + 96 * 2**20


def test_running_out_of_memory_in_an_evaluation_says_so(tmp_path, monkeypatch):
    from runner.trainer.engine import Engine

    def evaluate(self, *args, **kwargs):
        raise torch.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(Engine, "evaluate", evaluate)
    summary = train(resolved_run([(32, 4, 1, 5)]), tmp_path)  # evaluates on start
    assert summary.error.startswith("out of memory in the evaluation after step 0: CUDA out of memory.")
