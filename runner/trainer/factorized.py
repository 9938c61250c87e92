"""A LLaMA with factorized (ALBERT-style) token embeddings, buildable through the Auto classes.

The token table is vocab x E and a linear map lifts it to the hidden width; the
LM head projects hidden -> E and scores against the (tied) vocab x E table.
With a small E this cuts the embedding parameters of a small model by an order
of magnitude. Registered as model type ``factorized_llama`` so that
``AutoModelForCausalLM.from_config`` and ``from_pretrained`` build it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, LlamaConfig
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaModel, LlamaPreTrainedModel

MODEL_TYPE = "factorized_llama"


@dataclass(repr=False)
class FactorizedLlamaConfig(LlamaConfig):
    """A LlamaConfig with the width E of the factorized token table."""

    model_type = MODEL_TYPE
    embedding_dim: int = 128


class FactorizedEmbedding(nn.Module):
    """Token ids -> vocab x E table -> E x hidden projection."""

    def __init__(self, vocab_size: int, embedding_dim: int, hidden_size: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, embedding_dim)
        self.up = nn.Linear(embedding_dim, hidden_size, bias=False)

    @property
    def weight(self) -> nn.Parameter:
        # transformers reads get_input_embeddings().weight (e.g. to resize or tie)
        return self.table.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.up(self.table(input_ids))


class FactorizedLlamaForCausalLM(LlamaPreTrainedModel, GenerationMixin):
    """Causal LM: factorized embedding in, LLaMA decoder, hidden -> E -> vocab out."""

    config_class = FactorizedLlamaConfig
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.table.weight"}

    def __init__(self, config: FactorizedLlamaConfig):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.model.embed_tokens = FactorizedEmbedding(config.vocab_size, config.embedding_dim, config.hidden_size)
        self.down = nn.Linear(config.hidden_size, config.embedding_dim, bias=False)
        self.lm_head = nn.Linear(config.embedding_dim, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        logits = self.lm_head(self.down(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


AutoConfig.register(MODEL_TYPE, FactorizedLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(FactorizedLlamaConfig, FactorizedLlamaForCausalLM, exist_ok=True)
