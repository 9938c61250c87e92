"""What is alive at a training step's peak on the GPU: torch's memory history, replayed.

    python bench/memory_peak.py llama-1b 1024 31 bf16 --ckpt --out peak.json   # ~30 s on an H200
    python bench/memory_peak.py llama-1b 1024 36 bf16 --ckpt --compile --out peak.json   # groups: inductor's files

Builds the job as ``bench/gpu_memory_matrix.py`` does (the trainer's model,
optimizer with its states made before the first step, ``Engine``, random
tokens), runs two steps, then records torch's memory history over a third and
replays its allocations and frees. At the step's largest allocated total it
lists the live blocks, grouped by the Python line that allocated them (the
innermost frame outside torch; what autograd's engine makes in backward has no
Python frame and is one group), with the allocation that reached the peak; then
the same from the moment that peak's largest block is freed (a checkpointed
step's recompute, when its loss peaked first). This is how the planner's
terms are read off a real step instead of guessed; ``runner/plan/memory.py``
says which of its constants came from such a reading.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_memory_matrix import Config, experiment, plan_for  # noqa: E402

from runner.trainer import allocator  # noqa: E402

MiB = 2**20


def where(frames: list[dict], torch_dir: str) -> str:
    """The line that asked for a block: the innermost frame outside torch, as file:line function."""
    for frame in frames:
        name = frame.get("filename", "")
        if name and not name.startswith((torch_dir, "<")):
            return f"{Path(name).name}:{frame.get('line')} {frame.get('name')}"
    return "(no python frame: autograd's engine)"


def replay(trace: list[dict], baseline: int, torch_dir: str, start: int = 0) -> dict:
    """The largest allocated total over the trace (from event ``start`` on) and the blocks alive then.

    ``largest_freed_at`` is the event that frees the largest block alive at that peak: replayed from
    there, a checkpointed step's second peak shows, its backward past the loss.
    """
    live: dict[int, tuple[int, str]] = {}
    total = peak = baseline
    at_peak: dict[int, tuple[int, str]] = {}
    peak_by, peak_at = "", start
    frees: dict[int, list[int]] = defaultdict(list)
    for index, event in enumerate(trace):
        action, addr, size = event["action"], event["addr"], event["size"]
        if action == "alloc":
            live[addr] = (size, where(event.get("frames", []), torch_dir))
            total += size
            if index >= start and total > peak:
                peak, at_peak, peak_by, peak_at = total, dict(live), live[addr][1], index
        elif action == "free_completed" and addr in live:
            total -= live.pop(addr)[0]
            frees[addr].append(index)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, line in at_peak.values():
        groups[line][0] += 1
        groups[line][1] += size
    rows = sorted(({"line": k, "blocks": n, "bytes": b} for k, (n, b) in groups.items()), key=lambda r: -r["bytes"])
    largest = max(at_peak, key=lambda addr: at_peak[addr][0], default=None)
    # an address is reused: the free that counts is the first after the peak
    freed_at = next((i for i in frees.get(largest, []) if i > peak_at), None) if largest is not None else None
    return {"peak_bytes": peak, "baseline_bytes": baseline, "peak_reached_by": peak_by, "groups": rows,
            "largest_block_bytes": at_peak[largest][0] if largest is not None else 0, "largest_freed_at": freed_at}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("seq_len", type=int)
    parser.add_argument("micro_batch", type=int)
    parser.add_argument("precision", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--ckpt", action="store_true", help="gradient checkpointing")
    parser.add_argument("--lora", action="store_true", help="rank 16 on q/k/v/o over a half-precision base")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model and loss, as the trainer does")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    allocator.configure()
    import numpy as np
    import torch

    from runner.trainer.engine import Engine, init_optimizer_state, make_optimizer, set_fast_math
    from runner.trainer.models import build_model

    config = Config(args.model, args.seq_len, args.micro_batch, args.precision, checkpointing=args.ckpt,
                    lora=args.lora, compile=args.compile)
    device = torch.device("cuda", 0)
    spec = experiment(config)
    set_fast_math(device, deterministic=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(spec, ROOT, device, args.precision).model
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], "adamw", 3e-4, 0.1, device)
    init_optimizer_state(optimizer)
    engine = Engine(model, optimizer, device=device, precision=args.precision, grad_clip=1.0, compile=args.compile)
    vocab = model.get_input_embeddings().weight.shape[0]
    rows = np.random.default_rng(0).integers(0, vocab, size=(args.micro_batch, args.seq_len + 1), dtype=np.int64)
    batch = torch.from_numpy(rows).to(device)
    inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # as the trainer's batches are

    def step() -> None:
        engine.step(iter([(inputs, targets)]), 1, 3e-4)

    step(), step()
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    step()
    torch.cuda.synchronize(device)
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace, torch_dir = snapshot["device_traces"][0], str(Path(torch.__file__).parent)
    result = replay(trace, baseline, torch_dir)
    if result["largest_freed_at"] is not None:
        result["after_largest_freed"] = replay(trace, baseline, torch_dir, start=result["largest_freed_at"])
    breakdown = plan_for(config, config.profile).memory
    result.update(config=config.name, max_allocated_bytes=torch.cuda.max_memory_allocated(device),
                  predicted_allocated_bytes=breakdown.allocated_bytes, torch=torch.__version__)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{config.name}: peak {result['peak_bytes'] / MiB:,.0f} MiB replayed, "
          f"{result['max_allocated_bytes'] / MiB:,.0f} MiB max allocated, "
          f"{breakdown.allocated_bytes / MiB:,.0f} MiB predicted; before the step {baseline / MiB:,.0f} MiB; "
          f"reached by {result['peak_reached_by']}")
    for row in result["groups"][:25]:
        print(f"  {row['bytes'] / MiB:10,.1f} MiB  {row['blocks']:5d}  {row['line']}")
    later = result.get("after_largest_freed")
    if later:
        print(f"after its largest block ({result['largest_block_bytes'] / MiB:,.0f} MiB) is freed: "
              f"peak {later['peak_bytes'] / MiB:,.0f} MiB, reached by {later['peak_reached_by']}")
        for row in later["groups"][:25]:
            print(f"  {row['bytes'] / MiB:10,.1f} MiB  {row['blocks']:5d}  {row['line']}")


if __name__ == "__main__":
    main()
