"""Moneta (Behrouz et al. 2025, "It's All Connected", section 5.3, Eq. 24-25, 28-29): (p, q)-Moneta.

The four Miras choices:
  memory         2-layer MLP per head, M(x) = x + LN(W_out gelu(W_in x)), expansion 4 (model_common.MirasLayer)
  attention bias lp, p = 3 (LpBias below)
  retention      lq normalization, q = 4, on an accumulator A, plus the l2 decay of the alpha gate
                 (LqRetention below)
  algorithm      gradient descent, chunk-anchored (Eq. 28-29); the q-normalization lands at chunk ends

The language model: token embedding -> n_layer blocks [x + mixer(RMSNorm x); x + SwiGLU(RMSNorm x)] ->
RMSNorm -> LM head tied to the embedding, where the mixer is the Moneta layer ("M"), or sliding-window
attention ("S") in the hybrid (layer_pattern "MS"). Shared pieces come from model_common.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

import memory_core
from model_common import LM, Block, MirasConfig, make_mixer


@dataclass
class MonetaConfig(MirasConfig):
    objective: str = "lp"
    retention: str = "lq"
    p: float = 3.0        # the paper's best (Fig. 4); p = 4 was its worst
    q_norm: float = 4.0
    # Eq. 24's link is homogeneous of degree 3 - q in A: decay that shrinks the accumulator inflates W, and
    # the chain of normalizations explodes in the backward pass at long context unless the decay starts
    # near 1 (README, "Stability"); the gate still learns any alpha in [alpha_min, 1].
    alpha_init: float = 0.9999


class LpBias(memory_core.Objective):
    """l(M; k, v) = ||M(k) - v||_p^p (Eq. 11 / 25), with the smoothed sign and |.| of Remark 5:
    g = p tanh(tau e) (e^2 + eps)^((p-1)/2), e = M(k) - v, tau = sharpness."""
    name = "lp"

    def output_grad(self, e, v, delta, rule):
        p = rule["p"]
        return p * torch.tanh(rule["sharpness"] * e) * (e * e + rule["eps"]).pow((p - 1) / 2)


def lq_norm(a, q_norm, eps):
    """n(A) = max(||A||_q, eps)^(q-2) per head and matrix (entry-wise q-norm), [N, 1, 1] (Eq. 24).

    The floor is applied to sum |A|^q (at eps^q) before the root, so a zero accumulator has a finite
    gradient (the q-th root's derivative is infinite at 0)."""
    power_sum = a.abs().pow(q_norm).sum((-1, -2), keepdim=True)
    return power_sum.clamp_min(eps**q_norm).pow((q_norm - 2) / q_norm)


class LqRetention(memory_core.Retention):
    """Eq. 24: A_t = alpha_t A_{t-1} - eta_t G_t, read as W_t = A_t / ||A_t||_q^(q-2).

    Chunked: the normalizer n is frozen at the chunk start (the anchor is A / n, tokens inside the chunk read
    A_t / n) and taken exactly at the chunk end ("at the end of each chunk"); the state carries n."""
    name = "lq"
    has_norm = True

    def refresh(self, weights, rule):
        norm = [lq_norm(a, rule["q_norm"], rule["eps"]) for a in weights]
        return [a / n for a, n in zip(weights, norm)], norm

    def read_scale(self, norm):
        return [1.0 / n for n in norm]

    def init_fast_weights_(self, w, cfg):
        """The learned initial accumulator, scaled so that W = A / ||A||_q^(q-2) starts at fan-in scale
        (W is homogeneous of degree 3 - q in A)."""
        std = 1.0 / math.sqrt(w.shape[-1])
        if cfg.q_norm == 3.0:  # degree 0: the scale of A does not matter
            nn.init.normal_(w, 0.0, std)
            return
        nn.init.normal_(w, 0.0, 1.0)
        qn = w.abs().pow(cfg.q_norm).sum((-1, -2), keepdim=True).pow(1.0 / cfg.q_norm)
        w.mul_((std * qn.pow(cfg.q_norm - 2)).pow(1.0 / (3.0 - cfg.q_norm)))


memory_core.register("objective", LpBias())
memory_core.register("retention", LqRetention())


class Moneta(LM):
    config_class = MonetaConfig

    def __init__(self, config):
        super().__init__(config)  # token embedding, final RMSNorm, tied LM head
        self.blocks = nn.ModuleList(Block(config, make_mixer(config, kind)) for kind in config.layers)
        self.init_weights()
