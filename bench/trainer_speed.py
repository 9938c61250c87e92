"""Training speed on one GPU: our trainer's step against the Hugging Face Trainer, same model and batch.

    python bench/trainer_speed.py --out bench.json                       # GPT-2 124M, seq 1024, bf16
    python bench/trainer_speed.py --device cpu --steps 3 --tiny --out x.json   # a smoke test
    python bench/trainer_speed.py --only ours-eager,ours-eager-plain --out eager.json   # the chunked loss's cost

Runs, in one process on random tokens: the HF Trainer with its defaults, the HF
Trainer with torch_compile=True, and ours (runner.trainer.engine, the code path
the real trainer steps through: pinned host batches, bf16 autocast over fp32
weights, the model and loss compiled together, the trainer's causal SDPA so
that flash attention runs under torch.compile, fused AdamW); the HF runs get
stock SDPA. Prints tokens/s, MFU (6N + attention FLOPs per token over the
card's bf16 dense peak) and peak memory for each. ``ours-eager`` steps ours
without torch.compile, as a job with compile off does (the LM head and the loss
in chunks), and ``ours-eager-plain`` the same with the plain loss instead.
Needs torch, transformers and accelerate; not `datasets`.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runner.trainer import allocator  # noqa: E402

allocator.configure()  # CUDA's allocator as the trainer sets it up, for all three runs

import numpy as np  # noqa: E402
import torch  # noqa: E402

from runner import presets  # noqa: E402
from runner.trainer.engine import Engine, init_optimizer_state, make_optimizer, set_fast_math  # noqa: E402
from runner.trainer.loss import CausalLMLoss  # noqa: E402
from runner.trainer.metrics import peak_flops, peak_memory_bytes  # noqa: E402
from runner.trainer.models import causal_attention, config_from_shape  # noqa: E402

TINY = {"layers": 2, "hidden": 64, "heads": 2, "intermediate": 256, "vocab_size": 512, "max_positions": 128}


class RandomTokens(torch.utils.data.Dataset):
    """Random token rows for the HF Trainer (a torch Dataset, so no `datasets` package)."""

    def __init__(self, rows: int, seq_len: int, vocab: int, seed: int = 0):
        self.data = torch.randint(0, vocab, (rows, seq_len), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.data[i], "labels": self.data[i]}


def new_model(shape: presets.ModelShape, device: torch.device, attention: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config_from_shape(shape), attn_implementation=attention).to(device)


def run_ours(shape, device, precision, batch, seq_len, warmup, steps, *, compile: bool = True,
             plain_loss: bool = False) -> float:
    model = new_model(shape, device, causal_attention())
    optimizer = make_optimizer([p for p in model.parameters()], "adamw", 3e-4, 0.1, device)
    init_optimizer_state(optimizer)  # as the trainer does for a run that does not resume
    engine = Engine(model, optimizer, device=device, precision=precision, grad_clip=1.0,
                    compile=compile and device.type == "cuda")
    if plain_loss:  # the whole micro-batch's logits through F.cross_entropy, for comparison
        engine.loss_fn = CausalLMLoss(model)
    rng = np.random.default_rng(0)

    def batches():
        window = rng.integers(0, shape.vocab_size, size=(batch, seq_len + 1), dtype=np.int64)
        inputs, targets = torch.from_numpy(window[:, :-1].copy()), torch.from_numpy(window[:, 1:].copy())
        if device.type == "cuda":
            yield inputs.pin_memory().to(device, non_blocking=True), targets.pin_memory().to(device, non_blocking=True)
        else:
            yield inputs, targets

    for _ in range(warmup):
        engine.step(batches(), 1, 3e-4)
    loss = engine.step(batches(), 1, 3e-4)
    loss.item()
    start = time.perf_counter()
    for _ in range(steps):
        loss = engine.step(batches(), 1, 3e-4)
    loss.item()  # waits for the device
    return time.perf_counter() - start


def run_hf(shape, device, precision, batch, seq_len, warmup, steps, compile: bool) -> float:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup + 1, warmup + 1 + steps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                marks["start" if state.global_step == warmup + 1 else "end"] = time.perf_counter()

    model = new_model(shape, device)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch, max_steps=warmup + 1 + steps, learning_rate=3e-4,
            bf16=precision == "bf16", use_cpu=device.type == "cpu", torch_compile=compile, report_to=[],
            save_strategy="no", logging_steps=10**6, disable_tqdm=True, dataloader_num_workers=0, seed=0,
        )
        dataset = RandomTokens(batch * (warmup + 2 + steps), seq_len, shape.vocab_size)
        Trainer(model=model, args=args, train_dataset=dataset, callbacks=[Clock()]).train()
    return marks["end"] - marks["start"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (all three runs)")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model at seq 64, for a CPU smoke test")
    parser.add_argument("--peak-tflops", type=float, help="the card's bf16 dense peak (default: from the built-in table)")
    parser.add_argument("--only", default="hf,hf-compile,ours", help="which runs, comma-separated")
    parser.add_argument("--out", type=Path, required=True, help="write the results as JSON here")
    args = parser.parse_args()

    device = torch.device(args.device)
    shape = presets.PRESETS["gpt2-124m"]
    seq_len = args.seq
    if args.tiny:
        shape = presets.with_overrides(shape, TINY)
        seq_len = min(seq_len, 64)
    precision = "bf16" if device.type == "cuda" else "fp32"
    set_fast_math(device, deterministic=False)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device, precision)
    tokens = args.batch * seq_len * args.steps
    flops_per_token = shape.flops_per_token(seq_len)
    runs = {"hf": "HF Trainer (default)", "hf-compile": "HF Trainer (torch_compile=True)", "ours": "runner.trainer",
            "ours-eager": "runner.trainer (eager)", "ours-eager-plain": "runner.trainer (eager, plain loss)"}
    results = []
    for key in args.only.split(","):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        torch._dynamo.reset()
        if key.startswith("ours"):
            seconds = run_ours(shape, device, precision, args.batch, seq_len, args.warmup, args.steps,
                               compile=key == "ours", plain_loss=key == "ours-eager-plain")
        else:
            seconds = run_hf(shape, device, precision, args.batch, seq_len, args.warmup, args.steps, key == "hf-compile")
        tokens_per_s = tokens / seconds
        results.append({"run": key, "name": runs[key], "tokens_per_s": round(tokens_per_s, 1),
                        "mfu": round(flops_per_token * tokens_per_s / peak, 4) if peak else None,
                        "peak_bytes": peak_memory_bytes(device)})
    by_run = {r["run"]: r for r in results}
    ratios = {f"ours/{k}": round(by_run["ours"]["tokens_per_s"] / by_run[k]["tokens_per_s"], 2)
              for k in ("hf", "hf-compile") if k in by_run and "ours" in by_run}
    report = {
        "date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "model": "gpt2-124m" + (" (tiny)" if args.tiny else ""), "params": shape.param_count(), "seq_len": seq_len,
        "micro_batch": args.batch, "precision": precision, "timed_steps": args.steps, "peak_tflops": peak / 1e12 if peak else None,
        "results": results, "ratios": ratios, "command": " ".join(sys.argv),
    }
    print(f"{report['device']}, {report['model']}, seq {seq_len}, batch {args.batch}, {precision}")
    print(f"{'run':34} {'tokens/s':>12} {'MFU':>7} {'peak GiB':>9}")
    for r in results:
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['name']:34} {r['tokens_per_s']:>12,.0f} {mfu:>7} {r['peak_bytes'] / 2**30:>9.2f}")
    for name, value in ratios.items():
        print(f"{name}: {value}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
