"""Yaad (Behrouz et al. 2025, "It's All Connected", section 5.3, Eq. 16 and 26): a robust memory.

The four Miras choices and where they live:
  memory         2-layer MLP, M(x) = x + LN(W_out gelu(W_in x)), expansion 4   (as Moneta; memory_core)
  attention bias Huber with a data-dependent threshold delta_t (a gate, softplus, per token and head):
                 g = e if ||e|| <= delta_t else delta_t tanh(tau e)              (Eq. 16 / 26, smoothed sign)
  retention      l2 (Titans' forget gate): W_t = alpha_t W_{t-1} - eta_t G_t     (Eq. 26)
  algorithm      gradient descent, chunk-anchored; the switch is taken per token and head (spec section 6:
                 the paper calls delta channel-wise yet compares it with a norm)
"""
from dataclasses import dataclass

from model_common import LM, MirasConfig


@dataclass
class YaadConfig(MirasConfig):
    objective: str = "huber"
    retention: str = "l2"
    # With plain l2 retention nothing bounds the memory: at eta_base 3e-4 training at 1,024 tokens went
    # unstable (grad norm 300-900, val 3.07) as the learned eta gate grew; 1e-4 keeps it ~0.8 (README,
    # "Stability"). (alpha_init 0.9999 also fixed training but raised the gradient norm at init to ~100.)
    eta_base: float = 1e-4


class Yaad(LM):
    config_class = YaadConfig
