"""The speed benchmark runs end to end on the CPU with a tiny model (the real numbers come from a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_speed_benchmark_runs_ours_and_the_hf_trainer_on_cpu_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "bench/trainer_speed.py", "--device", "cpu", "--tiny", "--steps", "3",
                           "--warmup", "1", "--batch", "2", "--only", "hf,ours", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [r["run"] for r in report["results"]] == ["hf", "ours"]
    assert all(r["tokens_per_s"] > 0 and r["peak_bytes"] > 0 for r in report["results"])
    assert "ours/hf" in report["ratios"] and "runner.trainer" in done.stdout


@pytest.mark.parametrize("preset", ["gpt2-124m", "llama-160m"])
def test_the_trainers_attention_matches_stock_sdpa_and_leaves_the_causal_mask_to_sdpa_under_compile(preset):
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import trainer_speed

    from runner import presets
    from runner.trainer.models import causal_attention

    shape = presets.with_overrides(presets.PRESETS[preset], trainer_speed.TINY)
    stock = trainer_speed.new_model(shape, torch.device("cpu"))
    ours = trainer_speed.new_model(shape, torch.device("cpu"), causal_attention())
    inputs = torch.randint(0, shape.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    padding = torch.ones_like(inputs)
    padding[0, -5:] = 0
    with torch.no_grad():
        for mask in (None, padding):
            torch.testing.assert_close(ours(input_ids=inputs, attention_mask=mask, use_cache=False).logits,
                                       stock(input_ids=inputs, attention_mask=mask, use_cache=False).logits,
                                       rtol=0, atol=0)

    calls = []

    def record_sdpa(graph, example_inputs):
        calls.extend((n.kwargs.get("attn_mask"), n.kwargs.get("is_causal")) for n in graph.graph.nodes
                     if "scaled_dot_product_attention" in str(n.target))
        return graph.forward

    # as the trainer calls it (runner.trainer.loss): without a cache, where transformers also looks for
    # packed sequences in the position ids and cannot rule them out while tracing
    torch._dynamo.reset()
    torch.compile(ours, backend=record_sdpa)(input_ids=inputs, use_cache=False)
    assert calls and all(mask is None and causal for mask, causal in calls)
