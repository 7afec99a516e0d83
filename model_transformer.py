"""Transformer++ baseline (Llama-style: RoPE, SwiGLU, RMSNorm, causal SDPA / flash attention, no biases).

The language model: token embedding -> n_layer blocks [x + attention(RMSNorm x); x + SwiGLU(RMSNorm x)] ->
RMSNorm -> LM head tied to the embedding. layer_pattern "A" is full causal attention; "S" letters give
sliding-window attention. The KV cache is preallocated for prefill + decoding. Shared pieces come from
model_common; the same harness trains, samples and benchmarks it beside the Miras models.
"""
from dataclasses import dataclass

import torch.nn as nn

from model_common import LM, Block, LMConfig, make_mixer


@dataclass
class TransformerConfig(LMConfig):
    layer_pattern: str = "A"


class Transformer(LM):
    config_class = TransformerConfig

    def __init__(self, config):
        super().__init__(config)  # token embedding, final RMSNorm, tied LM head
        self.blocks = nn.ModuleList(Block(config, make_mixer(config, kind)) for kind in config.layers)
        self.init_weights()
