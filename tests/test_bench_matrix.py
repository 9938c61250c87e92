"""The GPU memory matrix: its configurations straddle the planner's limits, and it runs end to end on a CPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from runner.plan.memory import MemoryBreakdown
from runner.spec import resolve_shape

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_memory_matrix.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_memory_matrix", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def test_the_matrix_spans_the_models_lengths_and_switches_the_issue_asks_for():
    configs = bench.matrix()
    assert len(configs) >= 14
    assert {"gpt2-124m", "gpt2-355m", "llama-1b", "llama-7b", "d12", "d20"} <= {c.model for c in configs}
    assert {512, 1024, 2048} <= {c.seq_len for c in configs}
    assert {"bf16", "fp16", "fp32"} <= {c.precision for c in configs}
    assert {True, False} == {c.checkpointing for c in configs} == {c.compile for c in configs}
    assert all(c.lora and c.precision == "fp16" for c in configs if c.model == "llama-7b")
    assert len({c.micro_batch for c in configs}) >= 3
    # Each probe (a shape, compiled or not, fp32 or not) runs before the others of its kind.
    keys = [bench.probe_key(c) for c in configs]
    assert len(set(keys)) < len(keys)


def test_every_matrix_configuration_is_predicted_to_fit_the_80gb_card_within_the_models_context():
    for config in bench.matrix():
        plan = bench.plan_for(config, bench.H100)
        assert plan.fits, config.name
        assert config.seq_len <= resolve_shape(bench.job_for(config)).max_positions, config.name


@pytest.mark.parametrize("part", ["fit24", "fit40"])
def test_fit_checks_take_the_largest_batch_the_planner_fits_and_one_more(part):
    configs = bench.configs_for(part, tiny=False)
    assert len(configs) >= 10
    profile = bench.FIT_PROFILES[part]
    by_base: dict = {}
    for config in configs:
        assert config.profile == profile and config.cap_bytes == bench.plan_for(config, profile).memory.capacity_bytes
        by_base.setdefault(config.name.replace(f"-b{config.micro_batch}-", "-"), []).append(config)
    for runs in by_base.values():
        verdicts = [bench.plan_for(c, profile).fits for c in runs]
        if len(runs) == 2:
            assert verdicts == [True, False] and runs[1].micro_batch == runs[0].micro_batch + 1
        else:
            assert verdicts == [False] and runs[0].micro_batch == 1
    full_7b = [c for c in configs if c.model == "llama-7b" and not c.lora]
    assert len(full_7b) == 1 and not bench.plan_for(full_7b[0], profile).fits


def test_a_run_that_runs_out_of_memory_or_over_the_cap_does_not_fit():
    cap = 24 * 2**30
    oom = bench.verdict(False, {"status": "oom", "device": "cuda"}, cap)
    assert oom["actual_fits"] is False and oom["agrees"] is True
    over = bench.verdict(True, {"status": "ok", "device": "cuda", "peak_bytes": cap + 1}, cap)
    assert over["actual_fits"] is False and over["agrees"] is False
    within = bench.verdict(True, {"status": "ok", "device": "cuda", "peak_bytes": cap}, cap)
    assert within["agrees"] is True
    assert bench.verdict(True, {"status": "timeout"}, cap)["agrees"] is None


def test_the_probe_scales_the_reference_speed_by_executed_flops_per_token_and_adds_its_fixed_cost():
    reference, other = bench.matrix()[0], bench.Config("llama-1b", 1024, 8, "bf16", checkpointing=True)
    flops_per_s = 100_000 * bench.executed_flops(reference)
    plan = bench.plan_for(other, bench.H100, throughput=bench.ProbedThroughput(flops_per_s, 0.0, reference.name))
    assert plan.tokens_per_s == pytest.approx(flops_per_s / bench.executed_flops(other))
    assert plan.throughput_source == f"probed by {reference.name}"
    fixed = bench.plan_for(other, bench.H100, throughput=bench.ProbedThroughput(flops_per_s, 0.1, reference.name))
    step_s = bench.tokens_per_step(other) / fixed.tokens_per_s
    assert step_s == pytest.approx(0.1 + bench.tokens_per_step(other) * bench.executed_flops(other) / flops_per_s)


def ran(config, step_s, part="matrix"):
    measured = {"status": "ok", "device": "cuda", "peak_bytes": 1, "mean_step_s": step_s,
                "tokens_per_s": bench.tokens_per_step(config) / step_s}
    return bench.record(part, config, measured)


def test_each_shape_is_probed_at_two_micro_batches_and_the_rest_of_its_kind_is_predicted_out_of_sample():
    first = bench.Config("gpt2-355m", 1024, 8, "bf16")
    close = bench.Config("gpt2-355m", 1024, 12, "bf16")  # too near the first to tell a fixed cost
    second = bench.Config("gpt2-355m", 1024, 16, "bf16")
    other = bench.Config("gpt2-355m", 512, 16, "fp16", checkpointing=True)

    def step_s(config):  # 20 ms per micro-batch, then the work at 100 TFLOP/s
        return 0.02 + bench.tokens_per_step(config) * bench.executed_flops(config) / 1e14

    entries = [ran(first, step_s(first)), ran(close, step_s(close)), ran(second, step_s(second), "fit24"),
               ran(other, step_s(other), "fit40")]
    assert bench.calibrate(entries) == {"gpt2-355m/False/False": [first.name, second.name]}
    assert [e["reference"] for e in entries] == [True, False, True, False]
    for e in (entries[1], entries[3]):
        assert e["predicted_probed"]["source"] == f"probed by {first.name} and {second.name}"
        assert e["error_pct"]["step_probed"] == pytest.approx(0, abs=1e-6)
        assert e["error_pct"]["step_one_run"] != pytest.approx(0, abs=1)  # the first run alone misses the fixed cost
    summary = bench.summarize(entries)
    assert summary["step_within_15pct"] == summary["step_compared"] == 2


@pytest.mark.slow
def test_the_matrix_runs_on_a_cpu_with_tiny_models_and_writes_every_field(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--limit", "2", "--part", "all",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["summary"]["ran"] == 6 and not report["summary"]["failed"]
    assert [r["part"] for r in report["results"]] == ["matrix"] * 2 + ["fit24"] * 2 + ["fit40"] * 2
    terms = {f.name for f in fields(MemoryBreakdown)}
    for result in report["results"]:
        assert (tmp_path / f"{result['name']}.json").is_file()
        predicted, measured = result["predicted"], result["measured"]
        assert terms <= set(predicted["breakdown"])
        assert {"peak_bytes", "allocated_bytes", "fits", "tokens_per_s", "step_s", "capacity_bytes"} <= set(predicted)
        assert measured["status"] == "ok" and measured["peak_bytes"] > 0 and measured["tokens_per_s"] > 0
        assert len(measured["step_s"]) == result["config"]["timed_steps"]
        assert {"max_reserved_bytes", "max_allocated_bytes", "runtime_bytes", "smi_process_bytes"} <= set(measured)
        assert {"peak", "allocated", "step_catalog", "step_probed"} <= set(result["error_pct"])
        assert {"predicted_fits", "actual_fits", "agrees", "capacity_bytes"} <= set(result["verdict"])
    tail = done.stdout.strip().splitlines()
    assert tail[-1].startswith("cpu; peak within 10%") and any(line.startswith("config ") for line in tail)
