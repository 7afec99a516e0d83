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
    # Eq. 24 as printed; "pnorm" (the link of the paper's derivation) wrote more in context but its outer
    # gradients exploded at long context and it trained worse (README, Deviations 3)
    lq_link: str = "printed"
    # Eq. 24's link is homogeneous of degree 3 - q in A: decay that shrinks the accumulator inflates W, and
    # the chain of normalizations explodes in the backward pass at long context (at 8,192 tokens with alpha
    # 0.998 everywhere). So the decay starts near 1 and the gate stays above alpha_min: trained with the
    # generic alpha_min 0.1, some heads' alpha fell to ~0.97 and training at 2,048 tokens hit a NaN gradient
    # at step 285 (README, "Stability")
    alpha_init: float = 0.9999
    alpha_min: float = 0.9995


class LpBias(memory_core.Objective):
    """l(M; k, v) = ||M(k) - v||_p^p (Eq. 11 / 25), with the smoothed sign and |.| of Remark 5:
    g = p tanh(tau e) (e^2 + eps)^((p-1)/2), e = M(k) - v, tau = sharpness."""
    name = "lp"

    def output_grad(self, e, v, delta, rule):
        p = rule["p"]
        return p * torch.tanh(rule["sharpness"] * e) * (e * e + rule["eps"]).pow((p - 1) / 2)

    def curvature(self, e, delta, rule):
        """max_i dg_i / de_i = p tau sech^2(tau e) s^((p-1)/2) + p (p-1) tanh(tau e) e s^((p-3)/2), s = e^2 + eps:
        about p (p - 1) max |e|^(p-2), twice the secant of p = 3, so a step sized by the secant overshoots. The
        step takes the residual toward 0, so the slope there, p tau eps^((p-1)/2), is a floor: for p = 1 (the
        smoothed sign) it is tau, where the slope at a saturated residual is ~0 (for 1 < p < 2 the slope peaks
        between the two; not bounded here)."""
        p, t = rule["p"], torch.tanh(rule["sharpness"] * e)
        s = e * e + rule["eps"]
        slope = p * rule["sharpness"] * (1 - t * t) * s.pow((p - 1) / 2) + p * (p - 1) * t * e * s.pow((p - 3) / 2)
        return slope.amax(-1).clamp_min(p * rule["sharpness"] * rule["eps"] ** ((p - 1) / 2))


def lq_norm(a, q_norm, eps):
    """n(A) = max(||A||_q, eps)^(q-2) per head and matrix (entry-wise q-norm), [N, 1, 1] (Eq. 24).

    The floor is applied to sum |A|^q (at eps^q) before the root, so a zero accumulator has a finite
    gradient (the q-th root's derivative is infinite at 0)."""
    power_sum = a.abs().pow(q_norm).sum((-1, -2), keepdim=True)
    return power_sum.clamp_min(eps**q_norm).pow((q_norm - 2) / q_norm)


def pnorm_link(x, s, eps):
    """f_s(x) = sign(x) |x|^(s-1) / ||x||_s^(s-2) per head and matrix: the gradient of 1/2 ||x||_s^2, the
    link of the p-norm algorithms (Shalev-Shwartz 2012, 2.6). Homogeneous of degree 1, and f_r, f_q are each
    other's inverse when 1/r + 1/q = 1. |x| is floored at the dtype's tiny, so an entry at exactly 0 maps to 0
    with a zero (not NaN) gradient; for s < 2 the derivative (s - 1) |x|^(s-2) is unbounded near 0."""
    mag = x.abs().clamp_min(torch.finfo(x.dtype).tiny)
    norm = x.abs().pow(s).sum((-1, -2), keepdim=True).clamp_min(eps**s).pow(1.0 / s)
    return torch.sign(x) * mag.pow(s - 1) * norm.pow(2 - s)


def conjugate(q_norm):
    return q_norm / (q_norm - 1.0)


def _frobenius(x):
    return x.pow(2).sum((-1, -2), keepdim=True).sqrt().clamp_min(torch.finfo(x.dtype).tiny)


class LqRetention(memory_core.Retention):
    """Eq. 24: A_t = alpha_t A_{t-1} - eta_t G_t, read through a link W_t = f(A_t) ("at the end of each chunk").

    link "printed": W = A / n(A), n = ||A||_q^(q-2), Eq. 24 as printed (homogeneous of degree 3 - q in A).
    link "pnorm": W = f_r(A), r = q / (q - 1), the p-norm link the paper's derivation gives (section 5.2,
    Variant 4; homogeneous of degree 1). Its inverse is f_q, so A = f_q(W).

    Chunked: the link is applied at chunk ends; inside a chunk tokens read the linearization along a scalar
    slope 1 / n frozen at the chunk start, W_t = W_c + (A_t - A_c) / n, where W_c = f(A_c) is the anchor. For
    the printed link n is its own normalizer (W_t = A_t / n, no offset). For the p-norm link the entry-wise
    derivative is unbounded near 0 and would break the dual form's b x b matmuls, so the slope is the radial
    one, 1 / n = ||W_c||_F / ||A_c||_F (exact along A_c: f(c A) = c f(A)), and the offset O = W_c - A_c / n is
    computed from the anchor through the inverse link (the state carries A_t, W_c and n)."""
    name = "lq"
    has_norm = True
    links = ("printed", "pnorm")

    def refresh(self, weights, rule):
        if rule["link"] == "pnorm":
            anchor = [pnorm_link(a, conjugate(rule["q_norm"]), rule["eps"]) for a in weights]
            return anchor, [_frobenius(a) / _frobenius(w) for a, w in zip(weights, anchor)]
        norm = [lq_norm(a, rule["q_norm"], rule["eps"]) for a in weights]
        return [a / n for a, n in zip(weights, norm)], norm

    def read_scale(self, norm):
        return [1.0 / n for n in norm]

    def read_offset(self, anchor, norm, rule):
        if rule["link"] != "pnorm":
            return None
        return [w - pnorm_link(w, rule["q_norm"], rule["eps"]) / n for w, n in zip(anchor, norm)]

    def init_fast_weights_(self, w, cfg):
        """The learned initial state. pnorm: the initial weights W_0 at fan-in scale (initial_weights gives the
        accumulator A_0 = f_q(W_0), whose entries are ~100x smaller than W's: too small to learn with AdamW).
        printed: the accumulator itself, scaled so that W = A / ||A||_q^(q-2) starts at fan-in scale."""
        std = 1.0 / math.sqrt(w.shape[-1])
        if cfg.lq_link == "pnorm" or cfg.q_norm == 3.0:  # printed with q = 3: degree 0, A's scale does not matter
            nn.init.normal_(w, 0.0, std)
            return
        nn.init.normal_(w, 0.0, 1.0)
        qn = w.abs().pow(cfg.q_norm).sum((-1, -2), keepdim=True).pow(1.0 / cfg.q_norm)
        w.mul_((std * qn.pow(cfg.q_norm - 2)).pow(1.0 / (3.0 - cfg.q_norm)))

    def initial_weights(self, w, cfg):
        return pnorm_link(w, cfg.q_norm, cfg.eps) if cfg.lq_link == "pnorm" else w


memory_core.register("objective", LpBias())
memory_core.register("retention", LqRetention())


class Moneta(LM):
    config_class = MonetaConfig

    def __init__(self, config):
        super().__init__(config)  # token embedding, final RMSNorm, tied LM head
        self.blocks = nn.ModuleList(Block(config, make_mixer(config, kind)) for kind in config.layers)
        self.init_weights()
