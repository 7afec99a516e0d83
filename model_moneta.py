"""Moneta (Behrouz et al. 2025, "It's All Connected", section 5.3, Eq. 24-25, 28-29): (p, q)-Moneta.

The four Miras choices and where they live:
  memory         2-layer MLP, M(x) = x + LN(W_out gelu(W_in x)), expansion 4   (section 5.3 (1); memory_core)
  attention bias lp with p = 3: g = p tanh(tau e) (e^2 + eps)^((p-1)/2)        (Eq. 11 / 25, Remark 5 smoothing)
  retention      lq, q = 4, on an accumulator A plus l2 decay (the alpha gate):
                 A_t = alpha_t A_{t-1} - eta_t G_t,   W_t = A_t / ||A_t||_q^(q-2)    (Eq. 24)
  algorithm      gradient descent, chunk-anchored (Eq. 28-29); the q-normalization lands at chunk ends
The learned initial state is the accumulator A (model_common.MirasLayer scales it so that W starts at a
fan-in scale). Eq. 25 prints eta twice; it is applied once (spec section 6).
"""
from dataclasses import dataclass

from model_common import LM, MirasConfig


@dataclass
class MonetaConfig(MirasConfig):
    objective: str = "lp"
    retention: str = "lq"
    p: float = 3.0        # the paper's best (Fig. 4); p = 4 was its worst
    q_norm: float = 4.0
    # W = A / ||A||_4^2 is homogeneous of degree -1 in A: decay that shrinks the accumulator inflates W, and
    # at alpha 0.99 per token the outer gradients exploded past ~1K tokens (1e16 at 4096). Start near no
    # decay and let the gate learn it (grad norm ~2 at 8192 at init; README, "Stability").
    alpha_init: float = 0.9999


class Moneta(LM):
    config_class = MonetaConfig
