"""The training run, top to bottom: set up, resume, step, evaluate, checkpoint, report.

``train(resolved, run_dir)`` does exactly what the resolved run says and always
ends with ``RUN_DIR/summary.json``; it never raises (an error is an exit reason).
Under torchrun every process runs this same loop on its share of the data
(``distributed.py``); rank 0 alone prints and writes the run directory.
"""

from __future__ import annotations

import json
import gc
import itertools
import math
import os
import random
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from runner.errors import UserError
from runner.resolved import ResolvedRun
from runner.spec import DataSpec
from runner.trainer import checkpoint, distributed
from runner.trainer.data import Corpus, RowStream, eval_batches, mixture_weights, tokenize_sources
from runner.trainer.engine import Engine, init_optimizer_state, make_optimizer, set_fast_math
from runner.trainer.metrics import MetricsLog, Summary, measure_memory, peak_flops, peak_memory_bytes, progress_line
from runner.trainer.models import build_model
from runner.trainer.signals import StopFlag
from runner.trainer.tokenizer import fingerprint, load_tokenizer

CACHE_ENV = "RUNNER_CACHE_DIR"


@dataclass(frozen=True)
class Phase:
    """A stretch of the run with its own data and peak learning rate (pretrain, then SFT)."""

    name: str
    data: DataSpec
    lr: float
    start: int  # first step
    end: int  # one past the last step


@dataclass(frozen=True)
class Segment:
    """Steps with one sequence shape inside one phase."""

    start: int
    end: int
    seq_len: int
    micro_batch: int
    grad_accum: int
    phase: int
    processes: int = 1

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over all processes."""
        return self.seq_len * self.micro_batch * self.grad_accum * self.processes


def train(resolved: ResolvedRun, run_dir: Path) -> Summary:
    """Run the resolved plan into ``run_dir``; the summary says how it ended."""
    run = Run(resolved, run_dir)
    summary = run.summary
    try:
        run.execute()
    except UserError as exc:
        summary.exit_reason, summary.error = "error", exc.render()
        print(f"error: {exc.render()}", file=sys.stderr, flush=True)
    except Exception as exc:
        if is_out_of_memory(exc):  # the job does not fit the device: a fact about the job, kept by the run store
            summary.exit_reason, summary.error = "error", run.out_of_memory(exc)
            print(f"error: {summary.error}", file=sys.stderr, flush=True)
        else:  # a bug, not a user error: keep the traceback
            traceback.print_exc()
            summary.exit_reason, summary.error = "error", f"{type(exc).__name__}: {exc}"
    summary.wall_s = round(time.monotonic() - run.started, 3)
    if run.world.is_main:
        summary.write(run_dir)
    world = run.world
    # DDP's reducer holds the process group; freed after the group is destroyed, it would tear the
    # group down under the GIL while gloo's threads wait for the GIL to free tensors (a hang at exit).
    del run
    gc.collect()
    distributed.leave(world)
    return summary


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's out-of-memory error, or one wrapped in a RuntimeError: MPS's in some torch versions, and
    torch.compile's when it runs out while it compiles or autotunes."""
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def pick_device(wanted: str) -> torch.device:
    if wanted == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise UserError("the plan says cuda but no CUDA device is visible", field="device")
    if wanted == "mps" and not torch.backends.mps.is_available():
        raise UserError("the plan says mps but the MPS backend is not available", field="device")
    return torch.device("cuda", 0) if wanted == "cuda" else torch.device(wanted)


def plan_segments(resolved: ResolvedRun, stage_steps: list[int], phase_shares: list[float]) -> tuple[list[Segment], list[tuple[int, int]]]:
    """Cut the run into segments at stage boundaries and at the steps where phases' token shares end."""
    stage_ends = list(itertools.accumulate(stage_steps))
    total = stage_ends[-1] if stage_ends else 0
    tokens_after = [0]
    for stage, steps in zip(resolved.stages, stage_steps):
        for _ in range(steps):
            tokens_after.append(tokens_after[-1] + stage.tokens_per_step(resolved.world_size))
    phase_bounds, start, cumulative = [], 0, 0.0
    for i, share in enumerate(phase_shares):
        cumulative += share
        if i == len(phase_shares) - 1:
            end = total
        else:
            target = round(tokens_after[-1] * cumulative)
            end = next(s for s, t in enumerate(tokens_after) if t >= target)
        phase_bounds.append((start, end))
        start = end
    cuts = sorted({0, total, *stage_ends, *(b for _, b in phase_bounds)})
    segments = []
    for a, b in zip(cuts, cuts[1:]):
        if a == b:
            continue
        stage = next(i for i, e in enumerate(stage_ends) if a < e)
        phase = next(i for i, (s, e) in enumerate(phase_bounds) if s <= a < e)
        st = resolved.stages[stage]
        segments.append(Segment(a, b, st.seq_len, st.micro_batch, st.grad_accum, phase, resolved.world_size))
    return segments, phase_bounds


def lr_at(step: int, phase: Phase, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak, per phase."""
    s, n = step - phase.start, max(1, phase.end - phase.start)
    warmup = min(warmup_steps, n)
    if s < warmup:
        return phase.lr * (s + 1) / warmup
    progress = (s - warmup) / max(1, n - warmup)
    return phase.lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Run:
    """One training run; ``execute`` raises on errors (``train`` turns them into a summary)."""

    def __init__(self, resolved: ResolvedRun, run_dir: Path):
        self.resolved, self.run_dir = resolved, run_dir
        self.summary = Summary()
        self.started = time.monotonic()
        self.exp = resolved.experiment
        self.train_spec = self.exp.train
        self.world = distributed.World()
        self.step = 0
        self.doing = "while setting up"  # where an out-of-memory error would have struck

    def execute(self) -> None:
        self._setup()
        self._loop()

    def out_of_memory(self, exc: BaseException) -> str:
        """One line for the summary and the run store: where it ran out, and the device's own figures.
        The summary also gets the steps done and the peak memory reached.

        torch's advice on the allocator's settings is left out (the trainer sets them), and so
        are the other processes it lists on the GPU.
        """
        said = re.split(r" If reserved but unallocated| See documentation", str(exc))[0]
        said = re.sub(r"Process \d+ has [\d.]+ \w+ memory in use\. ", "", said).strip()
        self.summary.steps = self.step
        self.summary.peak_bytes = peak_memory_bytes(self.device) if hasattr(self, "device") else None
        return f"out of memory {self.doing}: {said}"

    # -- setup ---------------------------------------------------------------------------------

    def _setup(self) -> None:
        resolved, exp, spec = self.resolved, self.exp, self.train_spec
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stop = StopFlag()
        self.world, self.device = distributed.join(resolved.world_size, resolved.parallelism,
                                                   pick_device(resolved.device))
        if not self.world.is_main:
            sys.stdout = open(os.devnull, "w")  # only rank 0 reports
        fsdp = self.world.parallelism == "fsdp" and self.world.size > 1
        self.precision = resolved.precision if self.device.type in ("cuda", "mps") else "fp32"
        if self.device.type == "mps" and self.precision == "fp8":
            self.precision = "fp32"
        if spec.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        set_fast_math(self.device, spec.deterministic)
        random.seed(spec.seed)
        np.random.seed(spec.seed)
        torch.manual_seed(spec.seed)
        job_dir = Path(resolved.job_dir)
        cache_dir = Path(os.environ.get(CACHE_ENV) or self.run_dir / "cache")

        # FSDP builds on the CPU and moves only each rank's shard to the GPU.
        built = build_model(exp, job_dir, torch.device("cpu") if fsdp else self.device, self.precision)
        self.model, self.shape, self.lora = built.model, built.shape, built.lora
        vocab_size = self.model.get_input_embeddings().weight.shape[0]
        with distributed.local_main_first(self.world):  # one process per node tokenizes into the cache
            self._setup_data(job_dir, cache_dir, vocab_size)
        distributed.same_everywhere(self.world, fingerprint(self.tokenizer), "the tokenizer")

        found, state = self._find_checkpoint()
        if found is not None and (self.world.is_main or self.world.size == 1):
            self._load_weights(found)  # the other ranks get rank 0's weights when the model is wrapped
        self.train_model = distributed.wrap(self.model, self.world, self.device, self.precision)
        optimizer = make_optimizer([p for p in self.model.parameters() if p.requires_grad], spec.optimizer,
                                   spec.lr, spec.weight_decay, self.device)
        self.engine = Engine(self.train_model, optimizer, device=self.device, precision=self.precision,
                             grad_clip=spec.grad_clip, compile=resolved.compile)
        self.peak_flops = peak_flops(self.device, self.precision)
        self.step, self.tokens, self.phase_index = 0, 0, 0
        self.best_eval: float | None = None
        self.plateau_loss: float | None = None
        self.plateau_step = 0
        self.summary.planned_steps, self.summary.planned_tokens = self.total_steps, self.planned_tokens
        if self.world.is_main:
            (self.run_dir / "resolved.json").write_text(resolved.model_dump_json(indent=2) + "\n")
        if found is not None:
            self._resume(found, state)
        else:
            init_optimizer_state(optimizer)

    def _setup_data(self, job_dir: Path, cache_dir: Path, vocab_size: int) -> None:
        resolved, exp, spec = self.resolved, self.exp, self.train_spec

        phases = exp.phases or []
        datas = [p.data or exp.data for p in phases] or [exp.data]
        corpus = Corpus(job_dir, cache_dir, spec.seed)
        unique = list({id(d): d for d in datas}.values())
        data_key = "||".join(corpus.key(s, d.validation) for d in unique for s in d.sources)

        def train_texts():
            for d in unique:
                for s in d.sources:
                    yield from corpus.split(s, d.validation)[0]

        self.tokenizer = load_tokenizer(exp, job_dir, self.run_dir, cache_dir, vocab_size, data_key, train_texts)
        if len(self.tokenizer) > vocab_size:
            raise UserError(f"the tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary is {vocab_size}",
                            field="model", hint="set model.overrides.vocab_size, or use the model's own tokenizer")
        tok_id = fingerprint(self.tokenizer)
        pad_id = self.tokenizer.pad_token_id
        self.streams, self.evals = [], []
        eval_stage = max(resolved.stages, key=lambda s: s.seq_len)  # comparable evals across a curriculum
        for d in datas:
            sources = tokenize_sources(corpus, d, self.tokenizer, tok_id)
            probs = mixture_weights(d.mixture, [len(s.train) for s in sources], [s.weight for s in d.sources])
            self.streams.append(RowStream(sources, probs, spec.seed, d.packing, pad_id))
            # eval.max_batches per process: the ranks split the batches and average their losses
            batches = eval_batches(sources, eval_stage.seq_len, eval_stage.micro_batch,
                                   exp.eval.max_batches * self.world.size, d.packing, pad_id) if d.validation > 0 else []
            self.evals.append([(self._device(x), self._device(y)) for x, y in distributed.share(self.world, batches)])
            if d.validation > 0 and not batches and self.world.is_main:
                print(f"warning: no evaluation: the validation split ({d.validation:g} of the data) holds fewer than "
                      f"{eval_stage.seq_len + 1} tokens, one row at seq_len {eval_stage.seq_len}", flush=True)
        if exp.early_stopping and not self.evals[0]:
            raise UserError("early stopping needs validation data", field="data.validation",
                            hint="set data.validation above 0")

        stage_steps = [self._stage_steps(s) for s in resolved.stages]
        shares = [p.share for p in phases] or [1.0]
        self.segments, bounds = plan_segments(resolved, stage_steps, shares)
        names = [p.name for p in phases] or ["train"]
        lrs = [p.lr or spec.lr for p in phases] or [spec.lr]
        self.phases = [Phase(n, d, lr, a, b) for n, d, lr, (a, b) in zip(names, datas, lrs, bounds)]
        self.total_steps = sum(stage_steps)
        self.planned_tokens = sum(s.tokens_per_step * (s.end - s.start) for s in self.segments)
        if resolved.token_budget is not None and self.planned_tokens > resolved.token_budget:
            raise UserError(f"the stages add up to {self.planned_tokens} tokens, over the budget of "
                            f"{resolved.token_budget}", field="budget.tokens")

    def _stage_steps(self, stage) -> int:
        if stage.steps is not None:
            return stage.steps
        budget = self.exp.budget
        if budget.max_steps is not None:
            return budget.max_steps
        if self.resolved.epochs is None and budget.epochs is None:
            raise UserError("the plan gives no steps and no epoch budget", field="budget")
        epochs = self.resolved.epochs or budget.epochs
        rows = self.streams[0].rows_per_epoch(stage.seq_len)
        per_step = stage.micro_batch * stage.grad_accum * self.resolved.world_size
        return max(1, math.ceil(epochs * rows / per_step))

    def _device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    # -- resume --------------------------------------------------------------------------------

    def _find_checkpoint(self) -> tuple[Path | None, dict]:
        """The newest intact checkpoint and its state, as rank 0 sees them (the run directory is rank 0's)."""
        found = checkpoint.latest_intact(self.run_dir) if self.world.is_main else None
        state = json.loads((found / checkpoint.STATE).read_text()) if found is not None else {}
        name, state = distributed.broadcast_object(self.world, (found.name if found else None, state))
        if name is None:
            return None, {}
        return checkpoint.checkpoint_dir(self.run_dir) / name, state

    def _load_weights(self, found: Path) -> None:
        device = str(next(self.model.parameters()).device)
        if self.lora:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(self.model, load_file(found / "model.safetensors", device=device))
        else:
            from safetensors.torch import load_model

            load_model(self.model, found / "model.safetensors", device=device)

    def _resume(self, found: Path, state: dict) -> None:
        optimizer, world = self.engine.optimizer, self.world
        saved = torch.load(found / "optimizer.pt", map_location="cpu", weights_only=True) if world.is_main else None
        # A checkpoint of any layout resumes under any other: FSDP keys states by name, the others by position.
        layout, names = state.get("optimizer_layout", "by_index"), self._optimizer_names()
        if world.parallelism == "fsdp" and world.size > 1:
            if saved is not None and layout == "by_index":
                saved = checkpoint.optimizer_by_name(saved, names)
            distributed.load_full_optimizer_state(self.model, optimizer, saved)
        else:
            saved = distributed.broadcast_object(world, saved)
            optimizer.load_state_dict(checkpoint.optimizer_by_index(saved, names) if layout == "by_name" else saved)
        if self.engine.scaler and state.get("scaler"):
            self.engine.scaler.load_state_dict(state["scaler"])
        for stream, position in zip(self.streams, state["streams"]):
            stream.load_state(position)
        checkpoint.set_rng_state(state["rng"])
        self.step, self.tokens, self.phase_index = state["step"], state["tokens"], state["phase"]
        self.best_eval, self.plateau_loss, self.plateau_step = (state["best_eval_loss"], state["plateau_loss"],
                                                                state["plateau_step"])
        self.summary.resumed_from_step = self.step
        self.summary.checkpoint = found.relative_to(self.run_dir).as_posix()
        written_by = state.get("processes", 1)
        print(f"resuming from {found.name} ({self.tokens} tokens seen"
              + (f", written by {written_by} processes)" if written_by != world.size else ")"), flush=True)

    def _optimizer_names(self) -> list[str]:
        """The name of each parameter the optimizer steps, in its order."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [names[id(p)] for group in self.engine.optimizer.param_groups for p in group["params"]]

    # -- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        exp, spec, summary = self.exp, self.train_spec, self.summary
        # Ranks other than 0 run the same code and write their metrics nowhere.
        metrics = MetricsLog(self.run_dir / "metrics.jsonl" if self.world.is_main else Path(os.devnull))
        self.metrics = metrics
        self.last_eval_step: int | None = None
        eval_loss = None
        if exp.eval.on_start and self.step == 0:
            eval_loss = self._evaluate()
        start_step, start_tokens = self.step, self.tokens
        train_s, window_s = 0.0, 0.0
        window_tokens, window_losses = 0, []
        last_loss: float | None = None
        reason = "budget_reached"
        processes = (f" x {self.world.size} processes ({self.world.parallelism.upper()})"
                     if self.world.size > 1 else "")
        print(f"training {self.total_steps} steps, {self.planned_tokens} tokens on {self.device.type}{processes} "
              f"({self.precision})", flush=True)
        while self.step < self.total_steps:
            segment = next(s for s in self.segments if s.start <= self.step < s.end)
            phase = self.phases[segment.phase]
            self.phase_index = segment.phase
            stream = self.streams[segment.phase]
            lr = lr_at(self.step, phase, spec.warmup_steps, spec.min_lr_ratio)
            self.doing = f"in step {self.step + 1} (micro-batch {segment.micro_batch} at seq {segment.seq_len})"
            t0 = time.monotonic()
            loss = self.engine.step(self._micro_batches(stream, segment), segment.grad_accum, lr)
            self.step += 1
            self.tokens += segment.tokens_per_step
            window_losses.append(loss)
            window_tokens += segment.tokens_per_step
            window_s += time.monotonic() - t0

            if self.step % spec.log_every_steps == 0 or self.step == self.total_steps:
                t_sync = time.monotonic()
                # the one host sync per interval; the mean over ranks is the loss of the global batch
                last_loss = distributed.mean(self.world, torch.stack(window_losses).mean()).item()
                window_s += time.monotonic() - t_sync
                tokens_per_s = window_tokens / window_s if window_s > 0 else 0.0
                mfu = self._mfu(segment.seq_len, tokens_per_s)
                peak = peak_memory_bytes(self.device)
                elapsed = time.monotonic() - self.started
                budget_pct = 100.0 * self.tokens / self.planned_tokens if self.planned_tokens else 0.0
                metrics.write("train", step=self.step, loss=round(last_loss, 6), lr=lr, tokens=self.tokens,
                              tokens_per_s=round(tokens_per_s, 1), mfu=None if mfu is None else round(mfu, 4),
                              peak_bytes=peak, elapsed_s=round(elapsed, 3), budget_pct=round(budget_pct, 3),
                              seq_len=segment.seq_len, phase=phase.name)
                print(progress_line(self.step, self.total_steps, last_loss, lr, tokens_per_s, mfu, budget_pct,
                                    elapsed), flush=True)
                train_s += window_s
                window_s, window_tokens, window_losses = 0.0, 0, []

            if self.step % exp.eval.every_steps == 0:
                eval_loss = self._evaluate()
            out_of_time = (self.world.is_main and self.resolved.max_seconds is not None
                           and time.monotonic() - self.started >= self.resolved.max_seconds)
            # Every rank stops after the same step: a signal to any of them, rank 0's clock.
            signalled, out_of_time, plateaued = distributed.any_rank(
                self.world, [self.stop.set, out_of_time, self.last_eval_step == self.step and self._plateaued()])
            if plateaued:
                reason = "early_stop"
            if signalled:
                reason = "cancelled"
                print(f"{self.stop.signal_name or 'a signal to another rank'}: stopping after step {self.step}",
                      flush=True)
            elif out_of_time:
                reason = "max_time"
            if reason != "budget_reached" or self.step % exp.checkpoint.every_steps == 0 or self.step == self.total_steps:
                self._checkpoint()
            if reason != "budget_reached":
                break

        if window_losses:
            last_loss = distributed.mean(self.world, torch.stack(window_losses).mean()).item()
            train_s += window_s
        if self.last_eval_step != self.step and self.evals[self.phase_index]:
            eval_loss = self._evaluate()
        trained = self.tokens - start_tokens
        summary.exit_reason = reason
        summary.steps, summary.tokens = self.step, self.tokens
        summary.tokens_per_s = round(trained / train_s, 1) if train_s > 0 else None
        seq_len = max(s.seq_len for s in self.segments) if self.segments else 0
        summary.mfu = self._mfu(seq_len, summary.tokens_per_s or 0.0) if self.step > start_step else None
        summary.peak_bytes = distributed.largest(self.world, peak_memory_bytes(self.device))  # the fullest GPU
        summary.best_eval_loss, summary.final_eval_loss = self.best_eval, eval_loss
        summary.final_loss = None if last_loss is None else round(last_loss, 6)
        summary.memory = asdict(measure_memory(self.model, self.engine.optimizer, summary.peak_bytes))
        metrics.close()
        print(f"done: {reason} after {self.step} steps, {self.tokens} tokens"
              + (f", eval loss {eval_loss:.4f}" if eval_loss is not None else ""), flush=True)

    def _micro_batches(self, stream: RowStream, segment: Segment):
        """This rank's micro-batches of one step; gradients are synchronised in the last one's backward only.

        The engine runs forward and backward on a micro-batch before it asks for
        the next, so a yield inside ``no_gradient_sync`` covers that backward.
        """
        world = self.world
        for i in range(segment.grad_accum):
            inputs, targets = stream.next_batch(segment.micro_batch, segment.seq_len, world.rank, world.size)
            batch = self._device(inputs), self._device(targets)
            if i < segment.grad_accum - 1:
                with distributed.no_gradient_sync(self.train_model, world):
                    yield batch
            else:
                yield batch

    def _mfu(self, seq_len: int, tokens_per_s: float) -> float | None:
        if self.peak_flops is None or self.shape is None:
            return None
        return self.shape.flops_per_token(seq_len) * tokens_per_s / (self.peak_flops * self.world.size)

    def _evaluate(self) -> float | None:
        self.doing = f"in the evaluation after step {self.step}"
        loss = distributed.mean_of_floats(self.world, self.engine.evaluate(self.evals[self.phase_index]))
        self.last_eval_step = self.step
        if loss is None:
            return None
        self.best_eval = loss if self.best_eval is None else min(self.best_eval, loss)
        rule = self.exp.early_stopping
        if rule and (self.plateau_loss is None or loss < self.plateau_loss - rule.min_delta):
            self.plateau_loss, self.plateau_step = loss, self.step
        self.metrics.write("eval", step=self.step, tokens=self.tokens, eval_loss=round(loss, 6),
                           phase=self.phases[self.phase_index].name)
        print(f"eval step {self.step:>6} | eval loss {loss:.4f}", flush=True)
        return loss

    def _plateaued(self) -> bool:
        """Early stopping: no eval improved on the reference by min_delta for patience_steps steps."""
        rule = self.exp.early_stopping
        return bool(rule) and self.plateau_loss is not None and self.step - self.plateau_step >= rule.patience_steps

    def _checkpoint(self) -> None:
        """Every rank calls this (FSDP gathers the full state); rank 0 writes the checkpoint."""
        from safetensors.torch import save_file, save_model

        model, world = self.model, self.world
        sharded = world.parallelism == "fsdp" and world.size > 1
        if sharded:
            full_model = distributed.full_model_state(model)
            full_optimizer = distributed.full_optimizer_state(model, self.engine.optimizer)
        if not world.is_main:
            return
        if self.lora:
            from peft import get_peft_model_state_dict

            adapters = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
            write_model = lambda p: save_file(adapters, str(p))  # noqa: E731
            base_config = model.get_base_model().config
        elif sharded:
            write_model = lambda p: save_file(full_model, str(p))  # noqa: E731
            base_config = model.config
        else:
            write_model = lambda p: save_model(model, str(p))  # noqa: E731
            base_config = model.config
        state = {
            "step": self.step, "tokens": self.tokens, "phase": self.phase_index,
            "streams": [s.state() for s in self.streams],
            "best_eval_loss": self.best_eval, "plateau_loss": self.plateau_loss, "plateau_step": self.plateau_step,
            "rng": checkpoint.rng_state(),
            "scaler": self.engine.scaler.state_dict() if self.engine.scaler else None,
            "processes": world.size,
            # FSDP's full optimizer state is keyed by parameter name; a plain one by position
            "optimizer_layout": "by_name" if sharded else "by_index",
        }
        writers = {
            "model.safetensors": write_model,
            "config.json": lambda p: base_config.to_json_file(str(p)),
            "optimizer.pt": lambda p: torch.save(full_optimizer if sharded else self.engine.optimizer.state_dict(), p),
            checkpoint.STATE: lambda p: p.write_text(json.dumps(state)),
        }
        if self.lora:
            config = model.peft_config["default"].to_dict()
            writers["adapter_config.json"] = lambda p: p.write_text(json.dumps(config, indent=2, default=sorted))
        path = checkpoint.write(self.run_dir, self.step, writers, self.exp.checkpoint.keep_last)
        self.summary.checkpoint = path.relative_to(self.run_dir).as_posix()
