"""Models the trainer builds: presets, the factorized LLaMA, local directories, hub ids, LoRA targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from runner import presets
from runner.errors import UserError
from runner.resolved import ResolvedRun, StagePlan
from runner.spec import Experiment
from runner.trainer.models import CAUSAL_SDPA, build_model, config_from_shape, fp8_eligible, lora_targets

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def experiment(model: dict | str, **extra) -> Experiment:
    return Experiment.model_validate({"name": "m", "model": model, "budget": {"tokens": 1000},
                                      "data": {"sources": [{"path": "data/sample/news.jsonl"}], "seq_len": 32},
                                      **extra})


@pytest.mark.parametrize("tie", [True, False])
def test_the_factorized_models_parameter_count_equals_the_presets(tie):
    shape = presets.with_overrides(presets.PRESETS["factorized-197m"],
                                   {"layers": 2, "hidden": 256, "heads": 4, "intermediate": 512, "tie_embeddings": tie})
    model = AutoModelForCausalLM.from_config(config_from_shape(shape))
    assert sum(p.numel() for p in model.parameters()) == shape.param_count()
    assert type(model).__name__ == "FactorizedLlamaForCausalLM"
    assert model.model.embed_tokens.table.weight.shape == (shape.vocab_size, 128)
    assert (model.lm_head.weight is model.model.embed_tokens.table.weight) == tie


@pytest.mark.slow
def test_the_full_factorized_197m_preset_builds_with_the_presets_parameter_count():
    built = build_model(experiment("factorized-197m"), ROOT, CPU, "fp32")
    assert sum(p.numel() for p in built.model.parameters()) == presets.PRESETS["factorized-197m"].param_count()


@pytest.mark.parametrize("name", ["tiny", "d2"])
def test_presets_and_nanochat_depths_build_from_config_with_sdpa_attention(name):
    built = build_model(experiment(name), ROOT, CPU, "fp32")
    shape = presets.lookup_preset(name)
    assert sum(p.numel() for p in built.model.parameters()) == shape.param_count()
    assert built.model.config._attn_implementation == CAUSAL_SDPA
    assert all(p.dtype == torch.float32 for p in built.model.parameters())


def test_a_local_model_directory_loads_its_config_and_weights(tmp_path):
    shape = presets.with_overrides(presets.PRESETS["tiny"], {"layers": 1, "hidden": 64, "heads": 2, "intermediate": 128})
    saved = AutoModelForCausalLM.from_config(config_from_shape(shape))
    saved.save_pretrained(tmp_path / "model")
    built = build_model(experiment({"path": str(tmp_path / "model"), "pretrained": True}), ROOT, CPU, "fp32")
    for (name, a), (_, b) in zip(saved.state_dict().items(), built.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_an_unreachable_hub_model_ends_the_run_with_a_clear_error_and_exit_code_1(tmp_path):
    job = experiment({"hub": "no-such-org/no-such-model", "pretrained": True})
    plan = ResolvedRun(experiment=job, job_dir=str(ROOT), device="cpu", stages=[StagePlan(seq_len=32, micro_batch=1,
                                                                                         grad_accum=1, steps=1)])
    (tmp_path / "plan.json").write_text(plan.model_dump_json())
    done = subprocess.run([sys.executable, "-m", "runner.trainer", str(tmp_path / "plan.json"), "--out", str(tmp_path)],
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "cannot load model 'no-such-org/no-such-model'" in done.stderr
    assert "Traceback" not in done.stderr  # a user error, not a bug
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["exit_reason"] == "error" and "no-such-model" in summary["error"]


def test_lora_auto_targets_attention_projections_for_llama_and_gpt2():
    llama = build_model(experiment("tiny", lora={"rank": 2}), ROOT, CPU, "fp32").model
    targets = {n.split(".")[-4] for n, _ in llama.named_parameters() if "lora_A" in n}  # ...q_proj.lora_A.default.weight
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj"}
    gpt2 = AutoModelForCausalLM.from_config(config_from_shape(presets.with_overrides(
        presets.PRESETS["gpt2-124m"], {"layers": 1, "hidden": 64, "heads": 2, "intermediate": 128})))
    assert lora_targets(gpt2, experiment("tiny", lora={"rank": 2}).lora) == ["c_attn", "c_proj"]


def test_fp8_converts_a_llamas_linear_layers_and_refuses_gpt2_whose_blocks_are_conv1d():
    tiny_gpt2 = {"preset": "gpt2-124m", "overrides": {"layers": 1, "hidden": 64, "heads": 2, "intermediate": 128}}
    with pytest.raises(UserError, match="fp8 has no layer to convert in this GPT2LMHeadModel"):
        build_model(experiment(tiny_gpt2), ROOT, CPU, "fp8")
    llama = build_model(experiment("tiny"), ROOT, CPU, "fp32").model
    eligible = [name for name, module in llama.named_modules() if fp8_eligible(module, name)]
    assert {name.split(".")[-1] for name in eligible} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"}
    with pytest.raises(UserError, match="fp8 training needs a CUDA GPU"):  # this machine has none
        build_model(experiment("tiny"), ROOT, CPU, "fp8")
    # Under LoRA the frozen base layers convert (the wrapped attention projections' and the MLP's); the fp32
    # adapters, rank 16 wide, stay as they are.
    lora = build_model(experiment("tiny", lora={"rank": 16}), ROOT, CPU, "fp32").model
    names = {name.split(".", 5)[-1] for name, module in lora.named_modules() if fp8_eligible(module, name)}
    assert names == {"self_attn.q_proj.base_layer", "self_attn.k_proj.base_layer", "self_attn.v_proj.base_layer",
                     "self_attn.o_proj.base_layer", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


def test_quantization_without_bitsandbytes_is_a_clear_user_error():
    pytest.importorskip("transformers")
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    job = experiment({"path": "nowhere", "pretrained": True}, lora={"rank": 2}, quantization="4bit")
    with pytest.raises(UserError, match="needs the bitsandbytes package"):
        build_model(job, ROOT, CPU, "fp32")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_fp32_grouped_query_attention_repeats_its_heads_and_computes_the_same_attention_and_gradients(device, monkeypatch):
    # SDPA runs grouped heads only in its 16-bit kernels or its math one (a seq x seq matrix per head);
    # the trainer's attention gives fp32 repeated heads instead. Stock SDPA with grouped heads is the reference.
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from runner.trainer.models import grouped_heads_repeated_in_fp32

    class Attention(torch.nn.Module):
        num_key_value_groups, is_causal = 4, True

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the math kernel's matmuls in full fp32
    torch.manual_seed(0)
    q = torch.randn(2, 8, 16, 32, device=device, requires_grad=True)
    k, v = (torch.randn(2, 2, 16, 32, device=device, requires_grad=True) for _ in range(2))
    repeated = []

    def stock(module, query, key, value, mask, **kw):
        repeated.append(key.shape[1])
        return sdpa_attention_forward(module, query, key, value, mask, **kw)

    ours, _ = grouped_heads_repeated_in_fp32(stock)(Attention(), q, k, v, None, scaling=32**-0.5)
    reference, _ = sdpa_attention_forward(Attention(), q, k, v, None, scaling=32**-0.5)
    assert repeated == [] and ours.shape == reference.shape == (2, 16, 8, 32)
    # Two kernels (on CUDA the memory-efficient one against the math one): equal to fp32's rounding.
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    torch.testing.assert_close(grads, torch.autograd.grad(reference.square().sum(), (q, k, v)), atol=1e-4, rtol=1e-4)
    # 16-bit, fp32 under autocast (SDPA computes in bf16: LLaMA's rotary tables make the queries fp32 in a full
    # fine-tune), or a mask: stock attention, heads as they are
    grouped_heads_repeated_in_fp32(stock)(Attention(), q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
    with torch.autocast(device, dtype=torch.bfloat16):
        grouped_heads_repeated_in_fp32(stock)(Attention(), q, k, v, None)
    grouped_heads_repeated_in_fp32(stock)(Attention(), q, k, v, torch.ones(16, 16, dtype=torch.bool, device=device))
    assert repeated == [2, 2, 2]
