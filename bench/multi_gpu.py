"""Training speed on one and two GPUs, and per-GPU memory under DDP and FSDP next to the planner's.

    python bench/multi_gpu.py --out multi-gpu                    # a host with 2 GPUs, ~10 min
    python bench/multi_gpu.py --tiny --device cpu --out x        # a CPU smoke test (gloo), ~1 min

Three runs, each started the way the runner starts a job: one process, or
``torchrun --standalone --nproc-per-node=2`` (``runner.launch``):

- ``gpt2-1gpu`` and ``gpt2-2gpu``: the GPT-2-124M benchmark shape (vocab 50304,
  seq 1024, bf16, torch.compile, 16 sequences per GPU), one GPU, then two under
  DDP. Target: tokens/s on two GPUs at least 1.85 x one GPU;
- ``fsdp-2gpu``: a LLaMA-7B-shaped model with as many layers as it takes for a
  full copy per GPU (DDP) not to fit the card (the planner's verdict), trained
  under FSDP on two GPUs with gradient checkpointing at micro-batch 1.

Each child builds the model with the trainer's ``build_model``, joins the
process group, wraps the model (``runner.trainer.distributed.wrap``: DDP or
FSDP2), makes the trainer's optimizer and ``Engine`` and trains on random
tokens, every rank its own, with gradient sync in the last micro-batch only as
in the training loop. Timed steps follow warm-up steps (compilation); tokens/s
counts the tokens of all ranks. Per-GPU peak memory is the caching allocator's
peak (reserved) plus what the process holds outside it at the end (CUDA
context, kernels, NCCL buffers: used less reserved, from ``cudaMemGetInfo``),
the largest over the ranks: the figure the planner's per-GPU ``peak_bytes``
predicts. The planner plans the same job on a host of the card's catalog
profile with as many GPUs; the error is ``(predicted - measured) / measured``
(target: within 10%).

Output: one JSON per run and ``results.json`` under ``--out``, then a table.
Needs torch, transformers and pydantic (not ``datasets``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runner.hosts import Host  # noqa: E402
from runner.plan import Plan, plan_job  # noqa: E402
from runner.spec import Experiment, Job  # noqa: E402
from runner.yamldoc import Doc  # noqa: E402

GiB = 2**30
SPEEDUP_TARGET = 1.85
MEMORY_TOLERANCE = 0.10
TINY = {"layers": 2, "hidden": 64, "heads": 2, "kv_heads": 2, "intermediate": 128, "vocab_size": 512,
        "max_positions": 128}
FSDP_LAYERS = (32, 48, 64, 96)  # LLaMA-7B blocks; the first count DDP cannot fit is trained under FSDP


@dataclass(frozen=True)
class Run:
    """One measured configuration."""

    name: str
    model: str
    gpus: int
    seq_len: int
    micro_batch: int
    precision: str
    compile: bool
    checkpointing: bool
    parallelism: str  # the planner's pick for this many GPUs: single, ddp or fsdp
    device: str
    warmup_steps: int
    timed_steps: int
    overrides: tuple[tuple[str, int], ...] = ()
    asked: str = "auto"  # train.parallelism in the job


def experiment(run: Run) -> Experiment:
    return Experiment.model_validate({
        "name": run.name,
        "model": {"preset": run.model, "overrides": dict(run.overrides)},
        # Declared size only: the planner needs one for its budget arithmetic, the bench feeds random tokens.
        "data": {"sources": [{"path": "random-tokens.txt", "tokens": 10**12}], "seq_len": run.seq_len},
        "train": {"batch_size": run.micro_batch, "precision": run.precision, "compile": run.compile,
                  "gradient_checkpointing": run.checkpointing, "gpus": run.gpus, "warmup_steps": 0,
                  "distributed_on_cpu": run.device == "cpu", "parallelism": run.asked},
        "budget": {"max_steps": run.warmup_steps + run.timed_steps},
    })


def plan_for(run: Run, profile: str) -> Plan:
    job = Job(spec=experiment(run), file="bench/multi_gpu.py", doc=Doc({}, "bench/multi_gpu.py"))
    return plan_job(job, Host(name=profile, profile=profile, gpus=max(2, run.gpus)))


def runs(profile: str, device: str, tiny: bool, steps: int) -> list[Run]:
    """The three runs; the FSDP model grows until the planner says DDP does not fit ``profile``."""
    warmup = 1 if tiny else 8
    if tiny:
        base = Run("gpt2-1gpu", "gpt2-124m", 1, 64, 2, "fp32", False, False, "single", device, warmup, steps,
                   tuple(TINY.items()))
    else:
        base = Run("gpt2-1gpu", "gpt2-124m", 1, 1024, 16, "bf16", device == "cuda", False, "single", device,
                   warmup, steps)
    two = replace(base, name="gpt2-2gpu", gpus=2, parallelism=plan_for(replace(base, gpus=2), profile).parallelism)
    if tiny:
        big = replace(base, name="fsdp-2gpu", model="llama-7b", gpus=2, checkpointing=True, micro_batch=1,
                      overrides=tuple(TINY.items()), parallelism="fsdp", asked="fsdp")
    else:
        for layers in FSDP_LAYERS:
            big = Run("fsdp-2gpu", "llama-7b", 2, 1024, 1, "bf16", False, True, "fsdp", device, 3, max(5, steps // 3),
                      (("layers", layers),))
            if plan_for(big, profile).parallelism == "fsdp":
                break
    return [base, two, big]


# -- one run, in the processes torchrun starts ------------------------------------------------------

def child(run: Run, out: Path) -> None:
    import torch

    from runner.trainer import distributed
    from runner.trainer.engine import Engine, init_optimizer_state, make_optimizer, set_fast_math
    from runner.trainer.metrics import peak_memory_bytes
    from runner.trainer.models import build_model

    # The trainer's own choice is forced here with the planner's (the resolved plan's parallelism field).
    world, device = distributed.join(run.gpus, "fsdp" if run.parallelism == "fsdp" else "ddp",
                                     torch.device("cuda", 0) if run.device == "cuda" else torch.device("cpu"))
    precision = run.precision if device.type == "cuda" else "fp32"
    set_fast_math(device, deterministic=False)
    torch.manual_seed(0)
    fsdp = world.parallelism == "fsdp" and world.size > 1
    built = build_model(experiment(run), ROOT, torch.device("cpu") if fsdp else device, precision)
    model = distributed.wrap(built.model, world, device, precision)
    optimizer = make_optimizer([p for p in built.model.parameters() if p.requires_grad], "adamw", 3e-4, 0.1, device)
    init_optimizer_state(optimizer)  # as the trainer does for a run that does not resume
    engine = Engine(model, optimizer, device=device, precision=precision, grad_clip=1.0, compile=run.compile)
    vocab = built.model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(1000 + world.rank)

    def batch():
        rows = torch.randint(vocab, (run.micro_batch, run.seq_len + 1), generator=generator)
        yield rows[:, :-1].contiguous().to(device), rows[:, 1:].contiguous().to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        distributed.any_rank(world, [False])  # a barrier on the CPU group

    for _ in range(run.warmup_steps):
        engine.step(batch(), 1, 3e-4)
    sync()
    started = time.perf_counter()
    for _ in range(run.timed_steps):
        loss = engine.step(batch(), 1, 3e-4)
    loss_value = float(loss.item())
    sync()
    seconds = time.perf_counter() - started
    tokens = world.size * run.micro_batch * run.seq_len * run.timed_steps
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        outside = (total - free) - torch.cuda.memory_reserved(device)  # context, kernels, NCCL buffers
        peak = torch.cuda.max_memory_reserved(device) + outside
    else:
        peak = peak_memory_bytes(device)
    peak = distributed.largest(world, peak)
    if world.is_main:
        result = {"run": asdict(run), "processes": world.size, "parallelism": world.parallelism,
                  "tokens_per_s": tokens / seconds, "step_s": seconds / run.timed_steps, "loss": loss_value,
                  "measured_peak_bytes": peak, "device_name": torch.cuda.get_device_name(device)
                  if device.type == "cuda" else "cpu"}
        (out / f"{run.name}.json").write_text(json.dumps(result, indent=1))
    del engine, model, optimizer, built  # DDP's reducer must go before the process group (see the trainer)
    gc.collect()
    distributed.leave(world)


# -- the parent: start every run, add the planner's numbers, print the table ------------------------

def launch(run: Run, out: Path, timeout_s: float) -> str:
    config = json.dumps(asdict(run))
    script = [str(Path(__file__).resolve()), "--one", config, "--out", str(out)]
    argv = ([sys.executable, *script] if run.gpus == 1 else
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={run.gpus}", *script])
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return "timeout"
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-4000:]
        print(tail, file=sys.stderr)
        return "oom" if "OutOfMemoryError" in tail else "error"
    return "ok"


def detect_profile(device: str) -> str:
    if device != "cuda":
        return "cpu"
    import torch

    from runner.catalog import load_catalog

    found = load_catalog().match_device(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory)
    if found is None:
        raise SystemExit(f"no catalog profile matches {torch.cuda.get_device_name(0)}; pass --profile")
    return found.id


def report(rows: list[dict]) -> str:
    header = (f"{'run':<10} {'gpus':>4} {'mode':<6} {'tokens/s':>10} {'x 1 GPU':>8} "
              f"{'peak GiB':>9} {'plan GiB':>9} {'error':>7}  status")
    lines = [header, "-" * len(header)]
    one = next((r for r in rows if r["run"]["name"] == "gpt2-1gpu" and r["status"] == "ok"), None)
    for r in rows:
        ok = r["status"] == "ok"
        speedup = (r["tokens_per_s"] / one["tokens_per_s"] if ok and one and r["run"]["model"] == "gpt2-124m"
                   else None)
        measured, predicted = r.get("measured_peak_bytes"), r["predicted_peak_bytes"]
        error = (predicted - measured) / measured if ok and measured and r["run"]["device"] == "cuda" else None
        lines.append(f"{r['run']['name']:<10} {r['run']['gpus']:>4} {r['planned_parallelism']:<6} "
                     f"{r['tokens_per_s'] if ok else 0:>10,.0f} {'' if speedup is None else f'{speedup:.2f}':>8} "
                     f"{'' if not measured else f'{measured / GiB:.2f}':>9} {predicted / GiB:>9.2f} "
                     f"{'' if error is None else f'{error:+.1%}':>7}  {r['status']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the per-run JSON and results.json")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--profile", help="the catalog profile to plan for (default: the GPU's)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps of the GPT-2 runs")
    parser.add_argument("--tiny", action="store_true", help="2-layer models at seq 64: a smoke test")
    parser.add_argument("--timeout-s", type=float, default=900, help="per run")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: the run as JSON
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        fields = json.loads(args.one)
        fields["overrides"] = tuple(tuple(pair) for pair in fields["overrides"])
        child(Run(**fields), args.out)
        return 0

    profile = args.profile or detect_profile(args.device)
    rows = []
    for run in runs(profile, args.device, args.tiny, args.steps):
        plan = plan_for(run, profile)
        assert plan.memory is not None
        print(f"{run.name}: {run.gpus} x {run.model} {dict(run.overrides) or ''} on {profile}; "
              f"plan: {plan.parallelism_reason or 'one process'}", flush=True)
        status = launch(run, args.out, args.timeout_s)
        measured = json.loads((args.out / f"{run.name}.json").read_text()) if status == "ok" else {"run": asdict(run)}
        rows.append({**measured, "status": status, "profile": profile, "planned_parallelism": plan.parallelism,
                     "parallelism_reason": plan.parallelism_reason, "predicted_peak_bytes": plan.memory.peak_bytes,
                     "predicted_fits": plan.fits, "predicted_tokens_per_s": plan.tokens_per_s,
                     "memory_terms": {term: nbytes for term, nbytes, _ in plan.memory.rows()}})
    table = report(rows)
    one, two = (next((r for r in rows if r["run"]["name"] == n and r["status"] == "ok"), None)
                for n in ("gpt2-1gpu", "gpt2-2gpu"))
    speedup = two["tokens_per_s"] / one["tokens_per_s"] if one and two else None
    errors = [abs(r["predicted_peak_bytes"] - r["measured_peak_bytes"]) / r["measured_peak_bytes"]
              for r in rows if r["status"] == "ok" and args.device == "cuda"]
    summary = {"speedup_2_gpus": speedup, "speedup_target": SPEEDUP_TARGET,
               "max_memory_error": max(errors) if errors else None, "memory_tolerance": MEMORY_TOLERANCE,
               "fsdp_trained": any(r["run"]["name"] == "fsdp-2gpu" and r["status"] == "ok" for r in rows)}
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "summary": summary, "table": table}, indent=1))
    print(table)
    print(json.dumps(summary))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
