"""Next-token losses: the model's logits through cross-entropy, or the LM head and the loss in chunks.

An eager cross-entropy over a whole micro-batch holds the fp32 log-softmax and its
incoming and outgoing gradients at once: 12 B per token per vocabulary entry, 19 GiB
for GPT-2 at 33k tokens, more than the model, its gradients and its optimizer
together. ``ChunkedLinearLoss`` runs the LM head and the loss a chunk of tokens at a
time and works out the head's and the hidden states' gradients on the way, so that
only one chunk's logits ever exist, with no extra matmuls. torch.compile fuses the
loss by itself (only the bf16 logits stay), so compiled jobs keep ``CausalLMLoss``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from runner.plan.memory import tokens_per_chunk
from runner.trainer import factorized
from runner.trainer.data import IGNORE

# Model types whose forward ends in ``logits = lm_head(hidden)``, a linear without bias and
# nothing after it: skipping the head hands the loss exactly what the head would read.
PLAIN_HEAD_TYPES = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3", factorized.MODEL_TYPE})


class CausalLMLoss(nn.Module):
    """Mean next-token cross-entropy over the non-ignored targets, computed in fp32.

    The loss is ours (not the model's ``labels=`` path) so that targets can be
    pre-shifted rows and so that torch.compile fuses the fp32 upcast into it.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=inputs, use_cache=False).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=IGNORE)


class ChunkedLinearLoss(nn.Module):
    """The same loss as ``CausalLMLoss``, with the LM head applied a chunk of tokens at a time.

    The model runs with its head skipped (through any DDP or FSDP wrapper, so their
    hooks still fire) and the head's weight goes to ``linear_cross_entropy``.
    """

    def __init__(self, model: nn.Module, head: nn.Linear, chunk_tokens: int | None = None):
        super().__init__()
        self.model = model
        self.head = head
        self.chunk_tokens = chunk_tokens or tokens_per_chunk(head.weight.shape[0])

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with _head_skipped(self.head):
            hidden = self.model(input_ids=inputs, use_cache=False).logits
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.head.weight.dtype
        targets = targets.reshape(-1)
        with torch.autocast(device, enabled=False):
            total = linear_cross_entropy(hidden.reshape(-1, hidden.size(-1)), self.head.weight, targets, dtype,
                                         self.chunk_tokens)
        return total / (targets != IGNORE).sum()


def make_loss(model: nn.Module, *, compiled: bool) -> nn.Module:
    """The loss module the engine calls: chunked where the head allows it and nothing is compiled."""
    inner = getattr(model, "module", model)  # DDP keeps the model as .module
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    # exactly nn.Linear: a quantized, float8 or LoRA-wrapped head keeps its own forward
    plain = (getattr(getattr(inner, "config", None), "model_type", None) in PLAIN_HEAD_TYPES
             and type(head) is nn.Linear and head.bias is None)
    if compiled or not plain:
        return CausalLMLoss(model)
    return ChunkedLinearLoss(model, head)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         dtype: torch.dtype, chunk_tokens: int) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets`` (IGNORE skipped), in chunks.

    Matmuls run in ``dtype``, the softmax in fp32. With gradients on, they are computed
    here and kept for backward: the hidden states' (their own dtype) and the weight's
    (fp32), instead of every chunk's logits.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, dtype, chunk_tokens)
    return _chunks(hidden, weight, targets, dtype, chunk_tokens, False, False)[0]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, chunk_tokens):
        total, grad_hidden, grad_weight = _chunks(hidden, weight, targets, dtype, chunk_tokens,
                                                  ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_total.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def _chunks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype,
            chunk_tokens: int, want_hidden: bool, want_weight: bool):
    """(summed loss, d loss/d hidden or None, d loss/d weight in fp32 or None), one chunk at a time.

    Four passes over a chunk's logits (the fp32 copy, log-softmax, exp, the cast
    back); ignored targets are masked in the hidden states' small matrices rather
    than in the logits. Adding each chunk's share of the head's gradient into one
    fp32 buffer makes the whole 7-16% slower than the plain loss on an H200
    (bench/chunked_loss.py), for 4-34x less memory.
    """
    w = weight.to(dtype)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
    for start in range(0, hidden.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        h, t = hidden[rows].to(dtype), targets[rows]
        keep = (t != IGNORE)[:, None]
        picked = t.masked_fill(~keep[:, 0], 0)
        log_probs = (h @ w.t()).float().log_softmax(-1)
        total -= (log_probs.gather(1, picked[:, None]) * keep).sum()
        if not (want_hidden or want_weight):
            continue
        # d(sum of losses)/d logits = softmax - one-hot; rows of ignored targets count for nothing
        probs = log_probs.exp_()
        probs[torch.arange(len(t), device=t.device), picked] -= 1
        grad = probs.to(dtype)
        del log_probs, probs
        if grad_hidden is not None:
            grad_hidden[rows] = (grad @ w).mul_(keep)
        if grad_weight is not None:
            grad_weight.add_(grad.t() @ (h * keep))
    return total, grad_hidden, grad_weight


@contextlib.contextmanager
def _head_skipped(head: nn.Module) -> Iterator[None]:
    """Make ``head`` hand its input through for one forward (an instance attribute shadows the class's)."""
    head.forward = _through
    try:
        yield
    finally:
        del head.forward


def _through(hidden: torch.Tensor) -> torch.Tensor:
    return hidden
