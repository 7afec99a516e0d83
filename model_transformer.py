"""Transformer++ baseline (Llama-style: RoPE, SwiGLU, RMSNorm, causal SDPA / flash attention, no biases).

It is the shared LM of model_common with every block an attention block (layer_pattern "A"); a pattern of
"S" letters gives sliding-window attention. Its KV cache is preallocated for prefill + decoding.
"""
from dataclasses import dataclass

from model_common import LM, LMConfig


@dataclass
class TransformerConfig(LMConfig):
    layer_pattern: str = "A"

    def __post_init__(self):
        super().__post_init__()
        if "M" in self.layer_pattern:
            raise ValueError("TransformerConfig takes attention layers only: layer_pattern of 'A' and 'S'")


class Transformer(LM):
    config_class = TransformerConfig
