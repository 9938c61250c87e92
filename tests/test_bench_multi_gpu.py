"""bench/multi_gpu.py: its runs are the ones the issue asks for, and it runs end to end on a CPU (gloo)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "multi_gpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("multi_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("profile, layers", [("h100-80gb", 32), ("h200-141gb", 48)])
def test_the_fsdp_run_is_a_model_that_ddp_cannot_fit_on_the_card_and_fsdp_can(profile, layers):
    bench = load_bench()
    gpt2_one, gpt2_two, big = bench.runs(profile, "cuda", tiny=False, steps=30)
    assert (gpt2_one.model, gpt2_one.seq_len, gpt2_one.precision, gpt2_one.gpus) == ("gpt2-124m", 1024, "bf16", 1)
    assert gpt2_two.gpus == 2 and gpt2_two.parallelism == "ddp"
    assert dict(big.overrides) == {"layers": layers}
    plan = bench.plan_for(big, profile)
    assert plan.parallelism == "fsdp" and plan.fits, plan.reasons
    ddp = bench.plan_for(bench.replace(big, asked="ddp"), profile)
    assert not ddp.fits


@pytest.mark.slow
def test_the_bench_runs_one_process_ddp_and_fsdp_on_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--steps", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["run"]["name"]: r for r in results["rows"]}
    assert [(rows[n]["processes"], rows[n]["parallelism"]) for n in ("gpt2-1gpu", "gpt2-2gpu", "fsdp-2gpu")] == [
        (1, "single"), (2, "ddp"), (2, "fsdp")]
    assert all(r["tokens_per_s"] > 0 and r["predicted_peak_bytes"] > 0 for r in rows.values())
    assert results["summary"]["speedup_2_gpus"] > 0 and results["summary"]["fsdp_trained"]
    assert results["table"] in done.stdout and "gpt2-2gpu" in results["table"]
