"""Memora (Behrouz et al. 2025, "It's All Connected", section 5.3, Eq. 21, 27 and 30-32).

The four Miras choices:
  memory         2-layer MLP per head, M(x) = x + LN(W_out gelu(W_in x)), expansion 4 (model_common.MirasLayer)
  attention bias l2: g = e (memory_core.L2Bias)
  retention      KL divergence: a mirror (softmax) step keeps every row of each matrix on c * simplex
                 (KLRetention below); the paper introduces Memora as elastic net but specifies KL / softmax
  algorithm      gradient descent; chunked with a lag token (Eq. 30-32)

The language model: token embedding -> n_layer blocks [x + mixer(RMSNorm x); x + SwiGLU(RMSNorm x)] ->
RMSNorm -> LM head tied to the embedding, where the mixer is the Memora layer ("M"), or sliding-window
attention ("S") in the hybrid (layer_pattern "MS"). Shared pieces come from model_common.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

import memory_core
from model_common import LM, Block, MirasConfig, make_mixer

KL_LOG_FLOOR = 1e-6  # the lag step takes log(max(W, floor)): the linear in-chunk steps may leave W <= 0


@dataclass
class MemoraConfig(MirasConfig):
    objective: str = "l2"
    retention: str = "kl"
    eta_gate: str = "normalized"  # the bounded, scale-aware step (memory_core.normalized_eta); the kl lag
                                  # step scales it for the simplex (c / row length)
    # sized by the step's own output change: sized by the gain along g ("gain", Yaad's) a trained Memora's
    # outer gradient turned chaotic where this one stayed bounded; the ceiling 2 from 1.0 writes about as much
    # as "gain" in one chunk and learns MQAR reliably (README, "Stability", has the runs)
    step_norm: str = "gauss_newton"
    eta_max: float = 2.0
    eta_init: float = 1.0
    # decay (alpha < 1 flattens each row toward uniform) is what lets the step's chain of softmaxes amplify in
    # the backward pass, and with the generic floor 0.1 a trained Memora's alpha drifted down until training
    # spiked; so the gate stays in [0.99, 1] (README, "Stability", has the runs)
    alpha_init: float = 0.995
    alpha_min: float = 0.99


def simplex_scale(rule_or_cfg_scale, w):
    """c: the rows of W live on c * simplex; 0 / None means the row's length (entries average 1)."""
    return rule_or_cfg_scale or w.shape[-1]


def kl_lag_step(q, k, v, eta, alpha, delta, weights, ln_w, ln_b, rule, grads=None):
    """The chunk's first token takes the exact mirror step of Eq. 27 from the chunk's starting weights,
    W = c softmax_rows(alpha log W - eta G); its result anchors the rest of the chunk, whose tokens take
    linear steps (Eq. 30-32). grads: the token's inner_grad at `weights`, if known. Returns (y of that
    token, the new weights)."""
    grads = grads if grads is not None else memory_core.inner_grad(k, v, delta, weights, ln_w, ln_b, rule)
    acts, dz = grads[:2]
    # an exponentiated-gradient step moves W by about eta (c / row length) G: the normalized step's read scale
    scale = [simplex_scale(rule["simplex_scale"], w) / w.shape[-1] for w in weights]
    eta = memory_core.step_sizes(eta.unsqueeze(-1), grads, delta, weights, ln_w, scale, None, rule).squeeze(-1)
    new = []
    for w, a, d in zip(weights, acts, dz):
        grad = d.transpose(-1, -2) @ a  # one token: the outer product dz^T a, [N, out, in]
        logits = alpha.view(-1, 1, 1) * torch.log(w.clamp_min(KL_LOG_FLOOR)) - eta.view(-1, 1, 1) * grad
        new.append(simplex_scale(rule["simplex_scale"], w) * torch.softmax(logits, dim=-1))
    return memory_core.read(q, new, ln_w, ln_b), new


class KLRetention(memory_core.Retention):
    """Eq. 21 / 27: W_t = c softmax_rows(alpha_t log W_{t-1} - eta_t G_t); c = the row length by default."""
    name = "kl"
    momentum = False  # a momentum buffer has no meaning on the simplex
    lag_step = staticmethod(kl_lag_step)

    def check_start(self, weights):
        if not all(bool((w > 0).all()) for w in weights):
            raise ValueError("retention='kl' needs strictly positive initial fast weights (rows on a scaled "
                             "simplex); to continue a sequence pass the returned MemoryState instead")

    def init_fast_weights_(self, w, cfg):
        nn.init.normal_(w, 0.0, 1.0)  # row logits: W = c softmax(logits) has entries ~ c / row length

    def initial_weights(self, w, cfg):
        return simplex_scale(cfg.simplex_scale, w) * torch.softmax(w, dim=-1)  # positive by construction


memory_core.register("retention", KLRetention())


class Memora(LM):
    config_class = MemoraConfig

    def __init__(self, config):
        super().__init__(config)  # token embedding, final RMSNorm, tied LM head
        self.blocks = nn.ModuleList(Block(config, make_mixer(config, kind)) for kind in config.layers)
        self.init_weights()
