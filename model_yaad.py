"""Yaad (Behrouz et al. 2025, "It's All Connected", section 5.3, Eq. 16 and 26): a robust memory.

The four Miras choices:
  memory         2-layer MLP per head, M(x) = x + LN(W_out gelu(W_in x)), expansion 4 (model_common.MirasLayer)
  attention bias Huber with a data-dependent threshold delta_t, produced per token and head by the layer's
                 delta gate (HuberBias below)
  retention      l2, Titans' forget gate: W_t = alpha_t W_{t-1} - eta_t G_t (memory_core.L2Retention)
  algorithm      gradient descent, chunk-anchored

The language model: token embedding -> n_layer blocks [x + mixer(RMSNorm x); x + SwiGLU(RMSNorm x)] ->
RMSNorm -> LM head tied to the embedding, where the mixer is the Yaad layer ("M"), or sliding-window
attention ("S") in the hybrid (layer_pattern "MS"). Shared pieces come from model_common.
"""
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

import memory_core
from model_common import LM, Block, Gate, MirasConfig, inv_softplus, make_mixer, scaled_softplus


@dataclass
class YaadConfig(MirasConfig):
    objective: str = "huber"
    retention: str = "l2"
    # the bounded, scale-aware step (memory_core.normalized_eta). With it plain l2 retention is stable at
    # init only with the decay starting near 1 (from 0.99 the outer gradient norm reached 88 at 4,096 tokens);
    # the softplus step had to be so small (eta_base 1e-4) that the memory wrote almost nothing and Yaad
    # could not learn MQAR at any lr (README, "Stability")
    eta_gate: str = "normalized"
    alpha_init: float = 0.9999


class HuberBias(memory_core.Objective):
    """Eq. 16 / 26: l2 for small residuals, l1 beyond delta_t. The switch is one per token and head, on the
    residual's norm (the paper calls delta channel-wise yet compares it with a norm):
    g = e if ||e|| <= delta_t else delta_t tanh(tau e) (Remark 5's smoothed sign)."""
    name = "huber"
    needs_delta = True

    def output_grad(self, e, v, delta, rule):
        small = e.norm(dim=-1, keepdim=True) <= delta
        return torch.where(small, e, delta * torch.tanh(rule["sharpness"] * e))

    def curvature(self, e, delta, rule):
        """1 on the l2 side; on the l1 side delta tau, the smoothed sign's steepest slope (at 0, where the step
        takes the residual; tau times steeper than the secant delta / |e| at |e| ~ 1). Its slope at the residual,
        delta tau sech^2(tau e_i), vanishes once every coordinate saturates: sized by it, a step of the
        saturated sign grew without bound (float32 overflow in training; README, "Stability")."""
        small = e.norm(dim=-1) <= delta.squeeze(-1)
        return torch.where(small, torch.ones_like(small, dtype=e.dtype), (delta * rule["sharpness"]).amax(-1))

    def gates(self, cfg, head_dim):
        """delta_t = softplus(.) + 1e-4 > 0, starting at delta_init (default 2 sqrt(head_dim)). A residual between
        two independent vectors of unit-scale entries has norm ~sqrt(2 head_dim): at init typical residuals take
        the l2 side, whose curvature is 1, and only outliers the l1 side, whose step the curvature bound makes
        tau delta times smaller. Starting at sqrt(head_dim) put most residuals on the l1 side, and the memory wrote
        almost nothing (README, "Stability"); training moves delta where the data wants it."""
        start = cfg.delta_init or 2 * math.sqrt(head_dim)
        return [Gate("delta", inv_softplus(start), partial(scaled_softplus, scale=1.0, shift=1e-4))]


memory_core.register("objective", HuberBias())


class Yaad(LM):
    config_class = YaadConfig

    def __init__(self, config):
        super().__init__(config)  # token embedding, final RMSNorm, tied LM head
        self.blocks = nn.ModuleList(Block(config, make_mixer(config, kind)) for kind in config.layers)
        self.init_weights()
