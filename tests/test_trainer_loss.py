"""The chunked LM-head loss: the same loss and gradients as the plain one, one chunk's logits at a time."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from runner import presets
from runner.plan.memory import tokens_per_chunk
from runner.trainer.data import IGNORE
from runner.trainer.loss import CausalLMLoss, ChunkedLinearLoss, make_loss
from runner.trainer.models import config_from_shape

SMALL = {"layers": 2, "hidden": 64, "heads": 4, "intermediate": 128, "vocab_size": 300}


def model_of(preset: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    shape = presets.with_overrides(presets.PRESETS[preset], {**SMALL, **overrides})
    return AutoModelForCausalLM.from_config(config_from_shape(shape))


def batch(rows: int = 3, seq: int = 37, vocab: int = 300, ignored: int = 10):
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, vocab, (rows, seq), generator=generator)
    targets = torch.randint(0, vocab, (rows, seq), generator=generator)
    targets.view(-1)[torch.randperm(rows * seq, generator=generator)[:ignored]] = IGNORE
    return inputs, targets


def loss_and_grads(loss_fn, model, inputs, targets):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(inputs, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", ["gpt2-124m", "llama-160m", "factorized-197m"])
def test_the_chunked_loss_and_every_gradient_equal_the_plain_losses_with_ignored_targets(preset):
    model = model_of(preset)
    inputs, targets = batch()
    plain, plain_grads = loss_and_grads(CausalLMLoss(model), model, inputs, targets)
    # 111 tokens in chunks of 16: seven chunks, the last one short
    chunked, chunked_grads = loss_and_grads(ChunkedLinearLoss(model, model.get_output_embeddings(), 16),
                                            model, inputs, targets)
    torch.testing.assert_close(chunked, plain)
    assert chunked_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_under_bf16_autocast_the_head_runs_in_bf16_and_the_loss_stays_close():
    model = model_of("llama-160m")
    inputs, targets = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, plain_grads = loss_and_grads(CausalLMLoss(model), model, inputs, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked, chunked_grads = loss_and_grads(ChunkedLinearLoss(model, model.lm_head, 32), model, inputs, targets)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, rtol=1e-2, atol=1e-2)
    head = plain_grads["lm_head.weight"]
    assert torch.nn.functional.cosine_similarity(chunked_grads["lm_head.weight"].flatten(), head.flatten(), dim=0) > 0.99


def test_a_frozen_head_gets_no_gradient_and_the_rest_still_train():
    model = model_of("llama-160m")
    model.lm_head.weight.requires_grad_(False)
    inputs, targets = batch()
    plain, plain_grads = loss_and_grads(CausalLMLoss(model), model, inputs, targets)
    chunked, chunked_grads = loss_and_grads(ChunkedLinearLoss(model, model.lm_head, 16), model, inputs, targets)
    assert "lm_head.weight" not in chunked_grads
    torch.testing.assert_close(chunked_grads["model.layers.0.mlp.up_proj.weight"],
                               plain_grads["model.layers.0.mlp.up_proj.weight"], rtol=1e-4, atol=1e-6)


def test_evaluation_without_gradients_gives_the_same_loss_and_keeps_no_graph():
    model = model_of("gpt2-124m")
    inputs, targets = batch()
    with torch.no_grad():
        chunked = ChunkedLinearLoss(model, model.get_output_embeddings(), 16)(inputs, targets)
        plain = CausalLMLoss(model)(inputs, targets)
    assert chunked.grad_fn is None
    torch.testing.assert_close(chunked, plain)


def test_no_tensor_larger_than_one_chunks_logits_is_made():
    model = model_of("llama-160m", vocab_size=4000)
    inputs, targets = batch(rows=4, seq=64, vocab=4000)
    vocab, hidden = 4000, 64

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    with Largest():
        ChunkedLinearLoss(model, model.lm_head, 32)(inputs, targets).backward()
    assert Largest.numel == max(32 * vocab, vocab * hidden)  # a chunk's logits or the head's gradient
    with Largest():
        CausalLMLoss(model)(inputs, targets).backward()
    assert Largest.numel == 4 * 64 * vocab


def test_the_chunked_loss_is_used_unless_compiled_or_the_head_is_not_a_plain_linear():
    model = model_of("gpt2-124m")
    assert isinstance(make_loss(model, compiled=False), ChunkedLinearLoss)
    assert type(make_loss(model, compiled=True)) is CausalLMLoss
    model.config.model_type = "gemma2"  # soft-caps its logits after the head
    assert type(make_loss(model, compiled=False)) is CausalLMLoss
    model.config.model_type = "gpt2"

    class QuantizedLinear(torch.nn.Linear):  # as bitsandbytes' and torchao's layers are
        pass

    model.lm_head = QuantizedLinear(64, 300, bias=False)
    assert type(make_loss(model, compiled=False)) is CausalLMLoss


def test_a_chunk_holds_256_mib_of_fp32_logits_in_whole_tiles():
    assert tokens_per_chunk(50304) == 1280  # 256 MiB / (4 B x 50304) = 1334, down to a multiple of 128
    assert tokens_per_chunk(32000) == 2048
    assert tokens_per_chunk(10**7) == 128


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_full_gpt2_shape_under_bf16_matches_and_drops_the_loss_buffers():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_from_shape(presets.PRESETS["gpt2-124m"])).cuda()
    inputs, targets = (t.cuda() for t in batch(rows=8, seq=1024, vocab=50304, ignored=100))
    results = {}
    for name, loss_fn in (("plain", CausalLMLoss(model)), ("chunked", make_loss(model, compiled=False))):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, grads = loss_and_grads(loss_fn, model, inputs, targets)
        results[name] = loss, grads, torch.cuda.max_memory_allocated()
    (plain, plain_grads, plain_peak), (chunked, chunked_grads, chunked_peak) = results["plain"], results["chunked"]
    torch.testing.assert_close(chunked, plain, rtol=2e-3, atol=2e-3)
    for name in ("transformer.wte.weight", "transformer.h.0.mlp.c_fc.weight", "transformer.h.11.attn.c_attn.weight"):
        similarity = torch.nn.functional.cosine_similarity(chunked_grads[name].flatten(), plain_grads[name].flatten(), dim=0)
        assert similarity > 0.999, name
    # 8192 tokens x 50304 x 12 B of eager loss buffers (4.6 GiB) give way to one 1280-token chunk
    assert plain_peak - chunked_peak > 2.5 * 2**30, (plain_peak / 2**30, chunked_peak / 2**30)
