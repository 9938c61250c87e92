"""Peak training memory on one device, term by term, following the trainer's conventions.

Conventions (the trainer's, and so this model's):
- full training keeps parameters in fp32 and runs forward/backward under
  ``torch.autocast`` for bf16/fp16: 4 B weights + 4 B gradients + 8 B AdamW
  states per parameter, no separate master copy; autocast keeps a 2 B copy of
  every matmul weight from forward until backward has used it;
- LoRA stores the frozen base in the compute dtype (2 B/param on CUDA, fp32 on
  CPU and MPS) or 8/4-bit, and trains fp32 adapters with their own AdamW states;
- adamw8bit keeps 2 B/param of state; sgd keeps its momentum, 4 B/param;
- AdamW is fused on CUDA (no temporaries) and foreach elsewhere;
- attention is SDPA/flash: activations grow with seq, never seq^2 (in fp32 the
  trainer repeats grouped key and value heads so that SDPA can keep it so).

Several GPUs: under DDP every GPU holds all of the above; gradients are views into
DDP's buckets (``gradient_as_bucket_view``), which are allocated once and never
freed, so they are resident through backward as with accumulation. Under FSDP (``shards`` > 1) weights, gradients, optimizer states and the
step's temporary are divided by the number of GPUs; each GPU also holds the
unsharded parameters FSDP gathers in the compute dtype (the root module's, plus
two blocks: the one running and the one prefetched) and one block's unsharded
fp32 gradients before they are reduce-scattered. FSDP casts the gathered
parameters to the compute dtype itself, so autocast makes no copies.

Activation bytes per token and layer are what autograd saves for the Hugging
Face GPT-2 and LLaMA blocks, in eager mode and under torch.compile (which saves
far less: it fuses the loss and recomputes pointwise work); see ``_ACTIVATION``.
Every constant below was fitted to the peak memory the trainer reached on an
H100 80GB (torch 2.11+cu130, transformers 5.17) on 2026-11-24, measured by
``bench/gpu_memory_matrix.py``; those for torch.compile were refitted on an H200
on 2026-12-01, where the trainer first ran with expandable segments, and those for
the eager loss on the same day, once eager jobs ran the chunked loss, and those for the
checkpointed backward and a full card's slack once the trainer made its optimizer
states before the first step (``bench/memory_peak.py`` read what is alive at the peak),
those for fp32 with checkpointing and compiled factorized models, and those for a bf16
residual stream, the output's backward, eager jobs' cap slack and torch.compile with
checkpointing, refitted last once the trainer stopped building a causal mask under compile.
docs/benchmarks.md, "GPU memory", has the tables, and ``bench/results/`` the raw figures.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from runner.presets import ModelShape
from runner.units import format_bytes

if TYPE_CHECKING:
    from runner.plan.measured import MemoryOutcome

Device = Literal["cuda", "mps", "cpu"]

# Bytes saved per token per layer, as coefficients of (hidden, kv width, MLP width),
# keyed by (family, mode). Modes: "autocast" (bf16/fp16 over fp32 weights, fp32
# residual stream), "fp32", "half-base" (LoRA over a bf16/fp16 base: 2 B residual
# stream) and "compiled" (torch.compile under autocast).
# llama/autocast: each RMSNorm keeps the fp32 residual, its normalised output and the
# bf16 cast the projections read (10h each), then q, the SDPA and o_proj inputs, and
# the gated MLP's gate, up, silu(gate) and product (8i). Fitted to d12 and d20 at seq
# 2048 and llama-1b at seq 512 and 2048 (within 1.3% per layer; the kv and MLP terms
# cannot be told apart on these shapes, so the MLP keeps its derived 8i).
# llama/fp32: 4 B everywhere, no casts; fitted to d20 fp32 at seq 1024.
# llama/half-base: the RMSNorm's fp32 upcast of a 2 B input is a new tensor; fitted
# to llama-7b LoRA (fp16 base) at seq 1024, within 0.2%.
# gpt2/autocast: gelu_new's python formula saves five 4h-wide tensors (10i); the rest
# fitted to gpt2-124m and gpt2-355m at seq 1024 (84h per layer with i = 4h).
# gpt2/fp32: gpt2-124m fp32 at seq 1024 (the MLP term doubled from autocast's).
# compiled (torch.compile under autocast), read from the tensors alive at the peak
# (torch's memory history, d20 at seq 2048 on an H200, 2026-12-01): per llama layer
# two fp32 residuals (8h), six bf16 h-wide tensors (the two norms' outputs, q, k, v,
# SDPA's output: 8h + 4kv) and three bf16 MLP tensors (6i); small ones (norm
# statistics, SDPA's log-sum-exp) aside, this fits d20 at seq 1024 and 2048,
# micro-batch 8 to 16, and d12 at seq 1024 and 2048 within 0.6%; d20 at seq 2048 b16
# again once the trainer stopped building a causal mask under compile: 40 B per token
# and layer more than this (0.1%). gpt2, from gpt2-124m b48's history without the mask:
# the same two residuals and norm outputs (12h), the fused q/k/v (6h), small ones (four
# of 0.52h, two of 0.13h: 2.3h) and the MLP's input and GELU output (4i): 20.06h + 4i.
# Both then raised by 0.1h: ten capped and matrix runs on that trainer (d12, d20, gpt2-124m,
# gpt2-355m, llama-160m, llama-1b, factorized-197m; seq 512 to 2048) allocated 0.04-0.10h
# per layer more than the histories' figure; 13 runs at the 7 boundaries drawn after held out of sample.
# No measurement covers gpt2 with a half base or fp32 under compile: those take the
# nearest mode that saves more (autocast, fp32).
_ACTIVATION: dict[tuple[str, str], tuple[float, float, float]] = {
    ("llama", "autocast"): (30, 4, 8),
    ("llama", "fp32"): (32, 8, 16),
    ("llama", "half-base"): (19, 4, 8),
    ("llama", "compiled"): (16.1, 4, 6),
    ("gpt2", "autocast"): (44, 0, 10),
    ("gpt2", "half-base"): (44, 0, 10),
    ("gpt2", "fp32"): (32, 0, 20),
    ("gpt2", "compiled"): (20.1, 0, 4),
}
# The loss. Eager jobs run the LM head and the cross-entropy a chunk of tokens at a
# time (``runner.trainer.loss``): a chunk's fp32 logits take at most
# CHUNK_LOGITS_BYTES, and the hidden states' and the head's gradients are computed on
# the way and kept until backward (``chunked_loss_bytes``). Before, an eager loss held
# 12 B per token per vocabulary entry at the start of backward (the fp32 log-softmax
# and its incoming and outgoing gradients; 11.9-12.0 B measured on gpt2-124m,
# gpt2-355m and d20). Under torch.compile the loss is fused and its backward reuses
# the logits' buffer: the bf16 logits alone at the peak, 2 B (the memory history of
# d20); fp32 under compile is not measured: 4 B, the same tensor.
CHUNK_LOGITS_BYTES = 256 * 2**20
_COMPILED_LOGITS_BYTES = {True: 2, False: 4}  # keyed by autocast
_OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "sgd": 4}
# torch's foreach AdamW (CPU, MPS) builds one fp32 temporary the size of the parameters
# (sqrt of the second moment) while it steps; the fused CUDA kernel builds none.
_FOREACH_STEP_TEMP_BYTES = {"adamw": 4, "adamw8bit": 0, "sgd": 0}
# bitsandbytes: int8 weights; NF4 packs two weights per byte, with double quantization
# an 8-bit absmax per 64 weights and an fp32 scale per 256 absmaxes.
_QUANTIZED_BYTES = {"8bit": 1.0, "4bit": 0.5 + 1 / 64 + 4 / (64 * 256)}
# The caching allocator's fragmentation on a roomy card: max reserved over max allocated
# was 1.02-1.07 (median 1.04) over the 13 matrix runs without checkpointing. With
# checkpointing, when the loss held multi-GiB buffers, 1.04-1.22; 10% of the loss
# buffers on top covered it. With the chunked loss it was 1.01-1.10 (H200, 2026-12-01).
ALLOCATOR_HEADROOM = 0.05
CHECKPOINTING_LOSS_HEADROOM = 0.10
# A checkpointed layer's backward: its recomputed activations, a share of them again for
# its backward's temporaries, per token and MLP width the gradients its MLP makes, and per
# parameter of the layer its weights' casts and gradients. Read off torch's memory history
# at the peak of checkpointed steps (``bench/memory_peak.py``, H200, 2026-12-01): at
# LLaMA's top layer, besides every layer's input and the head's gradient, the layer's
# saved activations and about two bf16 gradients of the MLP's width; the final norm's
# tensors are gone, its backward done. Then fitted to the allocated peaks of 44
# checkpointed LLaMA-family runs (d12, d20, llama-160m, llama-1b; micro-batch 14 to 426,
# seq 512 to 2048): within -0.02 and +0.065 GiB. GPT-2 (16 runs) and LoRA (9) keep their
# MLP at one ratio to the width, so one share covers both terms: within -0.015 and +0.06,
# and +0.03. factorized-197m, whose residual stream is bf16 (a recomputed layer's fp32 copies of
# its input stand for the residuals, its gradients are 2 B wide), within -0.03 and +0.04% (b159 to
# b382). GPT-2's GELU is a python formula with temporaries of the MLP's width; LLaMA's SiLU is one op.
RECOMPUTE_TEMPORARIES = {"gpt2": 0.48, "llama": 0.0, "half-base": 0.4}
# In fp32 (H200, 2026-12-01: d12 and llama-160m at seq 2048, d20 and llama-160m at seq 1024,
# micro-batch 48 to 128, read off torch's memory history) the MLP holds one more fp32 tensor of
# its width: 8.125 B, within -7 and +20 MiB of those peaks (0.1%); llama-1b, whose grouped key
# and value heads fp32 repeats, comes out 0.1 GiB high.
RECOMPUTE_MLP_BYTES = {("gpt2", True): 0, ("llama", True): 4.125, ("half-base", True): 0,
                       ("gpt2", False): 0, ("llama", False): 8.125}  # keyed by (kind, autocast)
RECOMPUTE_BYTES_PER_LAYER_PARAM = {"gpt2": 10, "llama": 3.5, "half-base": 0.5}
# Taken on CUDA beyond the catalog's context figure (measured right after the context is
# made): kernels loaded lazily by the first training step, 240 MiB outside torch's
# allocator (767 MiB at the end less the 527 MiB context, every matrix run), and the
# cuBLAS/cuBLASLt workspaces torch allocates at the first matmul, 64-70 MiB in tensors.
CUDA_KERNELS_BYTES = 240 * 2**20
CUBLAS_WORKSPACE_BYTES = 64 * 2**20
# At a full card, expandable segments give back cached memory in whole pages of the
# large pool (20 MiB), so the part-used pages around free blocks stay mapped: a 16-bit
# job needs room above its allocated peak for them. Measured on an H200, 2026-12-01, with
# the optimizer's states made before the first step
# (``runner.trainer.engine.init_optimizer_state``), the allocator capped at 24 GB and 40 GB
# one allocator page lower: of the checkpointed runs at or past their boundaries, those
# that ran out of memory had up to 0.099 GiB of room above their predicted peak
# (factorized-197m seq 1024 b213), and all but two (d12, 0.031 GiB) of those that ran
# 0.103 GiB or more. Eager jobs without checkpointing likewise: out of memory with 0.039
# GiB (factorized-197m b45 at 40 GB, its backward's fp32 temporaries), run with 0.140 or
# more. 0.1 GiB lies between. Compiled jobs without checkpointing too, once the trainer
# stopped building a causal mask under compile and their terms were refitted to it: out of
# memory with 0.086 GiB (gpt2-124m b49 at 24 GB, and at seq 512 b98), run with 0.106 or more
# (that mask, 2 B x seq per token, had been room they did not need). fp32 with checkpointing
# needs none (d12 b160 ran with 0.001 GiB, llama-1b b25 with 0.062; with 0.1 GiB both were
# refused). Run again, a job ran or ran out of memory as the first time, to the MiB: which
# pages stay part-used is the job's, not chance (bench/results/gpu-repeats-*).
CAP_SLACK_BYTES = int(0.1 * 2**30)
# Near a full CUDA card the estimate does not decide: from AT_LIMIT_SHORT_BYTES short of the card to
# AT_LIMIT_SPARE_BYTES to spare the verdict is "at the limit", and a run or probe of the job on the host
# settles it (``plan.measured``). Over 281 capped and matrix runs on an H200 (2026-12-01 and 02), re-planned
# by this planner, every job with 0.03 GiB or more to spare by the estimate ran, but for llama-160m b207 (0.022,
# compiled and checkpointed: out of memory), and every one 0.12 GiB or more short ran out of memory; between,
# jobs went either way, each the same way every time it ran. The estimate errs more often high than low near
# the card (a job short by it may need fewer part-used pages than the slack, or its allocated peak be
# overestimated: factorized-197m b212, compiled and checkpointed, ran 0.114 GiB short), so the band reaches
# further that way. The 39 boundaries it drew then ran out of sample: 37 decided verdicts, all right.
AT_LIMIT_SPARE_BYTES = int(0.1 * 2**30)
AT_LIMIT_SHORT_BYTES = int(0.15 * 2**30)
# Without checkpointing, once the loss is done, backward runs through the final norm (LLaMA: in
# fp32, its input and five fp32 temporaries of the hidden width, 24 B) or GPT-2's last block while
# every layer's activations are still held: at enough tokens per micro-batch this outgrows the loss's
# buffers. Read off torch's memory history at the peaks of eager bf16 steps (H200, 2026-12-01):
# factorized-197m at seq 1024, micro-batch 45 and 64, 25.6-26.0 B per token and hidden width above
# every layer's activations and the head's gradient (the cuBLAS workspaces, 64 MiB, included); 25
# comes within 0.1%. GPT-2 124M at micro-batch 40: 55.3. llama-160m at micro-batch 64, d20 at 16 and
# factorized-197m at 12 peaked in the loss instead, as this predicts.
OUTPUT_BACKWARD_BYTES = {"llama": 25, "gpt2": 55}  # per token and hidden width
# torch.compile with checkpointing, read off torch's memory history (H200, 2026-12-01) once the
# trainer stopped transformers from building a causal mask under compile (``causal_attention``;
# before, SDPA kept a 2 B copy of it, seq x seq per row, which the first fit took for the final
# norm's and the recompute's). Six histories: gpt2-124m b149 and gpt2-355m b153 at seq 1024, d20
# b33 and llama-160m b174 at seq 2048, llama-1b b36 and b42 at seq 1024 and 2048. At the loss the
# final norm keeps its bf16 output alone (2.02-2.09h per token with the small ones), and two bf16
# copies of the head are held, not one. A recomputed LLaMA layer holds what an eager checkpointed
# one does, within -0.75h and +1.84h per token beyond it (1h is planned: 69 MiB over llama-1b b36,
# the one that peaks there); a recomputed GPT-2 block is fused (its GELU's temporaries are gone):
# 59.5 B per token and hidden width and 6 B per parameter of the block fit gpt2-124m and
# gpt2-355m exactly. The cuBLAS workspaces, in the runtime, are left out of these fits.
COMPILED_RECOMPUTE_BYTES = 1  # LLaMA: per token and hidden width, on top of an eager recomputed layer
COMPILED_GPT2_RECOMPUTE_BYTES = (59.5, 6)  # per token and hidden width, per parameter of the block
COMPILED_CHECKPOINTED_FINAL_NORM_BYTES = 2  # per token and hidden width
# Without checkpointing the same histories of d20 (seq 2048, b16) and gpt2-124m (seq 1024, b48) hold,
# at the start of backward, every block's bf16 weight copies and two of the head (the one forward
# saved and the one backward casts first, tied to the embedding or not), and the final norm's saved
# tensors: GPT-2's fp32 input and bf16 output (6h), LLaMA's two bf16 tensors (4h). With these both
# are within 0.2% of the measured peak (cuBLAS's workspaces aside), where they were 0.35% and 1.8% high.
COMPILED_HEAD_COPIES = 2
COMPILED_FINAL_NORM_BYTES = {"gpt2": 6, "llama": 4}  # per token and hidden width


@dataclass(frozen=True)
class LoraShape:
    """LoRA settings the memory model needs: rank and the module names adapted."""

    rank: int
    target_modules: tuple[str, ...]


# What the trainer adapts for target_modules: auto.
DEFAULT_LORA_TARGETS = {"gpt2": ("c_attn", "c_proj"), "llama": ("q_proj", "k_proj", "v_proj", "o_proj")}


def lora_targets(shape: ModelShape, target_modules: list[str] | str) -> tuple[str, ...]:
    if target_modules == "auto":
        return DEFAULT_LORA_TARGETS[family(shape)]
    return tuple(target_modules)


def lora_params(shape: ModelShape, lora: LoraShape) -> int:
    """Adapter parameters: rank x (in + out) for every adapted linear in every layer."""
    h, i = shape.hidden, shape.intermediate
    kv = shape.kv_heads * shape.head_dim
    if shape.arch == "gpt2":
        dims = {"c_attn": [(h, 3 * h)], "c_proj": [(h, h), (i, h)], "c_fc": [(h, i)]}
    else:
        dims = {"q_proj": [(h, h)], "k_proj": [(h, kv)], "v_proj": [(h, kv)], "o_proj": [(h, h)],
                "gate_proj": [(h, i)], "up_proj": [(h, i)], "down_proj": [(i, h)]}
    per_layer = sum(lora.rank * (a + b) for name in lora.target_modules for a, b in dims.get(name, []))
    return shape.layers * per_layer


def unknown_lora_targets(shape: ModelShape, targets: tuple[str, ...]) -> list[str]:
    known = {"c_attn", "c_proj", "c_fc"} if shape.arch == "gpt2" else {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    return [t for t in targets if t not in known]


@dataclass(frozen=True)
class MemoryBreakdown:
    """Every term of one device's peak training memory, in bytes, and the verdict."""

    params: int
    trainable_params: int
    weights_bytes: int  # fp32 parameters, or the frozen LoRA base in its dtype
    weight_copies_bytes: int  # autocast's low-precision copies of fp32 matmul weights
    gradients_bytes: int
    optimizer_bytes: int
    master_weights_bytes: int  # 0 under the trainer's convention: parameters are already fp32
    optimizer_step_bytes: int  # transient while the optimizer steps
    activations_bytes: int  # with checkpointing: every layer's input and the final norm
    activations_per_layer_bytes: int  # one layer's saved activations (recomputed one at a time with checkpointing)
    logits_bytes: int  # logits, fp32 upcast for cross-entropy, and their gradients
    lora_bytes: int  # adapter weights (their gradients and states are in gradients/optimizer)
    runtime_bytes: int  # CUDA context and kernels, or Metal's / the CPU runtime's working set
    headroom_bytes: int  # allocator fragmentation
    capacity_bytes: int  # what training may use: memory x usable share
    memory_bytes: int  # the device's memory (unified memory on Apple)
    usable_share: float
    base_weight_bytes_per_param: float
    gradient_checkpointing: bool
    device: Device
    grad_accum: int
    shards: int = 1  # GPUs that FSDP shards weights, gradients and optimizer states over (1: not sharded)
    gradient_buckets: bool = False  # DDP: gradients live in buckets that stay allocated between steps
    head_gradient_bytes: int = 0  # the LM head's gradient, made first in backward (or in the chunked loss)
    embedding_gradient_bytes: int = 0  # an untied token table's gradient, made last
    recompute_bytes: int = 0  # with checkpointing: one layer recomputed and its backward (RECOMPUTE_*)
    output_backward_bytes: int = 0  # without: the final norm's or last block's backward (OUTPUT_BACKWARD_BYTES)
    final_norm_bytes: int = 0  # what the final norm saves for backward, in activations_bytes
    cap_slack_bytes: int = 0  # pages the allocator cannot give back at a full card (CAP_SLACK_BYTES)
    chunked_loss: bool = True  # the trainer's chunked loss; False: the loss torch.compile fuses
    outcome: MemoryOutcome | None = None  # a run of this job on the host that decides the verdict (plan.measured)

    @property
    def backward_peak_bytes(self) -> int:
        """Allocated during backward: weights and states, what forward saved, and gradients.

        Gradients are freed after every optimizer step (``zero_grad(set_to_none=True)``),
        so with one micro-batch per step they fill in only as saved activations are
        released; with accumulation they are already there when backward starts.
        """
        resident = self.weights_bytes + self.lora_bytes + self.optimizer_bytes + self.master_weights_bytes
        if self.gradient_checkpointing:
            # Forward ends with every layer's input saved and the loss's buffers. Backward
            # recomputes one layer at a time (recompute_bytes) over the inputs of the layers
            # below it and the gradients of those above: most at the top layer (every input,
            # the head's gradient; the final norm is done) or at the bottom one (every
            # gradient but the embedding's, which comes last when it is not the head's).
            saved = self.weight_copies_bytes + self.activations_bytes + self.logits_bytes
            late = max(self.activations_bytes - self.final_norm_bytes + self.head_gradient_bytes,
                       self.gradients_bytes - self.embedding_gradient_bytes) + self.recompute_bytes
        else:
            # the loss's buffers, or the output's backward over every layer's activations
            saved = self.weight_copies_bytes + self.activations_bytes + max(self.logits_bytes, self._after_loss_bytes)
            late = self.gradients_bytes
        if self.grad_accum > 1 or self.gradient_buckets:
            return resident + saved + self.gradients_bytes
        return resident + max(saved, late)

    @property
    def _after_loss_bytes(self) -> int:
        """Without checkpointing: what the output's backward adds once the final norm's tensors are gone."""
        return self.output_backward_bytes + self.head_gradient_bytes - self.final_norm_bytes

    @property
    def output_backward_peaks(self) -> bool:
        """Whether the step peaks in the output's backward rather than in the loss."""
        return not self.gradient_checkpointing and self._after_loss_bytes > self.logits_bytes

    @property
    def step_peak_bytes(self) -> int:
        """Allocated while the optimizer steps: weights, gradients, states and the step's temporary."""
        return (self.weights_bytes + self.lora_bytes + self.gradients_bytes + self.optimizer_bytes
                + self.master_weights_bytes + self.optimizer_step_bytes)

    @property
    def allocated_bytes(self) -> int:
        """Peak bytes in tensors (what ``torch.cuda.max_memory_allocated`` reports)."""
        return max(self.backward_peak_bytes, self.step_peak_bytes)

    @property
    def peak_bytes(self) -> int:
        """Peak device memory of the process: tensors, fragmentation and the runtime."""
        return self.allocated_bytes + self.headroom_bytes + self.runtime_bytes

    @property
    def required_bytes(self) -> int:
        """What the device must offer to run the job.

        On CUDA the allocated peak, the cap slack and the runtime. The trainer runs
        CUDA's allocator with expandable segments (``runner.trainer.allocator``): at
        the card's limit it unmaps its cached pages and maps them again where the next
        request fits, so the pool's fragmentation (``headroom_bytes``, what a roomy
        card shows) costs nothing there but the part-used pages it cannot unmap
        (``cap_slack_bytes``). With fixed segments every capped run of 2026-11-24 that
        ran out of memory did so in its second step, with 5-10% of the card free in
        pieces too small for the next loss buffer. Elsewhere the peak.
        """
        if self.device != "cuda":
            return self.peak_bytes
        return self.allocated_bytes + self.cap_slack_bytes + self.runtime_bytes

    @property
    def margin_bytes(self) -> int:
        return self.capacity_bytes - self.required_bytes

    @property
    def at_limit(self) -> bool:
        """Near a full CUDA card (AT_LIMIT_*), with no run on the host to decide: the estimate cannot."""
        return (self.outcome is None and self.device == "cuda"
                and -AT_LIMIT_SHORT_BYTES < self.margin_bytes < AT_LIMIT_SPARE_BYTES)

    @property
    def fits(self) -> bool:
        """What a run of this job on the host did, where one decides it; else the estimate, when it can tell."""
        if self.outcome is not None:
            return self.outcome.ran
        return self.margin_bytes >= 0 and not self.at_limit

    def verdict(self) -> str:
        """The breakdown's last words: fits, does not fit or at the limit, and what decided it (``margin_bytes``
        beside them)."""
        margin = "spare" if self.margin_bytes >= 0 else "short"
        if self.at_limit:
            return f"at the limit: {margin} by the estimate, closer to a full card than it can decide"
        said = ("fits" if self.fits else "does not fit") + ": "
        return said + (f"{self.outcome.said()}; by the estimate: {margin}" if self.outcome else margin)

    def rows(self) -> list[tuple[str, int, str]]:
        """(term, bytes, note) for display, in the order memory is taken."""
        ckpt = "with" if self.gradient_checkpointing else "without"
        base = f"{self.base_weight_bytes_per_param:g} B/param"
        sharded = f" / {self.shards} GPUs (FSDP)" if self.shards > 1 else ""
        copies = ("unsharded root + 2 blocks, gathered in the compute dtype" if self.shards > 1
                  else "2 B per matmul weight, held until backward")
        grads_note = (" + one unsharded block" if self.shards > 1
                      else "; DDP buckets, resident" if self.gradient_buckets else "")
        return [
            ("weights", self.weights_bytes, f"{self.params:,} params x {base}{sharded}"),
            ("autocast weight copies" if self.shards == 1 else "gathered parameters", self.weight_copies_bytes, copies),
            ("LoRA adapters", self.lora_bytes, "fp32"),
            ("gradients", self.gradients_bytes, f"{self.trainable_params:,} trainable params x 4 B{sharded}{grads_note}"),
            ("optimizer states", self.optimizer_bytes, f"per trainable param{sharded}"),
            ("fp32 master weights", self.master_weights_bytes, "none: parameters are fp32 already"),
            ("activations", self.activations_bytes,
             f"{ckpt} checkpointing; {self.activations_per_layer_bytes / 2**20:,.0f} MiB per layer"
             + (", one layer recomputed at a time" if self.gradient_checkpointing else "")),
            ("logits and loss", self.logits_bytes,
             "one chunk's logits, the head's and hidden states' gradients" if self.chunked_loss
             else "the bf16 logits, loss fused by torch.compile"),
            ("output's backward", self.output_backward_bytes if self.output_backward_peaks else 0,
             "final norm's backward (GPT-2: last block's), more than the loss's buffers"),
            ("optimizer step temporary", self.optimizer_step_bytes, "only while stepping"),
            ("allocator headroom", self.headroom_bytes, f"{ALLOCATOR_HEADROOM:.0%} of allocated"
             + (f" + {CHECKPOINTING_LOSS_HEADROOM:.0%} of the loss buffers" if self.gradient_checkpointing else "")),
            ("runtime", self.runtime_bytes, "CUDA context, kernels, cuBLAS workspaces" if self.device == "cuda"
             else f"{self.device} runtime"),
        ]


def estimate_memory(
    shape: ModelShape,
    *,
    seq_len: int,
    micro_batch: int,
    precision: str,
    device: Device,
    capacity_bytes: int,
    memory_bytes: int,
    usable_share: float,
    runtime_bytes: int,
    optimizer: str = "adamw",
    gradient_checkpointing: bool = False,
    grad_accum: int = 1,
    lora: LoraShape | None = None,
    quantization: str = "none",
    shards: int = 1,
    gradient_buckets: bool = False,
    compiled: bool = False,
) -> MemoryBreakdown:
    """The memory one device needs to train ``shape`` at this micro-batch and sequence length.

    ``shards`` > 1: full training under FSDP over that many GPUs (not with LoRA);
    ``gradient_buckets``: one of several DDP processes.
    """
    if shards > 1 and lora is not None:
        raise ValueError("FSDP is planned for full training only")
    params = shape.param_count()
    autocast = precision in ("bf16", "fp16", "fp8")
    fused_loss = compiled and device == "cuda"  # torch.compile fuses the loss; eager jobs chunk it
    head = shape.vocab_size * (shape.embedding_dim or shape.hidden)
    matmul_params = shape.non_embedding_params() + head

    if lora is None:
        trainable = params
        weight_bpp = 4.0
        weights = 4 * params
        # Checkpointed layers recompute their casts in backward; a compiled job holds two copies of the
        # head (an eager job's chunked loss casts the head for itself: ``chunked_loss_bytes``).
        if fused_loss:
            held = head * COMPILED_HEAD_COPIES + (0 if gradient_checkpointing
                                                  else shape.layers * _block_linear_params(shape))
        else:
            held = 0 if gradient_checkpointing else matmul_params - head
        copies = 2 * held if autocast else 0
        adapters = 0
    else:
        trainable = lora_params(shape, lora)
        compute_bpp = 2.0 if autocast and device != "cpu" else 4.0
        block_params = shape.layers * _block_linear_params(shape)
        if quantization in _QUANTIZED_BYTES:
            weight_bpp = _QUANTIZED_BYTES[quantization]
            weights = int(block_params * weight_bpp + (params - block_params) * compute_bpp)
        else:
            weight_bpp = compute_bpp
            weights = int(params * compute_bpp)
        copies = 0
        adapters = 4 * trainable
    gradients = 4 * trainable
    optimizer_states = _OPTIMIZER_STATE_BYTES[optimizer] * trainable
    step_temp = _FOREACH_STEP_TEMP_BYTES[optimizer] * trainable if device != "cuda" else 0

    if shards > 1:
        block = shape.non_embedding_params() // shape.layers
        root = params - shape.layers * block
        weights = -(-4 * params // shards)
        copies = (2 if autocast else 4) * (root + 2 * block)
        gradients = -(-4 * trainable // shards) + 4 * block
        optimizer_states = -(-optimizer_states // shards)
        step_temp = -(-step_temp // shards)

    tokens = micro_batch * seq_len
    # The residual stream is fp32 when the token embedding is (full training), and in the
    # compute dtype over a LoRA's half-precision base or after a factorized embedding's
    # up-projection, which autocast runs (its layers' saved tensors otherwise match the
    # autocast mode's within 5%: factorized-197m's memory history, H200, 2026-12-01).
    half_base = lora is not None and autocast and device != "cpu"
    residual_bytes = 2 if (half_base or (shape.embedding_dim and autocast and device != "cpu")) else 4
    mode = activation_mode(autocast=autocast, half_base=half_base, compiled=compiled and device == "cuda")
    per_layer = int(tokens * activation_bytes_per_token_layer(shape, mode, residual_bytes))
    # The final norm keeps its input in fp32 (a 2 B input: an fp32 copy of it) and its normalised output in
    # the input's dtype, and the head reads its output cast to the compute dtype; a LoRA's frozen half-precision
    # norm keeps neither (factorized-197m at seq 1024, micro-batch 24, H200, 2026-12-01: 8h).
    final_norm = tokens * shape.hidden * (2 * residual_bytes + 2 if half_base or not autocast
                                          else 4 + residual_bytes + 2)
    if mode == "compiled":
        final_norm = tokens * shape.hidden * (COMPILED_CHECKPOINTED_FINAL_NORM_BYTES if gradient_checkpointing
                                              else COMPILED_FINAL_NORM_BYTES[family(shape)])
    # A factorized embedding's up-projection keeps its input, the table's rows, in the compute dtype.
    embedding = tokens * (shape.embedding_dim or 0) * (2 if autocast else 4)
    if gradient_checkpointing:
        # Each layer keeps its input; backward recomputes one layer at a time (backward_peak_bytes).
        activations = shape.layers * tokens * shape.hidden * residual_bytes + final_norm + embedding
    else:
        activations = shape.layers * per_layer + final_norm + embedding
    if fused_loss:
        logits = tokens * shape.vocab_size * _COMPILED_LOGITS_BYTES[autocast]
    else:
        # the head reads the final norm's output (the residual's dtype), or a factorized
        # model's down-projection (autocast's dtype); a LoRA base is in the compute dtype already
        hidden_bytes = 2 if autocast and (residual_bytes == 2 or shape.embedding_dim) else 4
        logits = chunked_loss_bytes(tokens, shape.vocab_size, shape.embedding_dim or shape.hidden,
                                    hidden_bytes=hidden_bytes, half=autocast,
                                    head_cast=autocast and lora is None, head_trained=lora is None)
    if device == "cuda":
        runtime_bytes += CUDA_KERNELS_BYTES + CUBLAS_WORKSPACE_BYTES

    head_grad = embedding_grad = 0
    if lora is None:
        head_grad = -(-4 * head // shards)
        embedding_grad = 0 if shape.tie_embeddings else head_grad  # the token table is the head's shape
    recompute = 0
    if gradient_checkpointing:
        kind = "half-base" if mode == "half-base" else family(shape)
        # A layer recomputed from a 2 B input keeps fp32 copies of it where an fp32 residual is kept itself,
        # so it saves what it does from a 4 B one; its gradients are in the residual's dtype.
        # Under torch.compile a recomputed LLaMA layer holds what an eager one does, and a little more; a
        # GPT-2 block is fused (COMPILED_RECOMPUTE_BYTES, COMPILED_GPT2_RECOMPUTE_BYTES).
        layer_params = shape.non_embedding_params() // shape.layers
        if mode == "compiled" and kind == "gpt2":
            per_token, per_param = COMPILED_GPT2_RECOMPUTE_BYTES
            recompute = int(per_token * tokens * shape.hidden + per_param * layer_params)
        else:
            recompute_mode = "autocast" if mode == "compiled" else mode
            narrower_gradients = (4 - residual_bytes) * shape.hidden if recompute_mode == "autocast" else 0
            recomputed = tokens * (activation_bytes_per_token_layer(shape, recompute_mode) - narrower_gradients)
            recompute = int(recomputed * (1 + RECOMPUTE_TEMPORARIES[kind])
                            + RECOMPUTE_MLP_BYTES[kind, autocast] * tokens * shape.intermediate
                            + RECOMPUTE_BYTES_PER_LAYER_PARAM[kind] * layer_params
                            + (COMPILED_RECOMPUTE_BYTES * tokens * shape.hidden if mode == "compiled" else 0))

    cap_slack = CAP_SLACK_BYTES if autocast and device == "cuda" else 0
    output_backward = 0 if gradient_checkpointing or fused_loss else (
        OUTPUT_BACKWARD_BYTES[family(shape)] * tokens * shape.hidden)

    partial = MemoryBreakdown(
        params=params, trainable_params=trainable, weights_bytes=weights, weight_copies_bytes=copies,
        gradients_bytes=gradients, optimizer_bytes=optimizer_states, master_weights_bytes=0,
        optimizer_step_bytes=step_temp, activations_bytes=activations, activations_per_layer_bytes=per_layer,
        logits_bytes=logits, lora_bytes=adapters, runtime_bytes=runtime_bytes, headroom_bytes=0,
        capacity_bytes=capacity_bytes, memory_bytes=memory_bytes, usable_share=usable_share,
        base_weight_bytes_per_param=weight_bpp, gradient_checkpointing=gradient_checkpointing, device=device,
        grad_accum=grad_accum, shards=shards, gradient_buckets=gradient_buckets,
        head_gradient_bytes=head_grad, embedding_gradient_bytes=embedding_grad,
        recompute_bytes=recompute, output_backward_bytes=output_backward, final_norm_bytes=final_norm,
        cap_slack_bytes=cap_slack, chunked_loss=not fused_loss,
    )
    headroom = 0
    if device != "cpu":
        headroom = int(partial.allocated_bytes * ALLOCATOR_HEADROOM
                       + (logits * CHECKPOINTING_LOSS_HEADROOM if gradient_checkpointing else 0))
    return replace(partial, headroom_bytes=headroom)


def tokens_per_chunk(vocab_size: int) -> int:
    """Tokens per chunk of the trainer's chunked loss: CHUNK_LOGITS_BYTES of fp32 logits, whole tiles of 128."""
    return max(128, CHUNK_LOGITS_BYTES // (4 * vocab_size) // 128 * 128)


def chunked_loss_bytes(tokens: int, vocab: int, width: int, *, hidden_bytes: int, half: bool,
                       head_cast: bool, head_trained: bool) -> int:
    """What the chunked loss holds at its peak, on top of what forward saved.

    Kept until backward: the hidden states' gradient and, when the head trains, its
    fp32 gradient. While a chunk runs: its fp32 logits and their log-softmax, or its
    softmax gradient (in ``half``, or fp32) with the head's share of it; and the head
    cast to the compute dtype when its weights are fp32 under autocast. The first
    took one more chunk of the compute dtype than these tensors on an H200
    (2026-12-01): eager matrix runs peaked 0.12 GiB (bf16) and 0.24 GiB (fp32) above
    them, whatever the micro-batch, the size of that buffer.
    """
    chunk = min(tokens, tokens_per_chunk(vocab)) * vocab
    low = 2 if half else 4
    during = max((8 + low) * chunk, low * chunk + (low * vocab * width if head_trained else 0))
    kept = tokens * width * hidden_bytes + (4 * vocab * width if head_trained else 0)
    return kept + during + (2 * vocab * width if head_cast else 0)


def family(shape: ModelShape) -> str:
    """Which block the constants were measured on: GPT-2's, or LLaMA's (every other architecture)."""
    return "gpt2" if shape.arch == "gpt2" else "llama"


def activation_mode(*, autocast: bool, half_base: bool, compiled: bool) -> str:
    """Which of ``_ACTIVATION``'s measured modes a run is in."""
    if not autocast:
        return "fp32"
    if compiled:
        return "compiled"
    return "half-base" if half_base else "autocast"


def activation_bytes_per_token_layer(shape: ModelShape, mode: str, residual_bytes: int = 4) -> float:
    """Bytes one layer saves for backward per token (SDPA attention: no seq^2 term).

    In fp32 the trainer repeats grouped key and value heads for SDPA
    (``runner.trainer.models.grouped_heads_repeated_in_fp32``): they are as wide as
    the queries. A layer under autocast keeps its two residuals in the residual
    stream's dtype: 2 B after a factorized embedding, whose RMSNorms then keep an
    fp32 copy of their input and a 2 B normalised output where an fp32 residual
    stream keeps the residual itself and a 4 B one (factorized-197m at seq 1024 on
    an H200, 2026-12-01: eager, micro-batch 12 to 64, within -0.6 and -0.1%, 5.8%
    high at 4 B; compiled, b32 to b36, within -0.2%, 8.8% high at 4 B) and, not
    measured, compiled over a LoRA's half-precision base.
    """
    c_h, c_kv, c_i = _ACTIVATION[(family(shape), mode)]
    if mode in ("compiled", "autocast"):
        c_h -= 2 * (4 - residual_bytes)
    kv = shape.hidden if mode == "fp32" else shape.kv_heads * shape.head_dim
    return c_h * shape.hidden + c_kv * kv + c_i * shape.intermediate


def _block_linear_params(shape: ModelShape) -> int:
    """Weights of one block's linear layers: what bitsandbytes quantizes."""
    h, i = shape.hidden, shape.intermediate
    if shape.arch == "gpt2":
        return 3 * h * h + h * h + 2 * h * i
    kv = shape.kv_heads * shape.head_dim
    return 2 * h * h + 2 * h * kv + 3 * h * i
