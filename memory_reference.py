"""Slow, obviously-correct oracles of the Miras memory (memory_core.py): token by token, every inner
gradient by torch.autograd, written independently of the fast path (the lp / Huber output gradients and the
lq / kl retention steps are spelled out here again on purpose). The tests hold memory_core to these, in
float64. miras_memory_reference has the chunked semantics; miras_memory_exact is the per-token recurrence
(every gradient at the previous state).
"""
import torch
import torch.nn.functional as F

from memory_core import LN_EPS, STEP_FLOOR, _check, _rule, _step_norm

KL_LOG_FLOOR = 1e-6  # the chunked kl step takes log(max(W, floor)) (see model_memora.py)


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
    return _ref_residual_grad(out - v_t, objective, delta_t, p, sharpness, eps)


def _ref_residual_grad(e, objective, delta_t, p, sharpness, eps, branch_of=None):
    """g as a function of the residual e = M(k_t) - v_t (lp, huber); Huber's branch is that of `branch_of`
    (default e)."""
    if objective == "lp":
        return p * torch.tanh(sharpness * e) * (e * e + eps).pow((p - 1.0) / 2.0)
    if objective == "huber":
        # one switch per token and head: ||e||_2 <= delta_t -> l2 branch, else smoothed l1 branch
        branch_of = e if branch_of is None else branch_of
        small = torch.linalg.vector_norm(branch_of, dim=-1, keepdim=True) <= delta_t[..., None]
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
            # output-space gradient of section 2, not the derivative of <M(k), g(M(k))>).
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


def _ref_pnorm_link(x, s, eps):
    """sign(x) |x|^(s-1) / ||x||_s^(s-2) per head, per matrix (the p-norm link; ||x||_s floored at eps)."""
    norm = x.abs().pow(s).sum(dim=(-2, -1), keepdim=True).clamp(min=eps ** s).pow(1.0 / s)
    return torch.sign(x) * x.abs().clamp(min=torch.finfo(x.dtype).tiny).pow(s - 1.0) / norm.pow(s - 2.0)


def _ref_lq_link(a, q_norm, eps, link):
    """(W, n): the lq weights read from the accumulator A and the in-chunk slope's inverse n (W_t = W + dA / n).
    printed: W = A / n with n = ||A||_q^(q-2). pnorm: W = f_r(A), r = q / (q - 1), n = ||A||_F / ||W||_F."""
    if link == "printed":
        n = _ref_lq_factor(a, q_norm, eps)
        return a / n, n
    w = _ref_pnorm_link(a, q_norm / (q_norm - 1.0), eps)
    return w, torch.linalg.matrix_norm(a, keepdim=True) / torch.linalg.matrix_norm(w, keepdim=True)


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


def _ref_g(weights, k_t, v_t, ln_weight, ln_bias, delta_t, *, objective, memory, p, sharpness, eps):
    """(g_t = dl/dM(k_t), L_t) at ``weights``; L_t = max_i dg_i / de_i (1 for l2 and dot), the derivative of the
    elementwise output gradient taken by autograd, at the residual and at 0 (where the step takes it; Huber on
    the residual's branch), whichever is larger."""
    out = _ref_memory_forward(weights, k_t, ln_weight, ln_bias, memory)
    e = out - v_t
    if objective == "dot":
        return -v_t, 1.0
    if objective == "l2":
        return e, 1.0
    g = _ref_residual_grad(e, objective, delta_t, p, sharpness, eps)
    with torch.enable_grad():  # dg_i / de_i: g is elementwise in e (the Huber switch is piecewise constant)
        x = e if e.requires_grad else e.detach().requires_grad_(True)
        (slope,) = torch.autograd.grad(_ref_residual_grad(x, objective, delta_t, p, sharpness, eps).sum(), x,
                                       create_graph=torch.is_grad_enabled())
        zero = torch.zeros_like(e).requires_grad_(True)
        (slope_at_0,) = torch.autograd.grad(
            _ref_residual_grad(zero, objective, delta_t, p, sharpness, eps, branch_of=e.detach()).sum(), zero,
            create_graph=torch.is_grad_enabled())
    return g, torch.maximum(slope.amax(-1), slope_at_0.amax(-1))


def _ref_response(anchor, grads_t, read_scales, k_t, ln_weight, ln_bias, memory):
    """c_t = J_t G_t: the derivative of M(k_t) along the token's own gradient matrices (each scaled by its
    layer's read scale), at the anchor, by forward-mode autograd."""
    def forward(*ws):
        return _ref_memory_forward(ws, k_t, ln_weight, ln_bias, memory)
    tangent = tuple(s * g if not torch.is_tensor(s) else s[..., None, None] * g for g, s in zip(grads_t, read_scales))
    return torch.func.jvp(forward, tuple(anchor), tangent)[1]


def _ref_normalized_eta(eta_hat, g_t, grads_t, chunk_grads, read_scales, response=None):
    """The step of memory_core.normalized_eta from explicit gradient matrices: with own = <G_t, G_t> and row =
    sum_j <G_t, G_j> (entry by entry, each layer weighted by its read scale), "gain" is
    eta_hat ||g||^2 / (L (max(own, row) + floor ||g||^2)), "gauss_newton" (response c_t given) is
    eta_hat own^2 / (L max(own, row) (||c||^2 + floor own)). [B, H, 1, 1]"""
    def dot(ga, gb):
        return sum(s * (a * b).sum(dim=(-2, -1)) for a, b, s in zip(ga, gb, read_scales))
    g, curvature = g_t
    own = dot(grads_t, grads_t)
    row = sum(dot(grads_t, gj) for gj in chunk_grads)
    if response is None:
        g2 = g.pow(2).sum(-1)
        step = g2 / (curvature * (torch.maximum(own, row) + STEP_FLOOR * g2))
    else:
        step = own * own / (curvature * torch.maximum(own, row) * (response.pow(2).sum(-1) + STEP_FLOOR * own))
    return (eta_hat[..., 0, 0] * step)[..., None, None]


# ----------------------------------------------------------------------------------------------------
# chunked semantics (README, "The memory engine")
# ----------------------------------------------------------------------------------------------------

def miras_memory_reference(q, k, v, eta, alpha, state, ln_weight, ln_bias, *, objective="l2",
                           retention="l2", chunk_size=64, delta=None, p=3.0, q_norm=4.0,
                           sharpness=10.0, eps=1e-6, simplex_scale=None, memory="mlp",
                           momentum=None, normalize_step=False, link="printed"):
    """Token-by-token oracle of the chunked Miras memory. Returns (y, state).

    y: [B, H, T, d]; state: the weights after the last token (the accumulator A for lq), same
    structure as the input state. normalize_step (True / "gain" or "gauss_newton"): eta is eta_hat, turned into
    the token's step by _ref_normalized_eta from the explicit gradients of the chunk's tokens so far (and, for
    "gauss_newton", the response c_t of _ref_response). link (lq): tokens inside a chunk read
    W_c + (A_t - A_c) / n with (W_c, n) = _ref_lq_link(A_c) at the chunk start.
    """
    state = tuple(state)
    _check(q, k, v, eta, alpha, state, ln_weight, ln_bias,
           _rule(objective, retention, chunk_size, p, q_norm, sharpness, eps, simplex_scale, memory, link=link), delta,
           momentum, True)
    B, H, T, d = q.shape
    grad_kw = dict(objective=objective, memory=memory, p=p, sharpness=sharpness, eps=eps)
    scales = _ref_simplex_scales(state, simplex_scale)
    step_norm = _step_norm(normalize_step)

    def response(anchor, grads, scales_t, t):  # "gauss_newton": c_t at the weights the gradient was taken at
        if step_norm != "gauss_newton":
            return None
        return _ref_response(anchor, grads, scales_t, k[:, :, t], ln_weight, ln_bias, memory)

    weights = state                                   # W (l2, kl) or the accumulator A (lq)
    mom = tuple(torch.zeros_like(w) for w in state) if momentum is not None else None
    ys = []
    for t0 in range(0, T, chunk_size):                # chunk = tokens t0 .. t1-1 (0-based)
        t1 = min(t0 + chunk_size, T)
        if retention == "lq":
            start = weights
            anchor, norms = zip(*(_ref_lq_link(a, q_norm, eps, link) for a in weights))   # frozen for the chunk
        else:
            anchor = weights                          # l2: W at chunk start (kl: replaced below)
        read_scales = tuple(1.0 / n[..., 0, 0] for n in norms) if retention == "lq" else (1.0,) * len(weights)
        chunk_grads = []                              # the explicit G_j of this chunk (normalize_step)

        for t in range(t0, t1):
            a_t, e_t = _ref_gate(alpha, t), _ref_gate(eta, t)
            d_t = delta[:, :, t] if delta is not None else None
            if retention == "kl" and t == t0:
                # lag token: exact nonlinear (mirror / softmax) step from W_{t0}, log floored at 1e-6
                grads = _ref_inner_grad(weights, k[:, :, t], v[:, :, t], ln_weight, ln_bias,
                                        delta_t=d_t, **grad_kw)
                if normalize_step:
                    g_t = _ref_g(weights, k[:, :, t], v[:, :, t], ln_weight, ln_bias, d_t, **grad_kw)
                    lag_scales = tuple(c / w.shape[-1] for w, c in zip(weights, scales))
                    e_t = _ref_normalized_eta(e_t, g_t, grads, [grads], lag_scales,
                                              response(weights, grads, lag_scales, t))
                weights = tuple(
                    c * torch.softmax(a_t * torch.log(torch.clamp(w, min=KL_LOG_FLOOR)) - e_t * g,
                                      dim=-1)
                    for w, g, c in zip(weights, grads, scales))
                anchor = weights                      # W_lag anchors the rest of the chunk
            else:
                grads = _ref_inner_grad(anchor, k[:, :, t], v[:, :, t], ln_weight, ln_bias,
                                        delta_t=d_t, **grad_kw)
                if normalize_step:
                    chunk_grads.append(grads)
                    g_t = _ref_g(anchor, k[:, :, t], v[:, :, t], ln_weight, ln_bias, d_t, **grad_kw)
                    e_t = _ref_normalized_eta(e_t, g_t, grads, chunk_grads, read_scales,
                                              response(anchor, grads, read_scales, t))
                weights, mom = _ref_linear_step(weights, mom, grads, a_t, e_t, momentum, t)

            read = (tuple(w + (a - a0) / n for w, a, a0, n in zip(anchor, weights, start, norms))
                    if retention == "lq" else weights)
            ys.append(_ref_memory_forward(read, q[:, :, t], ln_weight, ln_bias, memory))
    return torch.stack(ys, dim=2), weights


# ----------------------------------------------------------------------------------------------------
# exact per-token recurrence
# ----------------------------------------------------------------------------------------------------

def miras_memory_exact(q, k, v, eta, alpha, state, ln_weight, ln_bias, *, objective="l2",
                       retention="l2", delta=None, p=3.0, q_norm=4.0, sharpness=10.0, eps=1e-6,
                       simplex_scale=None, memory="mlp", momentum=None, lq_read="current",
                       kl_log_floor=None, link="printed"):
    """Exact per-token recurrence (every G_t at W_{t-1}; no chunks).

        l2: W_t = alpha_t W_{t-1} - eta_t G_t(W_{t-1})
        lq: A_t = alpha_t A_{t-1} - eta_t G_t(W_{t-1}),  W_t = f(A_t)   (printed: A_t / n(A_t); pnorm: f_r(A_t))
        kl: W_t = c softmax_rows(alpha_t log W_{t-1} - eta_t G_t(W_{t-1}))     (log NOT floored)
        y_t = M_{W_t}(q_t)

    Differences from the chunked semantics with chunk_size=1 (``miras_memory_reference``):
      * kl: the chunked path floors the log at 1e-6; identical whenever W > 1e-6 everywhere
        (``kl_log_floor=None``, default: the exact log; ``kl_log_floor=1e-6`` reproduces the floor).
      * lq: the state trajectory (A_t) is identical, but the chunked path reads token t through the previous
        token's link, W_{t-1} + (A_t - A_{t-1}) / n(A_{t-1}) (printed: A_t / n(A_{t-1})): the link lands at the
        chunk end, i.e. one token later. ``lq_read="current"`` (default) gives the section-2 read f(A_t);
        ``lq_read="previous"`` gives the chunk_size=1 read.
    """
    state = tuple(state)
    _check(q, k, v, eta, alpha, state, ln_weight, ln_bias,
           _rule(objective, retention, 1, p, q_norm, sharpness, eps, simplex_scale, memory, link=link), delta, momentum,
           True)
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
            prev = weights
            current, prev_norms = zip(*(_ref_lq_link(a, q_norm, eps, link) for a in weights))  # W_{t-1}
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

        if retention == "lq" and lq_read == "previous":
            read = tuple(w + (a - a0) / n for w, a, a0, n in zip(current, weights, prev, prev_norms))
        elif retention == "lq":
            read = tuple(_ref_lq_link(a, q_norm, eps, link)[0] for a in weights)
        else:
            read = weights
        ys.append(_ref_memory_forward(read, q[:, :, t], ln_weight, ln_bias, memory))
    return torch.stack(ys, dim=2), weights
