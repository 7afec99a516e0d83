"""Memora (Behrouz et al. 2025, "It's All Connected", section 5.3, Eq. 21, 27 and 30-32).

The four Miras choices and where they live:
  memory         2-layer MLP, M(x) = x + LN(W_out gelu(W_in x)), expansion 4   (as Moneta; memory_core)
  attention bias l2: g = e                                                       (Eq. 27)
  retention      KL divergence: a mirror (softmax) step, every row of each matrix on c * simplex:
                 W_t = c softmax_rows(alpha_t log W_{t-1} - eta_t G_t)           (Eq. 21 / 27; c = row length)
  algorithm      gradient descent; chunked with a lag token: the chunk's first token takes the exact step,
                 the rest take linear steps anchored at its result                (Eq. 30-32)
The learned initial fast weights are row logits: W_0 = c softmax(logits), positive by construction.
The paper introduces Memora as elastic net but specifies KL / softmax; this is KL (spec section 6).
"""
from dataclasses import dataclass

from model_common import LM, MirasConfig


@dataclass
class MemoraConfig(MirasConfig):
    objective: str = "l2"
    retention: str = "kl"


class Memora(LM):
    config_class = MemoraConfig
