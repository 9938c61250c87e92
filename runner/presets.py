"""Model shapes: the named presets, and shapes read from Hugging Face config files.

A shape is everything the planner needs to count parameters, FLOPs and
activation memory, and everything the trainer needs to build the model from a
``transformers`` config without downloading weights. Pure Python: no torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

Arch = Literal["gpt2", "llama", "factorized-llama"]


@dataclass(frozen=True)
class ModelShape:
    """The architecture-level facts of a decoder-only transformer."""

    arch: Arch
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int  # MLP inner width (gated MLPs have three matrices of it)
    max_positions: int
    tie_embeddings: bool
    embedding_dim: int | None = None  # factorized embeddings: vocab x E, then E x hidden

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def gated_mlp(self) -> bool:
        return self.arch != "gpt2"

    def param_count(self) -> int:
        """Exact parameter count of the model ``hf_config`` builds (no weights needed)."""
        h, L = self.hidden, self.layers
        kv_dim = self.kv_heads * self.head_dim
        if self.arch == "gpt2":
            # c_attn (h -> 3h, bias), c_proj (h -> h, bias), two LayerNorms (w+b),
            # mlp c_fc (h -> i, bias), c_proj (i -> h, bias)
            per_layer = (h * 3 * h + 3 * h) + (h * h + h) + 4 * h + (h * self.intermediate + self.intermediate) + (self.intermediate * h + h)
            embed = self.vocab_size * h + self.max_positions * h
            final_norm = 2 * h
            head = 0 if self.tie_embeddings else self.vocab_size * h
            return embed + L * per_layer + final_norm + head
        # llama family: q, o (h x h), k, v (h x kv_dim), no biases; gated MLP; two RMSNorms
        per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * self.intermediate + 2 * h
        if self.embedding_dim:
            e = self.embedding_dim
            embed = self.vocab_size * e + e * h  # token table then up-projection
            head = 0 if self.tie_embeddings else h * e + self.vocab_size * e
            if self.tie_embeddings:
                head = h * e  # down-projection; the vocab table is shared
        else:
            embed = self.vocab_size * h
            head = 0 if self.tie_embeddings else self.vocab_size * h
        return embed + L * per_layer + h + head

    def non_embedding_params(self) -> int:
        """Parameters that do matrix work per token (the N in 6N FLOPs per token)."""
        table = self.vocab_size * (self.embedding_dim or self.hidden)
        if self.arch == "gpt2":
            table += self.max_positions * self.hidden
        return self.param_count() - table

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N for the matmuls (including the LM head) plus attention.

        Attention scores and the weighted sum cost 2 * 2 * seq * hidden per layer
        forward (causal masking is not subtracted, as in the PaLM/nanoGPT MFU
        convention), times three for forward and backward.
        """
        n_matmul = self.non_embedding_params()
        head = self.vocab_size * (self.embedding_dim or self.hidden)
        attention = 12 * self.layers * self.hidden * seq_len
        return 6 * (n_matmul + head) + attention

    def hf_config(self) -> dict:
        """A dict that ``transformers.AutoConfig.for_model(**d)`` turns into this model."""
        if self.arch == "gpt2":
            return {
                "model_type": "gpt2", "vocab_size": self.vocab_size, "n_embd": self.hidden,
                "n_layer": self.layers, "n_head": self.heads, "n_inner": self.intermediate,
                "n_positions": self.max_positions, "tie_word_embeddings": self.tie_embeddings,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            }
        config = {
            "model_type": "llama", "vocab_size": self.vocab_size, "hidden_size": self.hidden,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "intermediate_size": self.intermediate,
            "max_position_embeddings": self.max_positions, "tie_word_embeddings": self.tie_embeddings,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "head_dim": self.head_dim,
        }
        if self.embedding_dim:
            config["embedding_dim"] = self.embedding_dim
        return config

    def to_dict(self) -> dict:
        return asdict(self)


def _llama(hidden: int, layers: int, heads: int, kv_heads: int | None, intermediate: int, *,
           vocab: int = 32000, max_positions: int = 2048, tie: bool = False,
           embedding_dim: int | None = None) -> ModelShape:
    return ModelShape(
        arch="factorized-llama" if embedding_dim else "llama", vocab_size=vocab, hidden=hidden,
        layers=layers, heads=heads, kv_heads=kv_heads or heads, intermediate=intermediate,
        max_positions=max_positions, tie_embeddings=tie, embedding_dim=embedding_dim,
    )


def nanochat_depth(depth: int) -> ModelShape:
    """nanochat's ``dN`` family: width = 64 x depth, head_dim 128, vocab 65,536, untied.

    nanochat's MLP is relu^2 with 4x width (8 h^2 per layer); the gated MLP here
    uses 8/3 x width (rounded up to 64) so the parameter count matches.
    """
    hidden = 64 * depth
    intermediate = -(-(8 * hidden // 3) // 64) * 64
    return _llama(hidden, depth, max(1, hidden // 128), None, intermediate, vocab=65536, max_positions=2048)


PRESETS: dict[str, ModelShape] = {
    # GPT-2 small/medium (Radford et al. 2019), vocab padded to 50,304 as in nanoGPT.
    "gpt2-124m": ModelShape("gpt2", 50304, 768, 12, 12, 12, 3072, 1024, True),
    "gpt2-355m": ModelShape("gpt2", 50304, 1024, 24, 16, 16, 4096, 1024, True),
    # LLaMA-style shapes: 160m (a Pythia-160m-like width/depth), 1b (TinyLlama-1.1B), 7b (LLaMA-2-7B).
    "llama-160m": _llama(768, 12, 12, None, 3072),
    "llama-1b": _llama(2048, 22, 32, 4, 5632),
    "llama-7b": _llama(4096, 32, 32, None, 11008, max_positions=4096),
    # ~197M parameters with ALBERT-style factorized embeddings (vocab x 128 then 128 x 1024).
    "factorized-197m": _llama(1024, 15, 8, None, 2816, tie=True, embedding_dim=128, max_positions=2048),
    # A tiny model for laptops, CI and the quickstart (trains on a CPU in about a minute).
    "tiny": _llama(128, 4, 4, None, 352, vocab=4096, max_positions=512, tie=True),
}

SHAPE_FIELDS = ("vocab_size", "hidden", "layers", "heads", "kv_heads", "intermediate",
                "max_positions", "tie_embeddings", "embedding_dim")


def preset_names() -> list[str]:
    return [*PRESETS, "d<N> (nanochat depth, e.g. d12, d20)"]


def lookup_preset(name: str) -> ModelShape | None:
    """The shape for a preset name, including ``dN`` for any depth N from 1 to 64."""
    if name in PRESETS:
        return PRESETS[name]
    if len(name) > 1 and name[0] == "d" and name[1:].isdigit() and 1 <= int(name[1:]) <= 64:
        return nanochat_depth(int(name[1:]))
    return None


def with_overrides(shape: ModelShape, overrides: dict) -> ModelShape:
    """Apply ``model.overrides`` (keys from SHAPE_FIELDS) to a shape."""
    shape = replace(shape, **overrides)
    if "heads" in overrides and "kv_heads" not in overrides:
        shape = replace(shape, kv_heads=shape.heads)
    return shape


def shape_from_hf_config(config: dict) -> ModelShape:
    """Read a Hugging Face ``config.json`` dict (GPT-2 or LLaMA-like families)."""
    model_type = config.get("model_type", "")
    if model_type == "gpt2":
        hidden = config["n_embd"]
        return ModelShape(
            "gpt2", config["vocab_size"], hidden, config["n_layer"], config["n_head"], config["n_head"],
            config.get("n_inner") or 4 * hidden, config.get("n_positions", 1024),
            config.get("tie_word_embeddings", True),
        )
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    return ModelShape(
        "factorized-llama" if config.get("embedding_dim") else "llama",
        config["vocab_size"], hidden, config["num_hidden_layers"], heads,
        config.get("num_key_value_heads") or heads, config.get("intermediate_size") or 4 * hidden,
        config.get("max_position_embeddings", 2048), config.get("tie_word_embeddings", False),
        config.get("embedding_dim"),
    )


def shape_from_dir(path: Path) -> ModelShape:
    """Read ``config.json`` from a local model directory (Hugging Face layout)."""
    return shape_from_hf_config(json.loads((path / "config.json").read_text()))
