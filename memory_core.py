"""The Miras memory engine: a deep associative memory that learns at test time.

Behrouz et al., "It's All Connected" (arXiv 2504.13173); the contract is ../shared/docs/miras-spec.md.

Per head, the memory is M_W(x) = x + LN(W_out gelu(W_in x)) (memory="mlp", E*d hidden units) or
M_W(x) = x + LN(W x) (memory="linear", the paper's linear-memory ablation). At every token it takes one
gradient step on the attentional bias l(M; k_t, v_t) held back by a retention gate:

    e_t = M_W(k_t) - v_t,  g_t = dl/dM(k_t):  l2: e | dot: -v | lp: p tanh(tau e)(e^2+eps)^((p-1)/2)
                                              huber: e if ||e|| <= delta_t else delta_t tanh(tau e)
    G_t = g_t back-propagated through LN, W_out, gelu and W_in (derived by hand below)
    retention l2 : W_t = alpha_t W_{t-1} - eta_t G_t                                (Eq. 9 / Titans)
              lq : A_t = alpha_t A_{t-1} - eta_t G_t,  W_t = A_t / ||A_t||_q^(q-2)  (Eq. 24, Moneta)
              kl : W_t = c softmax_rows(alpha_t log W_{t-1} - eta_t G_t)            (Eq. 27, Memora)
    momentum (optional, Titans-LMM): S_t = mu_t S_{t-1} - eta_t G_t,  W_t = alpha_t W_{t-1} + S_t
              (on the accumulator A for lq; momentum buffers are carried in the state; not with kl)

Chunked training (spec section 3): inside a chunk of b tokens every G_t is taken at one anchor, so the
in-chunk recurrence is linear and unrolls to matmuls (the TTT dual form). With
D[t, i] = prod_{j=i+1..t} alpha_j (and M[t, i] likewise for mu), Gamma = D (no momentum) or D @ M:

    W_t = beta_t W_start + c_t S_start - sum_{i<=t} Gamma[t, i] eta_i G_i(anchor)

applied layer by layer: layer l's read of the query path is
    z_l = beta (h_{l-1} W_l^T) + c (h_{l-1} S_l^T) - ((h_{l-1} a_{l-1}^T) * Gamma * eta) dz_l
where a_{l-1} and dz_l are the anchor's input activations and back-propagated signals on the keys, so no
per-token weights are ever materialized. lq reads W = A / n with n frozen at the chunk start and
normalizes exactly at the chunk end; kl takes an exact step on the chunk's first ("lag") token and uses its
result as the anchor of the chunk.

Carried state (MemoryState): the fast weights (accumulator for lq), the anchor of the chunk in progress,
lq's frozen normalizers, momentum buffers and the position inside the chunk, so prefill of any length plus
token-by-token decoding (miras_memory_step) equals one call over the whole sequence.

Deviations from the paper: see README ("Deviations"). In short: per-head scalar gates; Eq. 25's double eta
applied once; lq norm taken as max(||A||_q, eps)^(q-2) so a zero accumulator is defined.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

OBJECTIVES = ("l2", "dot", "lp", "huber")
RETENTIONS = ("l2", "lq", "kl")
MEMORIES = ("mlp", "linear")
LN_EPS = 1e-5
KL_LOG_FLOOR = 1e-6  # the kl step takes log(max(W, floor)): the linear in-chunk steps may leave W <= 0


class MemoryState(NamedTuple):
    weights: tuple    # fast weights per layer, [B, H, out, in]; the accumulator A for lq
    anchor: tuple     # gradient anchor of the chunk in progress (ignored when pos == 0)
    norm: tuple       # lq: normalizer n per layer, [B, H], frozen for the chunk; () otherwise
    momentum: tuple   # momentum buffers S, same shapes as weights; () without momentum
    pos: object       # tokens of the chunk in progress already consumed: int, or a 0-dim tensor

    @staticmethod
    def start(weights, momentum: bool = False, retention: str = "l2") -> "MemoryState":
        """A state at a chunk boundary (what a plain tuple of weights means)."""
        weights = tuple(weights)
        norm = tuple(w.new_ones(w.shape[:2]) for w in weights) if retention == "lq" else ()
        mom = tuple(torch.zeros_like(w) for w in weights) if momentum else ()
        return MemoryState(weights, weights, norm, mom, 0)


# ----------------------------------------------------------------------------------------------
# The memory MLP, its LayerNorm and the hand-derived inner gradient

def _layer_norm(z, w, b):
    zc = z - z.mean(-1, keepdim=True)
    rstd = torch.rsqrt(zc.pow(2).mean(-1, keepdim=True) + LN_EPS)
    zhat = zc * rstd
    return zhat * w + b, zhat, rstd


def _layer_norm_backward(g, zhat, rstd, w):
    gx = g * w
    return rstd * (gx - gx.mean(-1, keepdim=True) - zhat * (gx * zhat).mean(-1, keepdim=True))


def _gelu_grad(z):
    cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + z * pdf


def _output_grad(e, v, delta, objective, p, tau, eps):
    """g = dl/dM(k) for each attentional bias (spec section 2; lp and huber smoothed, paper Remark 5)."""
    if objective == "l2":
        return e
    if objective == "dot":
        return -v
    if objective == "lp":
        return p * torch.tanh(tau * e) * (e * e + eps).pow((p - 1) / 2)
    small = e.norm(dim=-1, keepdim=True) <= delta
    return torch.where(small, e, delta * torch.tanh(tau * e))


def _inner_grad(k, v, delta, weights, ln_w, ln_b, rule):
    """Forward the keys through the memory at `weights` and back-propagate g by hand.

    Returns, per layer l, the layer's input activations a_l [N, n, in] and output signal dz_l [N, n, out],
    so that G_l = sum over tokens of dz_l^T a_l (times the token's step size)."""
    acts, pre = [k], []
    for i, w in enumerate(weights):
        z = acts[-1] @ w.transpose(-1, -2)
        pre.append(z)
        if i < len(weights) - 1:
            acts.append(F.gelu(z))
    out, zhat, rstd = _layer_norm(pre[-1], ln_w, ln_b)
    g = _output_grad(k + out - v, v, delta, rule["objective"], rule["p"], rule["sharpness"], rule["eps"])
    dz = [_layer_norm_backward(g, zhat, rstd, ln_w)]
    for i in range(len(weights) - 1, 0, -1):
        dz.insert(0, (dz[0] @ weights[i]) * _gelu_grad(pre[i - 1]))
    return acts, dz


def _read(x, weights, ln_w, ln_b):
    """y = M_W(x) for explicit weights (used where a chunk's weights are explicit: the kl lag token)."""
    h = x
    for i, w in enumerate(weights):
        h = h @ w.transpose(-1, -2)
        if i < len(weights) - 1:
            h = F.gelu(h)
    return x + _layer_norm(h, ln_w, ln_b)[0]


def _lq_norm(a, q_norm, eps):
    """n = max(||A||_q, eps)^(q-2) per head and matrix, [N, 1, 1] (Eq. 24).

    The floor is applied to sum |A|^q (at eps^q) before the root, so a zero accumulator has a finite
    gradient (the q-th root's derivative is infinite at 0)."""
    power_sum = a.abs().pow(q_norm).sum((-1, -2), keepdim=True)
    return power_sum.clamp_min(eps**q_norm).pow((q_norm - 2) / q_norm)


def _masked_decay(log_cum):
    """exp(L_t - L_i) for i <= t, else 0: [N, n, n] from cumulative logs [N, n]."""
    n = log_cum.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=log_cum.device).tril()
    diff = log_cum.unsqueeze(-1) - log_cum.unsqueeze(-2)
    return torch.exp(torch.where(causal, diff, torch.full_like(diff, -math.inf)))


# ----------------------------------------------------------------------------------------------
# One segment of a chunk: linear recurrence against a fixed anchor, computed with matmuls

def _segment(q, k, v, eta, log_alpha, log_mu, delta, start, anchor, inv_norm, mom, ln_w, ln_b, rule):
    """Tokens of one chunk (or of the part of it still to come) against a fixed gradient anchor.

    start: weights (accumulator for lq) before the segment; anchor: weights the gradients are taken at;
    inv_norm: per-layer read scale 1/n (lq) or None; mom: momentum buffers or None.
    Returns y [N, n, d], the weights after the segment and the momentum buffers after it."""
    acts, dz = _inner_grad(k, v, delta, anchor, ln_w, ln_b, rule)
    cum_alpha = torch.cumsum(log_alpha, -1)
    gamma = _masked_decay(cum_alpha)  # D[t, i] = beta_t / beta_i
    if mom is not None:
        cum_mu = torch.cumsum(log_mu, -1)
        decay_mu = _masked_decay(cum_mu)
        carry = gamma @ torch.exp(cum_mu).unsqueeze(-1)  # c_t = sum_{j<=t} (beta_t/beta_j) m_j: [N, n, 1]
        gamma = gamma @ decay_mu  # Gamma[t, i] = sum_j D[t, j] M[j, i]
    step = gamma * eta.unsqueeze(-2)  # Gamma[t, i] eta_i
    beta = torch.exp(cum_alpha).unsqueeze(-1)  # [N, n, 1]

    h = q
    n_layers = len(start)
    for i in range(n_layers):
        z = beta * (h @ start[i].transpose(-1, -2)) - ((h @ acts[i].transpose(-1, -2)) * step) @ dz[i]
        if mom is not None:
            z = z + carry * (h @ mom[i].transpose(-1, -2))
        if inv_norm is not None:
            z = z * inv_norm[i]
        h = F.gelu(z) if i < n_layers - 1 else z
    y = q + _layer_norm(h, ln_w, ln_b)[0]

    last = step[:, -1, :].unsqueeze(-1)  # Gamma[end, i] eta_i: [N, n, 1]
    beta_end = beta[:, -1:, :]
    new = [beta_end * start[i] - (dz[i] * last).transpose(-1, -2) @ acts[i] for i in range(n_layers)]
    new_mom = None
    if mom is not None:
        new = [new[i] + carry[:, -1:, :] * mom[i] for i in range(n_layers)]
        mu_last = (torch.exp(cum_mu[:, -1:] - cum_mu) * eta).unsqueeze(-1)  # (m_end / m_i) eta_i
        m_end = torch.exp(cum_mu[:, -1:]).unsqueeze(-1)
        new_mom = [m_end * mom[i] - (dz[i] * mu_last).transpose(-1, -2) @ acts[i] for i in range(n_layers)]
    return y, new, new_mom


def _kl_lag_step(q, k, v, eta, alpha, delta, weights, ln_w, ln_b, rule):
    """The chunk's first token for kl retention: the exact mirror step of Eq. 27, then the read."""
    acts, dz = _inner_grad(k, v, delta, weights, ln_w, ln_b, rule)
    new = []
    for w, a, d in zip(weights, acts, dz):
        grad = d.transpose(-1, -2) @ a  # one token: the outer product dz^T a, [N, out, in]
        scale = rule["simplex_scale"] if rule["simplex_scale"] is not None else w.shape[-1]
        logits = alpha.view(-1, 1, 1) * torch.log(w.clamp_min(KL_LOG_FLOOR)) - eta.view(-1, 1, 1) * grad
        new.append(scale * torch.softmax(logits, dim=-1))
    return _read(q, new, ln_w, ln_b), new


# ----------------------------------------------------------------------------------------------
# Input checks (one line each, saying what to do)

def _check(q, k, v, eta, alpha, state, ln_weight, ln_bias, rule, delta, momentum, check_values):
    if rule["objective"] not in OBJECTIVES:
        raise ValueError(f"unknown objective {rule['objective']!r}: use one of {OBJECTIVES}")
    if rule["retention"] not in RETENTIONS:
        raise ValueError(f"unknown retention {rule['retention']!r}: use one of {RETENTIONS}")
    if rule["memory"] not in MEMORIES:
        raise ValueError(f"unknown memory {rule['memory']!r}: use one of {MEMORIES}")
    if rule["chunk_size"] < 1:
        raise ValueError(f"chunk_size must be >= 1, got {rule['chunk_size']}")
    if rule["objective"] == "huber" and delta is None:
        raise ValueError("objective='huber' needs delta (a [B, H, T] tensor of positive thresholds)")
    if momentum is not None and rule["retention"] == "kl":
        raise ValueError("momentum works with retention 'l2' or 'lq', not 'kl'; pass momentum=None")
    if q.dim() != 4 or q.shape != k.shape or q.shape[:-1] != v.shape[:-1] or q.shape[-1] != v.shape[-1]:
        raise ValueError(f"q, k, v must share one shape [B, H, T, d]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    for name, t in (("eta", eta), ("alpha", alpha), ("delta", delta), ("momentum", momentum)):
        if t is not None and t.shape != q.shape[:-1]:
            raise ValueError(f"{name} must have shape {tuple(q.shape[:-1])} (one gate per token and head), "
                             f"got {tuple(t.shape)}")
    B, H, d = q.shape[0], q.shape[1], q.shape[-1]
    if ln_weight.shape != (H, d) or ln_bias.shape != (H, d):
        raise ValueError(f"ln_weight and ln_bias must be [H, d] = [{H}, {d}], "
                         f"got {tuple(ln_weight.shape)} and {tuple(ln_bias.shape)}")
    weights = state.weights if isinstance(state, MemoryState) else tuple(state)
    n_layers = 2 if rule["memory"] == "mlp" else 1
    if len(weights) != n_layers:
        raise ValueError(f"memory={rule['memory']!r} needs {n_layers} fast-weight tensor(s) in the state, "
                         f"got {len(weights)}")
    if rule["memory"] == "mlp":
        w_in, w_out = weights
        hidden = w_in.shape[-2]
        if w_in.shape != (B, H, hidden, d) or w_out.shape != (B, H, d, hidden):
            raise ValueError(f"state must be (w_in [B, H, E*d, d], w_out [B, H, d, E*d]) with B={B}, H={H}, "
                             f"d={d}; got {tuple(w_in.shape)} and {tuple(w_out.shape)}")
    elif weights[0].shape != (B, H, d, d):
        raise ValueError(f"linear memory state must be (w [B, H, d, d],) = ({B}, {H}, {d}, {d}), "
                         f"got {tuple(weights[0].shape)}")
    if isinstance(state, MemoryState) and momentum is None and len(state.momentum) > 0:
        raise ValueError("the MemoryState carries momentum buffers: pass the momentum gate (mu) too")
    if isinstance(state, MemoryState) and momentum is not None and len(state.momentum) != n_layers:
        raise ValueError("momentum given but the MemoryState has no momentum buffers: "
                         "build it with MemoryState.start(weights, momentum=True)")
    if check_values and not torch.compiler.is_compiling():
        if not bool((eta > 0).all()):
            raise ValueError("eta (inner learning rate) must be > 0 everywhere; produce it with softplus")
        if not bool(((alpha > 0) & (alpha <= 1)).all()):
            raise ValueError("alpha (retention) must lie in (0, 1]; produce it with a sigmoid")
        if delta is not None and not bool((delta > 0).all()):
            raise ValueError("delta (huber threshold) must be > 0 everywhere")
        if momentum is not None and not bool(((momentum > 0) & (momentum < 1)).all()):
            raise ValueError("momentum (mu) must lie in (0, 1)")
        # A fresh kl memory starts on the scaled simplex; a carried MemoryState may hold entries <= 0 left by
        # the linear in-chunk steps (the next lag step floors its log), so only plain-tuple starts are checked.
        if rule["retention"] == "kl" and not isinstance(state, MemoryState) and not all(
                bool((w > 0).all()) for w in weights):
            raise ValueError("retention='kl' needs strictly positive initial fast weights (rows on a scaled "
                             "simplex); to continue a sequence pass the returned MemoryState instead")


def _rule(objective, retention, chunk_size, p, q_norm, sharpness, eps, simplex_scale, memory):
    return dict(objective=objective, retention=retention, chunk_size=int(chunk_size), p=float(p),
                q_norm=float(q_norm), sharpness=float(sharpness), eps=float(eps), simplex_scale=simplex_scale,
                memory=memory)


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _flat_inputs(q, k, v, eta, alpha, delta, momentum, state, ln_weight, ln_bias):
    """[B, H, ...] -> [B*H, ...] in the compute dtype (float64 for float64 input, else float32); gates in
    log space where the chunk math wants them. Called with autocast disabled."""
    B, H, d, dt = q.shape[0], q.shape[1], q.shape[-1], _compute_dtype(q)
    N = B * H

    def flat(x):
        return None if x is None else x.reshape(N, *x.shape[2:]).to(dt)

    def per_head(x):  # [H, d] -> [N, 1, d]
        return x.to(dt).unsqueeze(0).expand(B, H, d).reshape(N, 1, d)

    mom = [flat(s) for s in state.momentum] if momentum is not None else None
    return (flat(q), flat(k), flat(v), flat(eta), torch.log(flat(alpha)),
            torch.log(flat(momentum)) if momentum is not None else None,
            flat(delta).unsqueeze(-1) if delta is not None else None,
            per_head(ln_weight), per_head(ln_bias), [flat(w) for w in state.weights],
            [flat(w) for w in state.anchor], [flat(n).view(N, 1, 1) for n in state.norm], mom)


_COMPILED = {}


def _compiled(fn):
    """One torch.compile wrapper per chunk function. Shapes are static, so there is one graph per piece
    length, batch, dtype and rule; dynamo's default of 8 graphs per function is too few for that (and a
    hard error under fullgraph), so the calls raise it to 64 while they run."""
    if fn not in _COMPILED:
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)

        def call(*args):
            with torch._dynamo.config.patch(recompile_limit=64):
                return compiled(*args)
        _COMPILED[fn] = call
    return _COMPILED[fn]


def _unflat(B, H, xs):
    return tuple(x.view(B, H, *x.shape[1:]) for x in xs)


# ----------------------------------------------------------------------------------------------
# The public ops

def miras_memory(q, k, v, eta, alpha, state, ln_weight, ln_bias, *, objective="l2", retention="l2",
                 chunk_size=64, delta=None, p=3.0, q_norm=4.0, sharpness=10.0, eps=1e-6, simplex_scale=None,
                 memory="mlp", momentum=None, check_values=True, compile_chunks=False):
    """Chunked parallel memory over a whole sequence (spec sections 2, 3, 7).

    q, k, v [B, H, T, d] (q, k l2-normalized); eta, alpha (, delta, momentum) [B, H, T].
    state: a plain tuple of fast weights (a chunk boundary; a plain tuple of final weights is returned) or
    a MemoryState (returned as one: exact continuation of a sequence cut anywhere).
    Returns y [B, H, T, d] in q's dtype; the fast-weight arithmetic runs in float32 (float64 for float64).

    compile_chunks=True runs each chunk through a torch.compile'd (fullgraph, static-shape) chunk function
    while the loop over chunks stays in Python: compile time does not grow with T (tracing the whole call
    unrolls the loop), and the fused chunk is ~1.8x faster than eager on CPU. Ignored inside a region that
    torch.compile is already tracing."""
    rule = _rule(objective, retention, chunk_size, p, q_norm, sharpness, eps, simplex_scale, memory)
    _check(q, k, v, eta, alpha, state, ln_weight, ln_bias, rule, delta, momentum, check_values)
    carried = isinstance(state, MemoryState)
    if not carried:
        state = MemoryState.start(state, momentum is not None, retention)
    B, H, T, d = q.shape
    segment, lag_step = _segment, _kl_lag_step
    if compile_chunks and not torch.compiler.is_compiling():
        segment, lag_step = _compiled(_segment), _compiled(_kl_lag_step)
    with torch.autocast(q.device.type, enabled=False):
        (qf, kf, vf, eta_f, log_alpha, log_mu, delta_f, ln_w, ln_b, weights, anchor, norm,
         mom) = _flat_inputs(q, k, v, eta, alpha, delta, momentum, state, ln_weight, ln_bias)
        pos = int(state.pos)

        # Plan the pieces first and split every per-token tensor once: slicing inside the loop would make
        # autograd scatter each piece's gradient into a full-length zero tensor (quadratic in T).
        b, plan, t = rule["chunk_size"], [], 0
        while t < T:
            if pos == 0 and retention == "kl":
                plan.append(("lag", 1))  # the chunk's first token takes the exact step
                t, pos = t + 1, 1 % b
                continue
            n = min(T - t, b - pos)
            plan.append(("refresh" if pos == 0 else "continue", n))
            t, pos = t + n, (pos + n) % b
        sizes = [n for _, n in plan]
        pieces = zip(*(x.split(sizes, dim=1) if x is not None else [None] * len(plan)
                       for x in (qf, kf, vf, eta_f, log_alpha, log_mu, delta_f)))
        ys = []
        for (kind, n), (q_c, k_c, v_c, eta_c, la_c, lm_c, delta_c) in zip(plan, pieces):
            if kind == "lag":  # kl: its result anchors the rest of the chunk
                y, weights = lag_step(q_c, k_c, v_c, eta_c[:, 0], la_c[:, 0].exp(), delta_c, weights, ln_w, ln_b,
                                      rule)
                anchor = weights
                ys.append(y)
                continue
            if kind == "refresh":  # a new chunk: gradients are taken at its start (spec section 3)
                if retention == "lq":
                    norm = [_lq_norm(w, rule["q_norm"], rule["eps"]) for w in weights]
                    anchor = [w / n for w, n in zip(weights, norm)]
                else:
                    anchor = weights
            y, weights, mom = segment(q_c, k_c, v_c, eta_c, la_c, lm_c, delta_c, weights, anchor,
                                      [1.0 / x for x in norm] if retention == "lq" else None, mom, ln_w, ln_b, rule)
            ys.append(y)
        y = (torch.cat(ys, dim=1) if ys else qf).view(B, H, T, d).to(q.dtype)  # T == 0: an empty prefill

    if not carried:
        return y, _unflat(B, H, weights)
    norm_out = tuple(n.view(B, H) for n in norm)
    mom_out = _unflat(B, H, mom) if mom is not None else ()
    return y, MemoryState(_unflat(B, H, weights), _unflat(B, H, anchor), norm_out, mom_out, pos)


def miras_memory_step(q, k, v, eta, alpha, state, ln_weight, ln_bias, *, objective="l2", retention="l2",
                      chunk_size=64, delta=None, p=3.0, q_norm=4.0, sharpness=10.0, eps=1e-6, simplex_scale=None,
                      memory="mlp", momentum=None, check_values=False, compile_chunks=False):
    """One token of decoding with static shapes: q, k, v [B, H, d]; gates [B, H]; state a MemoryState.

    Chunk boundaries are selected with torch.where on the position tensor, so one compiled graph serves
    every position. Calling it token by token after a miras_memory prefill reproduces one miras_memory
    call over the whole sequence (spec section 3, last paragraph). compile_chunks is accepted so that one
    set of keyword arguments serves both ops; compile the step itself with torch.compile."""
    if not isinstance(state, MemoryState):
        raise ValueError("miras_memory_step needs a MemoryState; build one with MemoryState.start(weights)")
    add_t = (lambda x: None if x is None else x.unsqueeze(2))
    y, new = _step_core(add_t(q), add_t(k), add_t(v), add_t(eta), add_t(alpha), state, ln_weight, ln_bias,
                        _rule(objective, retention, chunk_size, p, q_norm, sharpness, eps, simplex_scale, memory),
                        add_t(delta), add_t(momentum), check_values)
    return y.squeeze(2), new


def _step_core(q, k, v, eta, alpha, state, ln_weight, ln_bias, rule, delta, momentum, check_values):
    _check(q, k, v, eta, alpha, state, ln_weight, ln_bias, rule, delta, momentum, check_values)
    B, H, _, d = q.shape
    retention = rule["retention"]
    with torch.autocast(q.device.type, enabled=False):
        (qf, kf, vf, eta_f, log_alpha, log_mu, delta_f, ln_w, ln_b, weights, anchor, norm,
         mom) = _flat_inputs(q, k, v, eta, alpha, delta, momentum, state, ln_weight, ln_bias)
        pos = torch.as_tensor(state.pos, device=q.device)
        fresh = pos == 0  # first token of a chunk: the anchor is refreshed from the weights
        inv_norm = None
        if retention == "l2":
            anchor = [torch.where(fresh, w, a) for w, a in zip(weights, anchor)]
        elif retention == "lq":
            norm = [torch.where(fresh, _lq_norm(w, rule["q_norm"], rule["eps"]), n) for w, n in zip(weights, norm)]
            anchor = [torch.where(fresh, w / n, a) for w, n, a in zip(weights, norm, anchor)]
            inv_norm = [1.0 / n for n in norm]
        y, new, mom = _segment(qf, kf, vf, eta_f, log_alpha, log_mu, delta_f, weights, anchor, inv_norm, mom,
                               ln_w, ln_b, rule)
        if retention == "kl":
            y_lag, lag = _kl_lag_step(qf, kf, vf, eta_f[:, 0], log_alpha[:, 0].exp(), delta_f, weights, ln_w, ln_b,
                                      rule)
            y = torch.where(fresh, y_lag, y)
            new = [torch.where(fresh, w_lag, w) for w_lag, w in zip(lag, new)]
            anchor = [torch.where(fresh, w_lag, a) for w_lag, a in zip(lag, anchor)]
        y = y.view(B, H, 1, d).to(q.dtype)

    new_state = MemoryState(_unflat(B, H, new), _unflat(B, H, anchor), tuple(n.view(B, H) for n in norm),
                            _unflat(B, H, mom) if mom is not None else (), (pos + 1) % rule["chunk_size"])
    return y, new_state


# ================================================================================================
# The oracles: slow, token by token, inner gradients by torch.autograd. The tests hold the fast path
# above to these (float64). miras_memory_reference has the chunked semantics (spec section 3);
# miras_memory_exact is the per-token recurrence of section 2 (every gradient at the previous state).
# ================================================================================================

# ----------------------------------------------------------------------------------------------------
# memory forward and inner gradient
# ----------------------------------------------------------------------------------------------------

def _ref_layer_norm(z, gamma, beta):
    """LayerNorm over the last dim. z: [B, H, d]; gamma, beta: [H, d] (per head)."""
    mu = z.mean(dim=-1, keepdim=True)
    var = (z - mu).pow(2).mean(dim=-1, keepdim=True)          # biased variance, as nn.LayerNorm
    return (z - mu) / torch.sqrt(var + LN_EPS) * gamma + beta


def _ref_memory_forward(weights, x, ln_weight, ln_bias, memory):
    """M_W(x) for every batch element and head. weights: per-head matrices [B, H, ., .]; x: [B, H, d]."""
    if memory == "mlp":
        w_in, w_out = weights
        hidden = torch.einsum("bhed,bhd->bhe", w_in, x)        # W_in x          [B, H, E*d]
        act = F.gelu(hidden)                                   # exact erf gelu
        z = torch.einsum("bhde,bhe->bhd", w_out, act)          # W_out gelu(.)   [B, H, d]
    else:
        (w,) = weights
        z = torch.einsum("bhij,bhj->bhi", w, x)                # W x             [B, H, d]
    return x + _ref_layer_norm(z, ln_weight, ln_bias)


def _ref_output_grad(out, v_t, objective, delta_t, p, sharpness, eps):
    """Spec g_t = dl/dM(k_t) for the objectives defined through an injected output gradient."""
    e = out - v_t
    if objective == "lp":
        return p * torch.tanh(sharpness * e) * (e * e + eps).pow((p - 1.0) / 2.0)
    if objective == "huber":
        # one switch per token and head: ||e||_2 <= delta_t -> l2 branch, else smoothed l1 branch
        small = torch.linalg.vector_norm(e, dim=-1, keepdim=True) <= delta_t[..., None]
        return torch.where(small, e, delta_t[..., None] * torch.tanh(sharpness * e))
    raise AssertionError(objective)


def _ref_inner_grad(weights, k_t, v_t, ln_weight, ln_bias, *, objective, memory, delta_t, p,
                    sharpness, eps):
    """G_t = grad_W l(M_W; k_t, v_t) at ``weights`` (a tuple of [B, H, ., .] tensors), per head.

    The loss is summed over batch and heads; heads and batch elements have disjoint weights, so the
    gradient w.r.t. each head's matrices is that head's own gradient. create_graph follows the caller's
    grad mode so that the result stays differentiable w.r.t. every input (weights, k, v, gates, LN).
    """
    outer_grad = torch.is_grad_enabled()
    with torch.enable_grad():
        ws = tuple(w if w.requires_grad else w.detach().requires_grad_(True) for w in weights)
        out = _ref_memory_forward(ws, k_t, ln_weight, ln_bias, memory)
        if objective == "l2":
            loss = 0.5 * (out - v_t).pow(2).sum()               # g = e
            grads = torch.autograd.grad(loss, ws, create_graph=outer_grad)
        elif objective == "dot":
            loss = -(out * v_t).sum()                            # g = -v
            grads = torch.autograd.grad(loss, ws, create_graph=outer_grad)
        else:
            # G = J^T g with g evaluated at the same weights: a vector-Jacobian product with
            # grad_outputs=g. g itself depends on W, k, v (and delta); with create_graph those
            # dependencies stay in the outer graph, but g is NOT differentiated inside G (it is the
            # spec's output-space gradient, not the derivative of <M(k), g(M(k))>).
            g = _ref_output_grad(out, v_t, objective, delta_t, p, sharpness, eps)
            grads = torch.autograd.grad(out, ws, grad_outputs=g, create_graph=outer_grad)
    return tuple(grads)


# ----------------------------------------------------------------------------------------------------
# retention helpers
# ----------------------------------------------------------------------------------------------------

def _ref_lq_factor(a, q_norm, eps):
    """n(A) = max(||A||_q, eps)^(q-2): entry-wise q-norm per head, per matrix. -> [B, H, 1, 1].

    Written as max(sum |A|^q, eps^q)^((q-2)/q), the same value, so that a zero accumulator has a finite
    gradient (clamping after the q-th root would give 0 * inf = NaN at A = 0)."""
    power_sum = a.abs().pow(q_norm).sum(dim=(-2, -1), keepdim=True)
    return power_sum.clamp(min=eps ** q_norm).pow((q_norm - 2.0) / q_norm)


def _ref_simplex_scales(weights, simplex_scale):
    """kl scale c per matrix: the row length by default (W_in rows: d, W_out rows: E*d)."""
    if simplex_scale is None:
        return tuple(float(w.shape[-1]) for w in weights)
    return tuple(simplex_scale for _ in weights)


def _ref_linear_step(weights, mom, grads, a_t, e_t, momentum, t):
    """l2 / lq step on the weights (accumulator): W = a W - e G, or with momentum S = mu S - e G, W = a W + S."""
    if mom is None:
        return tuple(a_t * w - e_t * g for w, g in zip(weights, grads)), None
    m_t = _ref_gate(momentum, t)
    mom = tuple(m_t * s - e_t * g for s, g in zip(mom, grads))
    return tuple(a_t * w + s for w, s in zip(weights, mom)), mom


def _ref_gate(x, t):
    """[B, H, T] gate -> [B, H, 1, 1] value at token t (broadcasts over a weight matrix)."""
    return x[:, :, t, None, None]


# ----------------------------------------------------------------------------------------------------
# chunked semantics (spec section 3)
# ----------------------------------------------------------------------------------------------------

def miras_memory_reference(q, k, v, eta, alpha, state, ln_weight, ln_bias, *, objective="l2",
                           retention="l2", chunk_size=64, delta=None, p=3.0, q_norm=4.0,
                           sharpness=10.0, eps=1e-6, simplex_scale=None, memory="mlp",
                           momentum=None):
    """Token-by-token oracle of the chunked Miras memory (spec section 3). Returns (y, state).

    y: [B, H, T, d]; state: the weights after the last token (the accumulator A for lq), same
    structure as the input state.
    """
    state = tuple(state)
    _check(q, k, v, eta, alpha, state, ln_weight, ln_bias,
           _rule(objective, retention, chunk_size, p, q_norm, sharpness, eps, simplex_scale, memory), delta, momentum,
           True)
    B, H, T, d = q.shape
    grad_kw = dict(objective=objective, memory=memory, p=p, sharpness=sharpness, eps=eps)
    scales = _ref_simplex_scales(state, simplex_scale)

    weights = state                                   # W (l2, kl) or the accumulator A (lq)
    mom = tuple(torch.zeros_like(w) for w in state) if momentum is not None else None
    ys = []
    for t0 in range(0, T, chunk_size):                # chunk = tokens t0 .. t1-1 (0-based)
        t1 = min(t0 + chunk_size, T)
        if retention == "lq":
            norms = tuple(_ref_lq_factor(a, q_norm, eps) for a in weights)   # frozen for the chunk
            anchor = tuple(a / n for a, n in zip(weights, norms))
        else:
            anchor = weights                          # l2: W at chunk start (kl: replaced below)

        for t in range(t0, t1):
            a_t, e_t = _ref_gate(alpha, t), _ref_gate(eta, t)
            d_t = delta[:, :, t] if delta is not None else None
            if retention == "kl" and t == t0:
                # lag token: exact nonlinear (mirror / softmax) step from W_{t0}, log floored at 1e-6
                grads = _ref_inner_grad(weights, k[:, :, t], v[:, :, t], ln_weight, ln_bias,
                                        delta_t=d_t, **grad_kw)
                weights = tuple(
                    c * torch.softmax(a_t * torch.log(torch.clamp(w, min=KL_LOG_FLOOR)) - e_t * g,
                                      dim=-1)
                    for w, g, c in zip(weights, grads, scales))
                anchor = weights                      # W_lag anchors the rest of the chunk
            else:
                grads = _ref_inner_grad(anchor, k[:, :, t], v[:, :, t], ln_weight, ln_bias,
                                        delta_t=d_t, **grad_kw)
                weights, mom = _ref_linear_step(weights, mom, grads, a_t, e_t, momentum, t)

            read = tuple(a / n for a, n in zip(weights, norms)) if retention == "lq" else weights
            ys.append(_ref_memory_forward(read, q[:, :, t], ln_weight, ln_bias, memory))
    return torch.stack(ys, dim=2), weights


# ----------------------------------------------------------------------------------------------------
# exact per-token recurrence (spec section 2)
# ----------------------------------------------------------------------------------------------------

def miras_memory_exact(q, k, v, eta, alpha, state, ln_weight, ln_bias, *, objective="l2",
                       retention="l2", delta=None, p=3.0, q_norm=4.0, sharpness=10.0, eps=1e-6,
                       simplex_scale=None, memory="mlp", momentum=None, lq_read="current",
                       kl_log_floor=None):
    """Exact per-token recurrence of spec section 2 (every G_t at W_{t-1}; no chunks).

        l2: W_t = alpha_t W_{t-1} - eta_t G_t(W_{t-1})
        lq: A_t = alpha_t A_{t-1} - eta_t G_t(W_{t-1}),  W_t = A_t / n(A_t)
        kl: W_t = c softmax_rows(alpha_t log W_{t-1} - eta_t G_t(W_{t-1}))     (log NOT floored)
        y_t = M_{W_t}(q_t)

    Differences from the chunked semantics with chunk_size=1 (``miras_memory_reference``):
      * kl: the chunked path floors the log at 1e-6; identical whenever W > 1e-6 everywhere
        (``kl_log_floor=None``, default: the exact log; ``kl_log_floor=1e-6`` reproduces the floor).
      * lq: the state trajectory (A_t) is identical, but the chunked path reads token t with
        A_t / n(A_{t-1}) (the normalization happens at the chunk end, i.e. one token later).
        ``lq_read="current"`` (default) gives the section-2 read A_t / n(A_t); ``lq_read="previous"``
        gives the chunk_size=1 read A_t / n(A_{t-1}).
    """
    state = tuple(state)
    _check(q, k, v, eta, alpha, state, ln_weight, ln_bias,
           _rule(objective, retention, 1, p, q_norm, sharpness, eps, simplex_scale, memory), delta, momentum, True)
    if lq_read not in ("current", "previous"):
        raise ValueError("lq_read must be 'current' or 'previous'")
    B, H, T, d = q.shape
    grad_kw = dict(objective=objective, memory=memory, p=p, sharpness=sharpness, eps=eps)
    scales = _ref_simplex_scales(state, simplex_scale)

    weights = state
    mom = tuple(torch.zeros_like(w) for w in state) if momentum is not None else None
    ys = []
    for t in range(T):
        a_t, e_t = _ref_gate(alpha, t), _ref_gate(eta, t)
        d_t = delta[:, :, t] if delta is not None else None
        if retention == "lq":
            prev_norms = tuple(_ref_lq_factor(a, q_norm, eps) for a in weights)
            current = tuple(a / n for a, n in zip(weights, prev_norms))         # W_{t-1}
        else:
            current = weights
        grads = _ref_inner_grad(current, k[:, :, t], v[:, :, t], ln_weight, ln_bias, delta_t=d_t,
                                **grad_kw)
        if retention == "kl":
            logs = (tuple(torch.log(w) for w in weights) if kl_log_floor is None
                    else tuple(torch.log(torch.clamp(w, min=kl_log_floor)) for w in weights))
            weights = tuple(c * torch.softmax(a_t * lw - e_t * g, dim=-1)
                            for lw, g, c in zip(logs, grads, scales))
        else:
            weights, mom = _ref_linear_step(weights, mom, grads, a_t, e_t, momentum, t)

        if retention == "lq":
            norms = (prev_norms if lq_read == "previous"
                     else tuple(_ref_lq_factor(a, q_norm, eps) for a in weights))
            read = tuple(a / n for a, n in zip(weights, norms))
        else:
            read = weights
        ys.append(_ref_memory_forward(read, q[:, :, t], ln_weight, ln_bias, memory))
    return torch.stack(ys, dim=2), weights
