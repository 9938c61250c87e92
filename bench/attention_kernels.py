"""Causal attention kernels at the trainer-speed shape: which one a GPT-2 124M step should use.

One layer's attention at GPT-2 124M's shape (12 heads of 64, seq 1024, bf16,
causal), forward and backward, through each SDPA backend torch offers (cuDNN,
flash, memory-efficient) and through compiled flex attention, with q, k and v
laid out as transformers' GPT-2 hands them over (batch, seq, heads, head
contiguous, seen through a transpose) and contiguous per head. Then cuDNN with
q, k and v as slices of one fused projection's output, as GPT-2 makes them,
where autograd also assembles the fused gradient, and with the output's
gradient laid out as GPT-2 returns it too. FlashAttention 4 (the flash-attn-4
package, where installed) in both layouts. CUDA events around 20 calls
back to back, the median of 5 such, after 10 calls; TFLOP/s count causal
attention only (2·b·h·T²·d forward, 2.5 times that backward). Needs a CUDA GPU; prints a table.

    python3 bench/attention_kernels.py --batch 16
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, SEQ, HEAD = 12, 1024, 64
WIDTH = HEADS * HEAD
CALLS = 20


def sdpa(backend: SDPBackend) -> Callable:
    def attend(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attend


def flex() -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = create_block_mask(lambda b, h, q, k: q >= k, None, None, SEQ, SEQ, device="cuda")
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=mask)


def flash4() -> Callable:
    """FlashAttention 4 (``flash_attn.cute``), which takes (batch, seq, heads, head): the layout under the views."""
    from flash_attn.cute import flash_attn_func

    def attend(q, k, v):
        out, _ = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    return attend


def separate(batch: int, contiguous: bool) -> Callable[[], list[torch.Tensor]]:
    """q, k, v as three tensors: (batch, heads, seq, head) views of (batch, seq, heads, head), or contiguous."""
    leaves = [torch.randn(batch, SEQ, HEADS, HEAD, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    if contiguous:
        leaves = [t.transpose(1, 2).contiguous() for t in leaves]
    leaves = [t.requires_grad_() for t in leaves]
    return lambda: [t if contiguous else t.transpose(1, 2) for t in leaves]


def fused(batch: int) -> Callable[[], list[torch.Tensor]]:
    """q, k, v as slices of one projection's output (batch, seq, 3 x width), as GPT-2 splits it."""
    qkv = torch.randn(batch, SEQ, 3 * WIDTH, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return lambda: [t.view(batch, SEQ, HEADS, HEAD).transpose(1, 2) for t in qkv.split(WIDTH, dim=2)]


def timed(attend: Callable, inputs: Callable[[], list[torch.Tensor]], batch: int,
          gpt2_grad: bool = False) -> tuple[float, float]:
    """Forward and backward milliseconds of one call: the median of 5 timings of 20 calls back to back
    (one call alone is too short to time: the host's launch would count). The output's gradient is
    contiguous per head, or (``gpt2_grad``) laid out as GPT-2's merge of the heads returns it."""
    if gpt2_grad:
        grad = torch.randn(batch, SEQ, HEADS, HEAD, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    else:
        grad = torch.randn(batch, HEADS, SEQ, HEAD, device="cuda", dtype=torch.bfloat16)
    for _ in range(10):
        attend(*inputs()).backward(grad)

    def per_call(backward: bool) -> float:
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(CALLS):
                out = attend(*inputs())
                if backward:
                    out.backward(grad)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / CALLS)
        return statistics.median(times)

    forward = per_call(False)
    return forward, per_call(True) - forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    batch = parser.parse_args().batch
    flops = 2 * batch * HEADS * SEQ * SEQ * HEAD
    runs = [("cuDNN", lambda: sdpa(SDPBackend.CUDNN_ATTENTION), lambda: separate(batch, False)),
            ("cuDNN, contiguous", lambda: sdpa(SDPBackend.CUDNN_ATTENTION), lambda: separate(batch, True)),
            ("cuDNN, fused qkv slices", lambda: sdpa(SDPBackend.CUDNN_ATTENTION), lambda: fused(batch)),
            ("cuDNN, as in GPT-2", lambda: sdpa(SDPBackend.CUDNN_ATTENTION), lambda: fused(batch), True),
            ("flash", lambda: sdpa(SDPBackend.FLASH_ATTENTION), lambda: separate(batch, False)),
            ("memory-efficient", lambda: sdpa(SDPBackend.EFFICIENT_ATTENTION), lambda: separate(batch, False)),
            ("FlashAttention 4", flash4, lambda: separate(batch, False)),
            ("FlashAttention 4, as in GPT-2", flash4, lambda: fused(batch), True),
            ("flex, compiled", flex, lambda: separate(batch, False)),
            ("flex, compiled, contiguous", flex, lambda: separate(batch, True))]
    print(f"batch {batch}, {HEADS} heads of {HEAD}, seq {SEQ}, bf16, causal; torch {torch.__version__}, "
          f"cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}")
    print(f"{'kernel':30s} {'fwd ms':>7s} {'bwd ms':>7s} {'fwd TF/s':>9s} {'bwd TF/s':>9s} {'12 layers ms':>13s}")
    for name, attend, inputs, *gpt2_grad in runs:
        try:
            f, b = timed(attend(), inputs(), batch, *gpt2_grad)
        except (RuntimeError, NotImplementedError, ImportError, AssertionError) as exc:  # refused, or not installed
            print(f"{name:30s} {str(exc).splitlines()[0][:80]}")
            continue
        print(f"{name:30s} {f:7.3f} {b:7.3f} {flops / f / 1e9:9.0f} {2.5 * flops / b / 1e9:9.0f} {12 * (f + b):13.2f}")


if __name__ == "__main__":
    main()
