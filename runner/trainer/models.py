"""Build the network a run trains: a preset or dN from config, a local directory, or a hub id.

Then, as the run asks: LoRA adapters (peft), quantized base weights
(bitsandbytes), fp8 matmuls (torchao), gradient checkpointing. Full fine-tunes
keep fp32 parameters (autocast does the low-precision math); LoRA stores the
frozen base in the compute dtype and the adapters in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from runner import presets
from runner.errors import UserError
from runner.trainer import factorized

if TYPE_CHECKING:
    from runner.spec import Experiment, LoraSpec

# Our name for SDPA attention whose plain causal mask is never built: see causal_attention().
CAUSAL_SDPA = "causal_sdpa"
COMPUTE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.bfloat16}
AUTO_LORA_TARGETS = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj"]}


@dataclass
class BuiltModel:
    """The trainable module and the facts the loop needs about it."""

    model: nn.Module  # the module whose state is saved (a PeftModel for LoRA)
    shape: presets.ModelShape | None  # for FLOPs per token; None for an architecture we cannot count
    lora: bool


def config_from_shape(shape: presets.ModelShape):
    """A transformers config for a shape; factorized shapes get our registered model type."""
    from transformers import AutoConfig

    values = shape.hf_config()
    if values.get("embedding_dim"):
        values["model_type"] = factorized.MODEL_TYPE
    return AutoConfig.for_model(**values)


def causal_attention() -> str:
    """Register and name SDPA attention that leaves a plain causal mask to SDPA's ``is_causal``.

    transformers builds the causal mask as a tensor whenever it is traced by
    torch.compile (it can only skip it when not tracing), and SDPA with a mask
    tensor cannot use the flash kernel: on an H100 the memory-efficient kernel
    it falls back to made attention 43% of a GPT-2-124M step. Without a cache
    it also looks for sequences packed into one row in the position ids, which
    it cannot read while tracing, so it forbids the skip there too (and SDPA
    keeps a 2 B additive copy of the mask, seq x seq per row, for backward).
    The trainer passes no attention mask and no position ids (packed rows are
    one causal sequence each; padded rows are padded on the right and their
    padding is only masked out of the loss), so the mask is plain causal and
    SDPA's ``is_causal`` computes exactly the same attention. Anything else (a
    padding mask, a cache's longer keys, a sliding window, mask functions a
    model adds) gets the usual SDPA mask. Image-block overlays (Gemma 3's, say)
    also forbid the skip without such a function; the trainer feeds text only,
    so none is ever built.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    def mask(*, q_length: int, kv_length: int, attention_mask=None, local_size=None,
             allow_is_causal_skip: bool = True, use_vmap: bool = False, **kwargs):
        # use_vmap: the model added its own mask functions; a cache forbids the skip only with q_length 1
        if attention_mask is None and local_size is None and not use_vmap and q_length == kv_length > 1:
            return None
        return sdpa_mask(q_length=q_length, kv_length=kv_length, attention_mask=attention_mask, local_size=local_size,
                         allow_is_causal_skip=allow_is_causal_skip, use_vmap=use_vmap, **kwargs)

    AttentionInterface.register(CAUSAL_SDPA, grouped_heads_repeated_in_fp32(sdpa_attention_forward))
    AttentionMaskInterface.register(CAUSAL_SDPA, mask)
    return CAUSAL_SDPA


def grouped_heads_repeated_in_fp32(attention):
    """``attention``, except that fp32 grouped-query attention gets its key and value heads repeated.

    SDPA takes grouped key and value heads only in its 16-bit kernels and its math
    one, and fp32 has no 16-bit kernel: the math kernel makes a seq x seq matrix per
    head, and its gradient (llama-1b in fp32 at 16 x 1024 tokens: 6 GiB more at the
    backward's peak, on an H200). Repeated heads run the memory-efficient kernel,
    which computes the same attention. Only the plain causal case the trainer runs
    (no mask, queries as long as keys) is handled here. Under autocast the queries
    arrive in fp32 too (LLaMA's rotary tables follow the fp32 residual stream), but
    SDPA runs in the compute dtype and takes the grouped heads as they are.
    """
    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        groups = query.shape[1] // key.shape[1]
        plain_causal = (attention_mask is None and query.shape[2] == key.shape[2] > 1
                        and getattr(module, "is_causal", True) and kwargs.get("position_bias") is None)
        fp32 = query.dtype == torch.float32 and not torch.is_autocast_enabled(query.device.type)
        if groups == 1 or not fp32 or not plain_causal:
            return attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling,
                                                               is_causal=True)
        return out.transpose(1, 2).contiguous(), None

    return forward


def build_model(experiment: Experiment, job_dir: Path, device: torch.device, precision: str) -> BuiltModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = experiment.model
    lora = experiment.lora is not None
    # LoRA keeps the frozen base in the compute dtype; a full fine-tune trains fp32 master weights.
    dtype = COMPUTE_DTYPES[precision] if lora and device.type != "cpu" else torch.float32
    quantization = _quantization_config(experiment.quantization, dtype) if experiment.quantization != "none" else None
    attention = causal_attention()
    if spec.preset:
        shape = presets.lookup_preset(spec.preset)
        if shape is None:
            raise UserError(f"unknown preset {spec.preset!r}", field="model.preset",
                            hint="presets: " + ", ".join(presets.preset_names()))
        shape = presets.with_overrides(shape, dict(spec.overrides))
        if quantization is not None:
            raise UserError("quantized base weights need pretrained weights", field="quantization",
                            hint="use model.path or model.hub with pretrained: true")
        model = AutoModelForCausalLM.from_config(config_from_shape(shape), attn_implementation=attention, dtype=dtype)
    else:
        source = _model_source(spec.path, spec.hub, job_dir)
        try:
            if spec.pretrained:
                extra = {"quantization_config": quantization, "device_map": {"": device.index or 0}} if quantization else {}
                model = AutoModelForCausalLM.from_pretrained(source, attn_implementation=attention, dtype=dtype, **extra)
            else:
                config = AutoConfig.from_pretrained(source)
                model = AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=dtype)
        except OSError as exc:
            raise UserError(f"cannot load model {source!r}: {str(exc).splitlines()[0]}", field="model",
                            hint="for a hub id, the hub must be reachable; else download it and use model.path") from None
        shape = _shape_of(model.config)
    model.config.use_cache = False
    if quantization is None:
        model.to(device)
    if experiment.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora:
        model = _add_lora(model, experiment.lora, quantized=quantization is not None,
                          checkpointing=experiment.train.gradient_checkpointing)
    if precision == "fp8":
        _convert_fp8(model, device)
    return BuiltModel(model=model, shape=shape, lora=lora)


def _model_source(path: str | None, hub: str | None, job_dir: Path) -> str:
    if path:
        local = Path(path).expanduser()
        local = local if local.is_absolute() else job_dir / local
        if not (local / "config.json").is_file():
            raise UserError(f"no config.json in {local}", field="model.path",
                            hint="point model.path at a Hugging Face model directory")
        return str(local)
    return hub or ""


def _shape_of(config) -> presets.ModelShape | None:
    try:
        return presets.shape_from_hf_config(config.to_dict())
    except (KeyError, TypeError):
        return None


def _quantization_config(kind: str, dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f"quantization: {kind} needs the bitsandbytes package, which is not installed",
                        field="quantization", hint="pip install bitsandbytes (CUDA only), or set quantization: none") from None
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16)


def lora_targets(model: nn.Module, spec: LoraSpec) -> list[str]:
    if spec.target_modules != "auto":
        return list(spec.target_modules)
    model_type = getattr(model.config, "model_type", "")
    family = "gpt2" if model_type == "gpt2" else "llama"
    return AUTO_LORA_TARGETS[family]


def _add_lora(model: nn.Module, spec: LoraSpec, *, quantized: bool, checkpointing: bool) -> nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    elif checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=lora_targets(model, spec), task_type="CAUSAL_LM",
                        fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2")
    model = get_peft_model(model, config)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # adapters train in fp32 whatever the base dtype
    return model


def fp8_eligible(module: nn.Module, name: str) -> bool:
    """A layer torchao's float8 training converts: an nn.Linear with both dimensions divisible by 16, not the
    LM head (it stays in bf16 for accuracy) and not a LoRA adapter (it trains in fp32, and its rank-wide
    matmuls are too small to gain). GPT-2's blocks are transformers' Conv1D, so none of theirs is."""
    return (isinstance(module, nn.Linear) and "lm_head" not in name and "lora_" not in name
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def _convert_fp8(model: nn.Module, device: torch.device) -> None:
    if not any(fp8_eligible(module, name) for name, module in model.named_modules()):
        raise UserError(f"precision fp8 has no layer to convert in this {type(model).__name__}: float8 trains "
                        "nn.Linear layers, and this model has none it can take", field="train.precision",
                        hint="use bf16, or a llama-style model")
    if device.type != "cuda":
        raise UserError("fp8 training needs a CUDA GPU (Ada or Hopper)", field="train.precision")
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise UserError("precision fp8 needs the torchao package, which is not installed",
                        field="train.precision", hint="pip install torchao, or use bf16") from None
    convert_to_float8_training(model, module_filter_fn=fp8_eligible)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
