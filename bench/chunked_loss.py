"""The LM head and its loss, plain against chunked: time and memory of forward and backward.

Times ``runner.trainer.loss`` alone, off the model: the LM head (a bf16 matmul
under autocast) and the cross-entropy over pre-shifted targets, forward and
backward, for the plain loss (``F.cross_entropy`` over the whole micro-batch's
logits) and for ``linear_cross_entropy`` (the head and the loss a chunk of tokens
at a time), at the vocabulary and width of the presets the memory matrix uses.
Prints a table and writes JSON::

    python bench/chunked_loss.py --out chunked-loss.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from runner.plan.memory import tokens_per_chunk  # noqa: E402
from runner.trainer.loss import linear_cross_entropy  # noqa: E402

HEADS = {"gpt2-124m": (50304, 768), "d20": (65536, 1280), "llama-1b": (32000, 2048)}
TOKENS = (6144, 16384, 65536)


def plain(hidden, weight, targets):
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
        logits = hidden @ weight.t()
    return F.cross_entropy(logits.float(), targets)


def chunked(hidden, weight, targets):
    total = linear_cross_entropy(hidden, weight, targets, torch.bfloat16, tokens_per_chunk(weight.shape[0]))
    return total / targets.numel()


def measure(loss_fn, hidden, weight, targets, repeats: int) -> tuple[float, int]:
    """Median ms of forward and backward, and the bytes allocated above the inputs at the peak."""
    for _ in range(3):
        loss_fn(hidden, weight, targets).backward()
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss_fn(hidden, weight, targets).backward()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        hidden.grad = weight.grad = None
    return statistics.median(times), torch.cuda.max_memory_allocated() - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="JSON results")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/chunked_loss.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    print(f"{'head':10s} {'tokens':>7s} {'plain ms':>9s} {'chunked ms':>10s} {'plain GiB':>10s} {'chunked GiB':>11s}")
    for name, (vocab, width) in HEADS.items():
        for tokens in TOKENS:
            hidden = torch.randn(tokens, width, device="cuda", requires_grad=True)
            weight = (torch.randn(vocab, width, device="cuda") * 0.02).requires_grad_()
            targets = torch.randint(0, vocab, (tokens,), device="cuda")
            row = {"head": name, "vocab": vocab, "width": width, "tokens": tokens}
            for label, fn in (("plain", plain), ("chunked", chunked)):
                try:
                    row[f"{label}_ms"], row[f"{label}_bytes"] = measure(fn, hidden, weight, targets, args.repeats)
                except torch.OutOfMemoryError:
                    row[f"{label}_ms"] = row[f"{label}_bytes"] = None
                torch.cuda.empty_cache()
            rows.append(row)
            show = [f"{row[k]:.1f}" if row[k] is not None else "oom" for k in ("plain_ms", "chunked_ms")]
            gib = [f"{row[k] / 2**30:.2f}" if row[k] is not None else "-" for k in ("plain_bytes", "chunked_bytes")]
            print(f"{name:10s} {tokens:7d} {show[0]:>9s} {show[1]:>10s} {gib[0]:>10s} {gib[1]:>11s}")
            del hidden, weight, targets
    if args.out:
        args.out.write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "command": "bench/chunked_loss.py " + " ".join(sys.argv[1:]),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
