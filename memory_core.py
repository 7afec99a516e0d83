"""The Miras memory engine: a deep associative memory that learns at test time.

Behrouz et al., "It's All Connected" (arXiv 2504.13173). This file is the engine only: the chunk loop, the
dual form and the decode step. What an attentional bias or a retention gate *is* enters as a small object
(Objective, Retention below); the generic choices live here (l2 and dot-product bias, l2 retention,
momentum), the paper's new ones in their model files (lp bias and lq retention: model_moneta.py; Huber
bias: model_yaad.py; KL retention: model_memora.py), found by name through `resolve`. The slow
token-by-token oracles that the tests hold this file to are in memory_reference.py.

Per head, the memory is M_W(x) = x + LN(W_out gelu(W_in x)) (memory="mlp", E*d hidden units) or
M_W(x) = x + LN(W x) (memory="linear", the paper's linear-memory ablation). At every token it takes one
gradient step on the attentional bias l(M; k_t, v_t) held back by a retention gate:

    e_t = M_W(k_t) - v_t,  g_t = dl/dM(k_t)            (Objective.output_grad; l2: e, dot: -v)
    G_t = g_t back-propagated through LN, W_out, gelu and W_in (derived by hand in inner_grad)
    retention l2 : W_t = alpha_t W_{t-1} - eta_t G_t                          (Eq. 9 / Titans)
    momentum (optional, Titans-LMM): S_t = mu_t S_{t-1} - eta_t G_t,  W_t = alpha_t W_{t-1} + S_t
    other retentions change how the weights are read (lq: W = A / n(A)) or add an exact first step of
    each chunk (kl: the "lag" token); see Retention.

Chunked training: inside a chunk of b tokens every G_t is taken at one anchor, so the in-chunk recurrence
is linear and unrolls to matmuls (the TTT dual form). With D[t, i] = prod_{j=i+1..t} alpha_j (and M[t, i]
likewise for mu), Gamma = D (no momentum) or D @ M:

    W_t = beta_t W_start + c_t S_start - sum_{i<=t} Gamma[t, i] eta_i G_i(anchor)

applied layer by layer: layer l's read of the query path is
    z_l = beta (h_{l-1} W_l^T) + c (h_{l-1} S_l^T) - ((h_{l-1} a_{l-1}^T) * Gamma * eta) dz_l
where a_{l-1} and dz_l are the anchor's input activations and back-propagated signals on the keys, so no
per-token weights are ever materialized.

Carried state (MemoryState): the fast weights (the accumulator for lq), the anchor of the chunk in progress,
the retention's frozen normalizers, momentum buffers and the position inside the chunk, so prefill of any
length plus token-by-token decoding (miras_memory_step) equals one call over the whole sequence.

The semantics (the contract tests and benchmarks rely on) and where they deviate from the paper: README,
"The memory engine" and "Deviations".
"""
import gc
import hashlib
import importlib
import math
import pathlib
import types
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

# The names miras_memory accepts, and the module that defines each one that is not generic.
OBJECTIVES = ("l2", "dot", "lp", "huber")
RETENTIONS = ("l2", "lq", "kl")
MEMORIES = ("mlp", "linear")
STEP_NORMS = ("gain", "gauss_newton")  # normalize_step's rules; True means "gain" (see normalized_eta)
_HOMES = {("objective", "lp"): "model_moneta", ("retention", "lq"): "model_moneta",
          ("objective", "huber"): "model_yaad", ("retention", "kl"): "model_memora"}
LN_EPS = 1e-5
RECOMPUTE_BACKWARD = True  # False: plain autograd through the chunk loop (keeps every chunk's activations)
# Whole chunks per group (_groups), run as one compiled graph and recomputed as one in the backward, which keeps one
# start state per group: 4 on CUDA, where every graph call costs host time the GPU waits on and a deep model's saved
# starts are most of its extra memory; 1 elsewhere (a CPU), where a group's larger working set made the tiny
# models' steps slower and their saved starts are about the size of one group's recompute (README, "The memory
# engine")
CHUNKS_PER_GROUP = {"cuda": 4}
CHUNK_BACKEND = "inductor"  # torch.compile's backend for compiled chunks (tests of graph counts use aot_eager)
# Devices whose compiled chunks run a call's run of whole chunks as one compiled scan (_scan_run: Inductor turns
# it into one loop in its C++ wrapper, with no Python, dynamo entry or graph call per chunk). Not CUDA: Inductor's
# loop reads its condition on the host every iteration, and this path has not been run on a GPU (README)
SCAN_DEVICES = ("cpu",)
STEP_FLOOR = 1.0  # normalize_step: the smallest output gain per unit step the normalizer assumes, so eta
                  # never exceeds eta_hat <g, e> / ||g||^2 (see normalized_eta). With 1e-3 the floor let
                  # eta grow ~1000x as the LayerNorm-invariant weight scale drifted up (README, "Stability")


# ----------------------------------------------------------------------------------------------
# What an attentional bias and a retention gate are to the engine

class Objective:
    """An attentional bias: the engine needs its output-space gradient g = dl/dM(k)."""
    name = ""
    needs_delta = False  # Huber: a per-token threshold, produced by the layer's delta gate

    def output_grad(self, e, v, delta, rule):
        raise NotImplementedError

    def curvature(self, e, delta, rule):
        """L_t [N, n]: the largest slope dg_i / de_i of the output gradient on the way from this token's residual
        to 0, where the step takes it (a bound on the bias's curvature there), which normalize_step divides the
        step by; None means 1 (l2; dot, which is linear)."""
        return None

    def gates(self, cfg, head_dim):
        """Extra per-token gates the layer must produce for this objective (model_common.Gate list)."""
        return []


class Retention:
    """A retention gate. The defaults are plain l2 retention (W_t = alpha_t W_{t-1} - eta_t G_t): the
    anchor of a chunk is its starting weights and the weights are read as they are."""
    name = ""
    has_norm = False      # carries a per-layer normalizer [B, H] frozen for each chunk (lq)
    links = ("printed",)  # the `link` options it accepts (lq: also the p-norm link of section 5.2)
    momentum = True       # works with inner momentum
    lag_step = None       # fn(q, k, v, eta, alpha, delta, weights, ln_w, ln_b, rule, grads=None) -> (y, weights):
                          # an exact nonlinear step on each chunk's first token, which anchors the rest (kl);
                          # grads: inner_grad at `weights` if the caller has it; its refresh anchor must be
                          # the weights, so that the decode step takes the token's inner gradient once

    def refresh(self, weights, rule):
        """(anchor, norm) at a chunk start: the weights gradients are taken at, and frozen normalizers."""
        return list(weights), []

    def read_scale(self, norm):
        """Per-layer factors the in-chunk reads are multiplied by (lq: 1 / n), or None."""
        return None

    def read_offset(self, anchor, norm, rule):
        """Per-layer matrices added to the in-chunk reads (W_t = A_t / n + O; lq's p-norm link), or None."""
        return None

    def check_start(self, weights):
        """Raise ValueError if a fresh (plain tuple) state is not a valid start (kl: positivity)."""

    # the outer loop's side: how model_common.MirasLayer initializes and reads its learned initial state
    def init_fast_weights_(self, w, cfg):
        torch.nn.init.normal_(w, 0.0, 1.0 / math.sqrt(w.shape[-1]))  # fan-in scale

    def initial_weights(self, w, cfg):
        return w


class L2Bias(Objective):
    name = "l2"  # l = 1/2 ||e||^2

    def output_grad(self, e, v, delta, rule):
        return e


class DotBias(Objective):
    name = "dot"  # Hebbian: l = -<M(k), v>

    def output_grad(self, e, v, delta, rule):
        return -v


class L2Retention(Retention):
    name = "l2"


_REGISTRY = {("objective", "l2"): L2Bias(), ("objective", "dot"): DotBias(), ("retention", "l2"): L2Retention()}


def register(kind, obj):
    """Make an Objective (kind "objective") or Retention (kind "retention") available by its name."""
    _REGISTRY[(kind, obj.name)] = obj
    return obj


def resolve(kind, name):
    """The registered objective / retention called `name`; the one place names are validated."""
    valid = OBJECTIVES if kind == "objective" else RETENTIONS
    if name not in valid:
        raise ValueError(f"unknown {kind} {name!r}: use one of {valid}")
    if (kind, name) not in _REGISTRY:
        importlib.import_module(_HOMES[(kind, name)])  # its model file registers it
    return _REGISTRY[(kind, name)]


def momentum_retentions():
    return " or ".join(repr(n) for n in RETENTIONS if resolve("retention", n).momentum)


class MemoryState(NamedTuple):
    weights: tuple    # fast weights per layer, [B, H, out, in]; the accumulator A for lq
    anchor: tuple     # gradient anchor of the chunk in progress (ignored when pos == 0)
    norm: tuple       # the retention's normalizer per layer, [B, H], frozen for the chunk (lq); () otherwise
    momentum: tuple   # momentum buffers S, same shapes as weights; () without momentum
    pos: object       # tokens of the chunk in progress already consumed: int, or a 0-dim tensor
    grad_sum: tuple = ()  # normalize_step: sum of the raw inner gradients of the chunk in progress so far

    @staticmethod
    def start(weights, momentum: bool = False, retention: str = "l2",
              normalize_step: bool = False) -> "MemoryState":
        """A state at a chunk boundary (what a plain tuple of weights means)."""
        weights = tuple(weights)
        norm = tuple(w.new_ones(w.shape[:2]) for w in weights) if resolve("retention", retention).has_norm else ()
        mom = tuple(torch.zeros_like(w) for w in weights) if momentum else ()
        grad_sum = tuple(torch.zeros_like(w) for w in weights) if normalize_step else ()
        return MemoryState(weights, weights, norm, mom, 0, grad_sum)


# ----------------------------------------------------------------------------------------------
# Products whose gradients keep their operands' layouts

class _SavedInputs(torch.autograd.Function):
    """The products below: their backward reads their inputs."""
    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)


class _MatmulNT(_SavedInputs):
    """a @ b^T [N, m, p] for a [N, m, k], b [N, p, k]. Autograd's own matmul returns b's gradient as the
    transpose of a [N, k, p] product; the weights' gradients then sum row-major and transposed terms, and
    Inductor's CPU code runs such a fused elementwise kernel without SIMD (its non-contiguous-read heuristic).
    Here both gradients are row-major products: g b and g^T a."""
    @staticmethod
    def forward(a, b):
        return a @ b.transpose(-1, -2)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return g @ b, g.transpose(-1, -2) @ a  # unused ones are dead code in the compiled graph


class _MatmulTN(_SavedInputs):
    """a^T @ b [N, p, k] for a [N, m, p], b [N, m, k] (a sum of outer products over m, e.g. a weight update
    dz^T a), with row-major gradients b g^T and a g (as _MatmulNT)."""
    @staticmethod
    def forward(a, b):
        return a.transpose(-1, -2) @ b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return b @ g.transpose(-1, -2), a @ g


class _Gram(_SavedInputs):
    """a @ a^T with the row-major gradient (g + g^T) a (dynamo traces no Function given one tensor twice)."""
    @staticmethod
    def forward(a):
        return a @ a.transpose(-1, -2)

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        return (g + g.transpose(-1, -2)) @ a


def _mm_nt(a, b):
    """a @ b^T: under torch.compile through _MatmulNT (_Gram for b = a); eager (and under forward-mode AD,
    which the Functions do not define) the plain product, whose gradient layouts cost nothing there. Inside the
    compiled recompute's torch.func.vjp dynamo runs a Function's own backward only where its operands are computed
    in the recompute; for a primal (a piece's keys, the start weights) it differentiates the product itself
    (torch 2.13; pytorch/pytorch#193279)."""
    if not torch.compiler.is_compiling():
        return a @ b.transpose(-1, -2)
    return _Gram.apply(a) if a is b else _MatmulNT.apply(a, b)


def _mm_tn(a, b):
    """a^T @ b, as _mm_nt (_MatmulTN)."""
    return _MatmulTN.apply(a, b) if torch.compiler.is_compiling() else a.transpose(-1, -2) @ b


# ----------------------------------------------------------------------------------------------
# The memory MLP, its LayerNorm and the hand-derived inner gradient

def _layer_norm(z, w, b):
    zc = z - z.mean(-1, keepdim=True)
    rstd = torch.rsqrt(zc.pow(2).mean(-1, keepdim=True) + LN_EPS)
    zhat = zc * rstd
    return zhat * w + b, zhat, rstd


def _layer_norm_backward(g, zhat, rstd, w):
    # rstd scales g before the means, not the result: multiplied last, it was a cheap product that Inductor
    # inlined into every weight-sized loop of the compiled decode step reading dz (a square root and a division
    # per element there) and that kept the gradient sum's rank-1 term out of the update's loop
    gx = g * w * rstd
    return gx - gx.mean(-1, keepdim=True) - zhat * (gx * zhat).mean(-1, keepdim=True)


class _NormalParts(torch.autograd.Function):
    """[Phi(z), phi(z)], the standard normal's cdf and density, stacked, with the backward from the saved density
    (Phi' = phi, phi' = -z phi). In the compiled recompute gelu(z) = z Phi and gelu'(z) = Phi + z phi are spelled
    out from these: Inductor on CPU evaluates a reused pointwise value again in each kernel that reads it unless the
    value holds an op it counts as heavy (exp, not erf), and it writes a stack's inputs into their buffer once, so
    the recompute's erf runs once per pre-activation and its backward reuses phi, where through gelu and aten's
    gelu backward the compiled chunk backward ran erf in six kernels over [N, b, E*d] tensors and exp in four.
    Stacked per memory, [N, 2, n, hidden] for z [N, n, hidden]: the backward's kernel that writes both parts'
    gradients and the one that reads them then split the work the same way over two threads (stacked in front, one
    thread wrote each part and each read half of its rows from the other's)."""
    @staticmethod
    def forward(z):
        cdf = 0.5 + 0.5 * torch.erf(z * math.sqrt(0.5))
        return torch.stack([cdf, torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)], dim=1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)

    @staticmethod
    def backward(ctx, g):
        z, parts = ctx.saved_tensors
        return parts[:, 1] * (g[:, 0] - z * g[:, 1])


def _gelu(z):
    """(gelu(z), z's pre-activation record for _gelu_vjp). Compiled with grad (the chunk backward's recompute):
    through _NormalParts. Otherwise aten's gelu, one fused kernel: eager (also under forward-mode AD, which the
    Function does not define), and compiled without grad (the chunk forward, the decode step), whose ops then are
    the eager step's own (the tests hold a compiled decode step to it bit for bit where the backend runs aten's ops)."""
    if not (torch.compiler.is_compiling() and torch.is_grad_enabled()):
        return F.gelu(z), (z, None)
    parts = _NormalParts.apply(z)
    return z * parts[:, 0], (z, parts)


def _gelu_vjp(x, pre):
    """gelu'(z) * x for a pre-activation record (z, parts) of _gelu. Eager: in one kernel (aten's gelu backward,
    itself differentiable: the outer backward goes through it), where the slope spelled out in elementwise ops
    would make ~10 passes over the [N, n, hidden] tensor."""
    z, parts = pre
    if parts is None:
        return torch.ops.aten.gelu_backward(x, z)
    return x * (parts[:, 0] + z * parts[:, 1])


def inner_grad(k, v, delta, weights, ln_w, ln_b, rule):
    """Forward the keys through the memory at `weights` and back-propagate g by hand.

    Returns, per layer l, the layer's input activations a_l [N, n, in] and output signal dz_l [N, n, out],
    so that G_l = sum over tokens of dz_l^T a_l (times the token's step size), g and e [N, n, d], and the
    forward's linearization (the hidden layers' pre-activation records of _gelu, the LayerNorm's zhat and rstd) for
    step_response."""
    acts, pre = [k], []
    for i, w in enumerate(weights):
        z = _mm_nt(acts[-1], w)
        if i < len(weights) - 1:
            a, record = _gelu(z)
            acts.append(a)
            pre.append(record)
    out, zhat, rstd = _layer_norm(z, ln_w, ln_b)
    e = k + out - v
    g = rule["objective"].output_grad(e, v, delta, rule)
    dz = [_layer_norm_backward(g, zhat, rstd, ln_w)]
    for i in range(len(weights) - 1, 0, -1):
        dz.insert(0, _gelu_vjp(dz[0] @ weights[i], pre[i - 1]))
    return acts, dz, g, e, (pre, zhat, rstd)


def normalized_eta(eta_hat, g, curvature, acts, dz, scale, grad_sum, response=None):
    """The bounded, scale-aware inner step (normalize_step): eta_hat in (0, eta_max] becomes, for the rule "gain",

        eta_t = eta_hat_t ||g_t||^2 / (L_t (max(<G_t, G_t>, sum_{j<=t} <G_t, G_j>) + STEP_FLOOR ||g_t||^2))

    and for "gauss_newton" (response = c_t = J_t G_t, step_response), with own_t = <G_t, G_t>,

        eta_t = eta_hat_t own_t^2 / (L_t max(own_t, sum_{j<=t} <G_t, G_j>) (||c_t||^2 + STEP_FLOOR own_t))

    where j runs over the chunk's tokens so far (all of them share one anchor) and <G_t, G_j> =
    sum_l s_l (dz_lt . dz_lj)(a_lt . a_lj) is the inner product of the rank-1 per-layer weight gradients,
    each layer weighted by the factor s_l its weights are read with (lq: 1 / n; kl's lag step: c / row length).
    A step eta along -G_t moves M(k_t) by -eta c_t, c_t = J_t G_t, and <g_t, c_t> = <G_t, G_t>.
    "gain" sizes the step by the output gain along g, <G, G> / ||g||^2: eta_hat is then the fraction of the
    residual removed if c_t were parallel to g_t. "gauss_newton" minimizes the loss's quadratic upper bound
    along -G_t exactly (eta_hat = 1; for l2 the Gauss-Newton step of the linearized memory): the two agree when
    c_t || g_t and "gain" is larger by ||g||^2 ||c||^2 / <G, G>^2 >= 1 otherwise, overshooting the memory's
    stiff output directions -- on a long stream of recurring pairs that made the MLP memory chaotic (README,
    "Stability"). L_t is the bias's curvature bound (Objective.curvature; 1 for l2). The row sums make b copies
    of one pair share one step instead of taking it b times. The floor terms cap eta at eta_hat / (L STEP_FLOOR):
    where the output gain falls below STEP_FLOOR a full step would mean a large weight step, which grows the
    weights' LayerNorm-invariant scale. README, "Stability".
    curvature: L_t [N, n] or None (1); grad_sum: per layer, the sum of the raw gradients of this chunk's earlier
    pieces (carried state), or None."""
    gram = 0.0
    prev = 0.0
    for i, (a, d) in enumerate(zip(acts, dz)):
        s_i = 1.0 if scale is None else scale[i]
        gram = gram + s_i * _mm_nt(d, d) * _mm_nt(a, a)
        if grad_sum is not None:
            s_row = s_i if not torch.is_tensor(s_i) else s_i.view(-1, 1)
            prev = prev + s_row * ((d @ grad_sum[i]) * a).sum(-1)
    n = gram.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=gram.device).tril()
    row = torch.where(causal, gram, torch.zeros_like(gram)).sum(-1) + prev
    own = gram.diagonal(dim1=-2, dim2=-1)
    tiny = torch.finfo(own.dtype).tiny
    if response is None:
        g2 = (g * g).sum(-1)
        eta = eta_hat * g2 / (torch.maximum(own, row) + STEP_FLOOR * g2).clamp_min(tiny)
    else:  # as two bounded ratios: own^2 and the product of the denominators can leave float32's range
        c2 = (response * response).sum(-1)
        shared = own / torch.maximum(own, row).clamp_min(tiny)  # in [0, 1]: the chunk's copies share one step
        eta = eta_hat * shared * own / (c2 + STEP_FLOOR * own).clamp_min(tiny)
    return eta if curvature is None else eta / curvature.clamp_min(tiny)


def step_response(grads, weights, ln_w, scale):
    """c_t = J_t G_t [N, n, d]: how far the memory's output at key t moves per unit step along the token's own
    weight gradient, linearized at `weights` (the anchor that inner_grad's `grads` were taken at), each layer's
    change scaled by its read factor s_l (lq: 1 / n; kl's lag step: c / row length). Forward mode through the
    MLP: the update s_l dz_l^T a_l changes layer l's pre-activation at its own input by s_l (a_l . a_l) dz_l,
    and the change of its input propagates through W_l, gelu and the LayerNorm."""
    acts, dz, _, _, (hidden_pre, zhat, rstd) = grads
    tangent = None
    for i, (a, d, w) in enumerate(zip(acts, dz, weights)):
        s_i = 1.0 if scale is None else scale[i]
        direct = (s_i * (a * a).sum(-1, keepdim=True)) * d  # the layer's own update, at its own input
        tz = direct if tangent is None else _mm_nt(tangent, w) + direct
        if i < len(weights) - 1:
            tangent = _gelu_vjp(tz, hidden_pre[i])
    return ln_w * rstd * (tz - tz.mean(-1, keepdim=True) - zhat * (tz * zhat).mean(-1, keepdim=True))


def step_sizes(eta, grads, delta, anchor, ln_w, scale, grad_sum, rule):
    """normalize_step: the tokens' steps from the gate's eta_hat (normalized_eta with the rule's curvature
    bound and, for "gauss_newton", the step_response at the anchor); otherwise eta itself."""
    if not rule["normalize_step"]:
        return eta
    acts, dz, g, e, _ = grads
    curvature = rule["objective"].curvature(e, delta, rule)
    response = step_response(grads, anchor, ln_w, scale) if rule["normalize_step"] == "gauss_newton" else None
    return normalized_eta(eta, g, curvature, acts, dz, scale, grad_sum, response)


def _layer_output(z, h, i, n_layers, scale, offset):
    """Layer i's output from its weights' product z with its input h: times the read factor s_i (lq: 1 / n,
    [N, 1, 1]), plus h O_i^T (lq's p-norm link), then gelu between layers. The factor scales the product, not
    the weights: one multiply per output instead of a scaled copy of the weights."""
    if scale is not None:
        z = z * scale[i]
    if offset is not None:
        z = z + _mm_nt(h, offset[i])
    return _gelu(z)[0] if i < n_layers - 1 else z


def read(x, weights, ln_w, ln_b, scale=None, offset=None):
    """y = M_W(x) for explicit weights (the decode step, the kl lag token); with read factors s_l and offsets
    O_l (lq) layer l reads as W_l s_l + O_l."""
    h = x
    for i, w in enumerate(weights):
        h = _layer_output(_mm_nt(h, w), h, i, len(weights), scale, offset)
    return x + _layer_norm(h, ln_w, ln_b)[0]


def _masked_decay(log_cum):
    """exp(L_t - L_i) for i <= t, else 0: [N, n, n] from cumulative logs [N, n]."""
    n = log_cum.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=log_cum.device).tril()
    diff = log_cum.unsqueeze(-1) - log_cum.unsqueeze(-2)
    return torch.exp(torch.where(causal, diff, torch.full_like(diff, -math.inf)))


# ----------------------------------------------------------------------------------------------
# One segment of a chunk: linear recurrence against a fixed anchor, computed with matmuls

def _step_sizes(eta, grads, delta, anchor, ln_w, inv_norm, grad_sum, rule):
    """The tokens' inner step sizes (step_sizes) and the chunk's running gradient sum after them."""
    eta = step_sizes(eta, grads, delta, anchor, ln_w, inv_norm, grad_sum, rule)
    if rule["normalize_step"] and grad_sum is not None:
        acts, dz = grads[:2]
        grad_sum = [s + _mm_tn(d, a) for s, a, d in zip(grad_sum, acts, dz)]
    return eta, grad_sum


def _segment(q, k, v, eta, log_alpha, log_mu, delta, start, anchor, inv_norm, offset, mom, grad_sum, ln_w, ln_b,
             rule, last_row=None):
    """Tokens of one chunk (or of the part of it still to come) against a fixed gradient anchor.

    start: weights (accumulator for lq) before the segment; anchor: weights the gradients are taken at;
    inv_norm: per-layer read scale 1/n (lq) or None; offset: per-layer matrices added to the reads (lq's p-norm
    link) or None; mom: momentum buffers or None; grad_sum: the chunk's earlier raw gradients (normalize_step
    with a carried state) or None.
    last_row: a 1-element index tensor: the segment's real last token when the caller padded it (the rows
    after it must be no-op tokens: k = 0, eta = 0), so that one compiled graph serves every length.
    Returns y [N, n, d], the weights after the segment, the momentum buffers and grad_sum after it."""
    grads = inner_grad(k, v, delta, anchor, ln_w, ln_b, rule)
    acts, dz = grads[:2]
    eta, grad_sum = _step_sizes(eta, grads, delta, anchor, ln_w, inv_norm, grad_sum, rule)
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
        z = beta * _mm_nt(h, start[i]) - (_mm_nt(h, acts[i]) * step) @ dz[i]
        if mom is not None:
            z = z + carry * _mm_nt(h, mom[i])
        h = _layer_output(z, h, i, n_layers, inv_norm, offset)
    y = q + _layer_norm(h, ln_w, ln_b)[0]

    # a one-hot row mask, not index_select: compiled with index_select, kl's eta and alpha gradients came out
    # wrong (torch 2.13, inductor on CPU; tests/test_recompute.py checks compiled padded pieces)
    pick = None if last_row is None else (torch.arange(step.shape[1], device=step.device) == last_row).to(step.dtype)

    def end(x):  # the row of the segment's last real token: [N, 1, ...]
        if last_row is None:
            return x[:, -1:]
        return (x * pick.view(1, -1, *([1] * (x.dim() - 2)))).sum(1, keepdim=True)
    last = end(step).transpose(-1, -2)  # Gamma[end, i] eta_i: [N, n, 1]
    beta_end = end(beta)
    new = [beta_end * start[i] - _mm_tn(dz[i] * last, acts[i]) for i in range(n_layers)]
    new_mom = None
    if mom is not None:
        new = [new[i] + end(carry) * mom[i] for i in range(n_layers)]
        mu_last = (torch.exp(end(cum_mu) - cum_mu) * eta).unsqueeze(-1)  # (m_end / m_i) eta_i
        m_end = torch.exp(end(cum_mu)).unsqueeze(-1)
        new_mom = [m_end * mom[i] - _mm_tn(dz[i] * mu_last, acts[i]) for i in range(n_layers)]
    return y, new, new_mom, grad_sum


def _new_grad_sum(weights, track):
    """A chunk's running gradient sum at its start (zeros), when the call tracks it (normalize_step with a carried
    state), else None."""
    return [torch.zeros_like(w) for w in weights] if track else None


def _fresh_segment(q, k, v, eta, log_alpha, log_mu, delta, start, mom, track, ln_w, ln_b, rule, last_row=None):
    """A chunk from its start for a retention with normalizers (lq): the anchor and normalizers at the start
    (Retention.refresh: elementwise passes over the weights), then the segment, in one function, so that compiled
    chunks fuse them into one graph. Returns (y, weights, anchor, norm, mom, grad_sum)."""
    ret = rule["retention"]
    anchor, norm = ret.refresh(start, rule)
    grad_sum = _new_grad_sum(start, track)
    y, new, mom, grad_sum = _segment(q, k, v, eta, log_alpha, log_mu, delta, start, anchor, ret.read_scale(norm),
                                     ret.read_offset(anchor, norm, rule), mom, grad_sum, ln_w, ln_b, rule, last_row)
    return y, new, anchor, norm, mom, grad_sum


def _lag_segment(q, k, v, eta, log_alpha, log_mu, delta, start, norm, mom, track, ln_w, ln_b, rule, last_row=None):
    """A lag rule's chunk (kl, Eq. 30-32) from its first token: that token's exact step (Retention.lag_step) from
    the chunk's starting weights, then the rest of the chunk as a segment anchored at its result. One function,
    so that compiled chunks run one graph per chunk, as the other rules do. The piece has >= 2 tokens (a lone
    first token runs lag_step alone); last_row as in _segment. Returns (y, weights, the anchor: the lag step's
    result, mom, grad_sum)."""
    ret = rule["retention"]
    y_lag, lagged = ret.lag_step(q[:, :1], k[:, :1], v[:, :1], eta[:, 0], log_alpha[:, 0].exp(),
                                 None if delta is None else delta[:, :1], start, ln_w, ln_b, rule)
    grad_sum = _new_grad_sum(lagged, track)  # the chunk's normalizer starts afresh
    rest = [None if x is None else x[:, 1:] for x in (q, k, v, eta, log_alpha, log_mu, delta)]
    if last_row is not None:
        # padded (compiled chunks): the rest back to the piece's length with a no-op token at its end, as pieces
        # are padded; the CPU's GEMM kernels ran the b - 1 row products of the rest well below the b-row ones' rate
        rest = _pad(rest, q.shape[1])
    y, new, mom, grad_sum = _segment(*rest, lagged, lagged, ret.read_scale(norm), ret.read_offset(lagged, norm, rule),
                                     mom, grad_sum, ln_w, ln_b, rule, None if last_row is None else last_row - 1)
    return torch.cat([y_lag, y[:, :q.shape[1] - 1]], dim=1), new, lagged, mom, grad_sum


def _token_step(q, eta, log_alpha, log_mu, delta, start, anchor, inv_norm, offset, mom, grad_sum, ln_w, ln_b, rule,
                grads):
    """One token (the decode step): _segment's recurrence for n = 1 without its chunk matrices. With the
    token's rank-1 gradient G_l = dz_l^T a_l (taken at the anchor, `grads`), momentum m_l' = mu m_l - eta G_l
    and W_l' = alpha W_l + m_l' (without momentum W_l' = alpha W_l - eta G_l); the output reads W' (lq: times
    1 / n, plus the p-norm link's offset). Returns y [N, 1, d], the weights, the momentum buffers and grad_sum
    after the token."""
    acts, dz = grads[:2]
    eta, grad_sum = _step_sizes(eta, grads, delta, anchor, ln_w, inv_norm, grad_sum, rule)
    alpha, eta = log_alpha.exp().unsqueeze(-1), eta.unsqueeze(-1)  # [N, 1, 1]
    mu = log_mu.exp().unsqueeze(-1) if mom is not None else None
    new, new_mom = [], [] if mom is not None else None
    for i in range(len(start)):
        update = -_mm_tn(eta * dz[i], acts[i])  # -eta G_l: [N, out, in]
        if mom is not None:
            update = mu * mom[i] + update
            new_mom.append(update)
        new.append(alpha * start[i] + update)
    return read(q, new, ln_w, ln_b, inv_norm, offset), new, new_mom, grad_sum  # lq reads A / n (+ the link's O)


def chunk_flops(d, expansion, memory, momentum, b):
    """Forward FLOPs per token and head of the chunked memory with chunk length b: the keys' forward and
    hand-derived backward at the anchor, the queries' read (weight matmuls plus the b x b in-chunk terms) and
    the chunk-end weight update; momentum adds its buffers' reads and updates."""
    dims = [(d, expansion * d), (expansion * d, d)] if memory == "mlp" else [(d, d)]
    f = 2 * b * b if momentum else 0  # Gamma = D @ M: b^3 per chunk
    for i, (n_in, n_out) in enumerate(dims):
        w = 2 * n_in * n_out
        f += w * (2 if i > 0 else 1)         # keys: forward, and the backward signal into earlier layers
        f += w + 2 * b * (n_in + n_out)      # queries: weights, then (h a^T) and (. dz) over the chunk
        f += w                               # chunk-end weight update, amortized per token
        if momentum:
            f += 2 * w                       # momentum buffers: read and update
    return f


# ----------------------------------------------------------------------------------------------
# Input checks (one line each, saying what to do)

def _check(q, k, v, eta, alpha, state, ln_weight, ln_bias, rule, delta, momentum, check_values):
    if rule["memory"] not in MEMORIES:
        raise ValueError(f"unknown memory {rule['memory']!r}: use one of {MEMORIES}")
    if rule["chunk_size"] < 1:
        raise ValueError(f"chunk_size must be >= 1, got {rule['chunk_size']}")
    objective, retention = rule["objective"], rule["retention"]
    if rule["link"] not in retention.links:
        raise ValueError(f"link={rule['link']!r} does not apply to retention {retention.name!r}: use one of "
                         f"{retention.links}")
    if rule["link"] == "pnorm" and rule["q_norm"] <= 1:
        raise ValueError(f"link='pnorm' needs q_norm > 1 (its link uses r = q / (q - 1)), got {rule['q_norm']}")
    if objective.needs_delta and delta is None:
        raise ValueError(f"objective={objective.name!r} needs delta (a [B, H, T] tensor of positive thresholds)")
    if momentum is not None and not retention.momentum:
        raise ValueError(f"momentum works with retention {momentum_retentions()}, not {retention.name!r}; "
                         "pass momentum=None")
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
        # a carried MemoryState may legitimately hold what a fresh start may not (kl: entries <= 0 left by
        # the linear in-chunk steps), so only plain-tuple starts are checked
        if not isinstance(state, MemoryState):
            retention.check_start(weights)


def _rule(objective, retention, chunk_size, p, q_norm, sharpness, eps, simplex_scale, memory, normalize_step=False,
          link="printed"):
    return dict(objective=resolve("objective", objective), retention=resolve("retention", retention),
                chunk_size=int(chunk_size), p=float(p), q_norm=float(q_norm), sharpness=float(sharpness),
                eps=float(eps), simplex_scale=simplex_scale, memory=memory,
                normalize_step=_step_norm(normalize_step), link=link)


def _step_norm(normalize_step):
    """normalize_step as the rule holds it: None (off) or a name from STEP_NORMS (True: "gain"). The operator
    passes it as an int: 0 off, 1 + its index in STEP_NORMS."""
    if isinstance(normalize_step, str) and normalize_step in STEP_NORMS:
        return normalize_step
    if isinstance(normalize_step, (bool, int)) and 0 <= int(normalize_step) <= len(STEP_NORMS):
        return STEP_NORMS[int(normalize_step) - 1] if normalize_step else None
    raise ValueError(f"normalize_step={normalize_step!r}: use False, True or one of {', '.join(STEP_NORMS)}")


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
            [flat(w) for w in state.anchor], [flat(n).view(N, 1, 1) for n in state.norm], mom,
            [flat(s) for s in state.grad_sum])


_COMPILED = {}


def _compiled(fn, key):
    """The torch.compile'd copy of a chunk function for one key (rule, every shape but T's, dtype, device). Shapes are
    static and short pieces are padded to a whole chunk, so the number of graphs does not grow with T. Each
    key gets its own copy of the function's code object: dynamo counts recompilations per code object, so
    each key has its own budget (dynamo's default of 8) for the variants it guards on: the forward (no grad,
    detached inputs) and the backward's recompute (grad), each with or without the anchor being the start
    weights themselves (a chunk start of a retention whose anchor is its weights vs a chunk in progress). Dynamo's
    guards check every input's shape and strides (static), so Inductor's own assert of each on every call, host
    work paid once per chunk, is off."""
    if (fn, key) not in _COMPILED:
        scan = fn in (_scan_run, _scan_run_grads)
        options = {"size_asserts": False} if CHUNK_BACKEND == "inductor" else None
        if options and scan:
            # the scan's loop in C++, not Python; and Inductor's on-disk cache for its graphs, which it leaves to
            # the caller for a graph with a scan (its key holds the scanned function's code as it does the graph's)
            options.update(cpp_wrapper=True,
                           unsafe_marked_cacheable_functions={"torch.ops.higher_order.scan": torch.__version__})
        compiled = torch.compile(with_own_code(fn, len(_COMPILED)), fullgraph=True, dynamic=False,
                                 backend=CHUNK_BACKEND, options=options)
        _COMPILED[(fn, key)] = _collecting_compile_garbage(compiled) if scan else compiled
    return _COMPILED[(fn, key)]


def _collecting_compile_garbage(compiled):
    """A compiled function whose calls that compile a graph end with a full garbage collection. Dynamo's tracer
    keeps the inputs of the call it compiles in reference cycles; a scan's inputs are a whole call's chunk-major
    stacks and saved starts, which would otherwise stay until Python's next full collection (the peak heap of a CPU
    training run held them). For the scans only: a per-chunk graph's inputs are one chunk's."""
    def call(*args):
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        out = compiled(*args)
        if torch._dynamo.utils.counters["stats"]["unique_graphs"] != before:
            gc.collect()
        return out
    return call


def with_own_code(fn, tag):
    """fn with a code object of its own (named fn's name + tag): torch.compile's recompile limit counts the
    graphs of a code object, so a copy per key gives each key its own budget."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__  # keyword-only defaults are not FunctionType's arguments
    return copy


def _unflat(B, H, xs):
    return tuple(x.view(B, H, *x.shape[1:]) for x in xs)


# ----------------------------------------------------------------------------------------------
# The chunk loop: pieces of the plan, and a backward that recomputes each piece instead of storing it

def _split(inputs, plan):
    """The per-token inputs cut into the plan's pieces (each tensor split once: slicing inside the loop would
    make autograd scatter each piece's gradient into a full-length zero tensor, quadratic in T)."""
    sizes = [n for _, n in plan]
    return list(zip(*(x.split(sizes, dim=1) if x is not None else [None] * len(plan) for x in inputs)))


# the values of a no-op token, per input (q, k, v, eta, log alpha, log mu, delta): zero keys (so a zero inner
# gradient), eta 0, alpha 1, delta 1
_NO_OP = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _pad_to(t, size, fill):
    """t [N, n, ...] padded along time to `size` rows of `fill`."""
    if t.shape[1] == size:
        return t
    return torch.cat([t, t.new_full((t.shape[0], size - t.shape[1], *t.shape[2:]), fill)], dim=1)


def _pad(x, size):
    """Per-token inputs padded to `size` tokens with no-op tokens."""
    return [None if t is None else _pad_to(t, size, f) for t, f in zip(x, _NO_OP)]


def row_major(t):
    """t with a fresh tensor's strides, size-1 dimensions included (a view where t is contiguous, else a copy):
    .contiguous() leaves a size-1 dimension's stride as it was (a whole chunk of one memory, B = H = 1: the input's
    T * d; a decode step's prompt[:, -1:]: T), and torch.compile guards on every stride."""
    return t.contiguous().view(-1).view(t.shape)


def _chunked_split(tensors, plan, chunk, fills):
    """_split for compiled chunks: contiguous pieces, each a whole chunk (the last one padded with `fills`) cut
    from one chunk-major copy of each tensor made once per call, so that the loop copies and pads nothing per
    chunk (on a GPU, each copy is a kernel launched from Python). Two exceptions: a first piece that continues a
    chunk is a padded copy of its own, and a lone lag token is its chunk's first row. Returns (pieces, and per
    tensor the chunk-major copy [chunks after a continuing first piece, N, chunk, ...] or None), the copy being what
    a scan over the chunks reads (_scan_run)."""
    head = plan[0][1] if plan[0][0] == "continue" else 0
    n_rest = len(plan) - (head > 0)
    columns, stacks = [], []
    for t, fill in zip(tensors, fills):
        if t is None:
            columns.append([None] * len(plan))
            stacks.append(None)
            continue
        rest = _pad_to(t[:, head:], n_rest * chunk, fill) if n_rest else None
        stack = row_major(rest.unflatten(1, (n_rest, chunk)).movedim(1, 0)) if n_rest else None
        stacks.append(stack)
        chunks = list(stack.unbind(0)) if n_rest else []
        columns.append(([_pad_to(t[:, :head], chunk, fill)] if head else []) + chunks)
    pieces = list(zip(*columns))
    return [tuple(None if t is None else t[:, :1] for t in x) if kind == "lag" else x
            for (kind, _), x in zip(plan, pieces)], stacks


def _last_rows(plan, groups, device):
    """Each group's last real row per piece, as one index tensor [pieces] (a fill per distinct pattern of lengths,
    not a host-to-device copy; groups of whole chunks share one). One tensor per group, not one per piece: dynamo
    guards on which inputs are the same tensor, and pieces sharing one row tensor would make a group with a
    padded piece a graph of its own."""
    made = {}
    for group in groups:
        lengths = tuple(plan[i][1] for i in group)
        if lengths not in made:
            longest = max(lengths)
            rows = torch.full((len(group),), longest - 1, device=device)
            for k, n in enumerate(lengths):
                if n != longest:
                    rows[k:k + 1].fill_(n - 1)
            made[lengths] = rows
    return [made[tuple(plan[i][1] for i in group)] for group in groups]


def _run_piece(kind, x, st, ln_w, ln_b, rule, fns, last_row=None):
    """One piece: a fresh chunk ("refresh"), a lag rule's fresh chunk ("lag_chunk": its exact first step, then
    the rest), a lone lag token ("lag": a call that ends after it) or the rest of a chunk in progress
    ("continue"). st = (weights, anchor, norm, mom, grad_sum) before it; returns (y [N, n, d] for the n rows of x,
    st after it). With fns' pad_to set (compiled chunks), a short piece is padded to a whole chunk: one graph for
    every length; last_row (a 1-element tensor) says where a piece that its caller padded really ends."""
    segment, lag_segment, lag_step, fresh_segment, track, pad_to = fns
    if pad_to:  # compiled: contiguous pieces, so that strides (which depend on T) never force a new graph
        x = [None if t is None else t.contiguous() for t in x]
    weights, anchor, norm, mom, grad_sum = st
    ret = rule["retention"]
    if kind == "lag":  # its result anchors the rest of the chunk (the next call's "continue")
        q_c, k_c, v_c, eta_c, la_c, _, delta_c = x
        y, weights = lag_step(q_c, k_c, v_c, eta_c[:, 0], la_c[:, 0].exp(), delta_c, weights, ln_w, ln_b, rule)
        grad_sum = _new_grad_sum(weights, track)
        return y, (list(weights), list(weights), norm, mom, grad_sum)
    n = x[0].shape[1]
    if pad_to:  # every piece the same length and the same graph inputs, padded or not
        if x[0].shape[1] < pad_to:
            x = _pad(x, pad_to)
        if last_row is None:
            last_row = torch.full((1,), n - 1, device=x[0].device)  # a fill, not a host-to-device copy
    if kind == "lag_chunk":
        y, weights, anchor, mom, grad_sum = lag_segment(*x, weights, norm, mom, track, ln_w, ln_b, rule, last_row)
    elif kind == "refresh" and ret.has_norm:  # a new chunk: gradients are taken at its refreshed start
        y, weights, anchor, norm, mom, grad_sum = fresh_segment(*x, weights, mom, track, ln_w, ln_b, rule, last_row)
    else:
        if kind == "refresh":  # the other retentions' anchor is the start weights themselves (no graph returns
            # it as an alias of its input)
            anchor, norm = ret.refresh(weights, rule)
            grad_sum = _new_grad_sum(weights, track)
        y, weights, mom, grad_sum = segment(*x, weights, anchor, ret.read_scale(norm),
                                            ret.read_offset(anchor, norm, rule), mom, grad_sum, ln_w, ln_b, rule,
                                            last_row)
    return y[:, :n], (list(weights), list(anchor), list(norm), mom, grad_sum)


def _flatten_state(st):
    weights, anchor, norm, mom, grad_sum = st
    return [*weights, *anchor, *norm, *(mom or []), *(grad_sum or [])]


def _unflatten_state(flat, like):
    out, i = [], 0
    for part in like:
        if part is None:
            out.append(None)
            continue
        out.append(list(flat[i:i + len(part)]))
        i += len(part)
    return tuple(out)


def _plan(T, pos, b, has_lag):
    """The pieces of a call: (kind, length) with kind "refresh" (a chunk from its start), "lag_chunk" (the same
    for a lag rule: its exact first step, then the rest), "lag" (that first step alone, when the call ends
    after it) or "continue" (the rest of a chunk in progress); pos: tokens of the current chunk already consumed.
    Only a call's first piece can be a "continue"."""
    plan, t = [], 0
    while t < T:
        if pos == 0 and has_lag:  # the chunk's exact first step and the rest of it, in one piece
            n = min(T - t, b)
            plan.append(("lag", 1) if n == 1 else ("lag_chunk", n))
            t, pos = t + n, (pos + n) % b
            continue
        n = min(T - t, b - pos)
        plan.append(("refresh" if pos == 0 else "continue", n))
        t, pos = t + n, (pos + n) % b
    return plan


# Inductor's and AOTAutograd's on-disk caches key a traced graph by its ops and their arguments, not by a custom
# op's Python code, yet the operator's output shapes (its saved piece starts) come from this file: the operator
# takes the file's hash as an argument, so that a graph traced with another version of it is never reused
_IMPL_TAG = hashlib.sha1(pathlib.Path(__file__).read_bytes()).hexdigest()[:16]


def _spec(rule, compile_chunks, track, device):
    """The rule as the operator's typed arguments: (names "objective,retention,memory,link,implementation tag",
    ints [chunk_size, normalize_step, compile_chunks, track, chunks per group (CHUNKS_PER_GROUP, by device),
    scan (SCAN_DEVICES, by device)],
    floats [p, q_norm, sharpness, eps, simplex_scale or 0])."""
    names = ",".join((rule["objective"].name, rule["retention"].name, rule["memory"], rule["link"], _IMPL_TAG))
    norm_code = 1 + STEP_NORMS.index(rule["normalize_step"]) if rule["normalize_step"] else 0
    group = CHUNKS_PER_GROUP.get(device.type, 1)
    ints = [rule["chunk_size"], norm_code, int(compile_chunks), int(track), group, int(device.type in SCAN_DEVICES)]
    floats = [rule["p"], rule["q_norm"], rule["sharpness"], rule["eps"], float(rule["simplex_scale"] or 0.0)]
    return names, ints, floats


def _chunk_key(inputs, state, names, ints, floats):
    """The cache key of a call's compiled chunk functions: the rule, every shape but T's (head size, expansion,
    which gates and state parts are there), dtype and device."""
    shapes = (*[None if t is None else (t.shape[0], *t.shape[2:]) for t in inputs], *[t.shape for t in state])
    return names, tuple(ints), tuple(floats), shapes, inputs[0].dtype, inputs[0].device


def _loop_setup(inputs, state, names, ints, floats, pos):
    """What the op's arguments stand for: (plan, groups, rule, fns). state: the flattened start state. fns are the
    chunk functions themselves (padded under compile_chunks); the operator compiles each group of pieces whole
    (_run_group, _group_grads), so that what a compiled function's key needs (concrete shapes) is never asked of the
    fake implementation, whose shapes may be symbolic under a whole-model compile."""
    objective, retention, memory, link, _ = names.split(",")
    chunk_size, normalize_step, compile_chunks, track, group, _ = ints
    p, q_norm, sharpness, eps, simplex = floats
    rule = _rule(objective, retention, chunk_size, p, q_norm, sharpness, eps, simplex or None, memory, normalize_step,
                 link)
    ret = rule["retention"]
    lag_step = ret.lag_step
    fns = (_segment, lag_step and _lag_segment, lag_step, _fresh_segment if ret.has_norm else None, bool(track),
           rule["chunk_size"] if compile_chunks else None)
    plan = _plan(inputs[0].shape[1], pos, rule["chunk_size"], lag_step is not None)
    return plan, _groups(plan, group), rule, fns


def _groups(plan, size):
    """The plan's pieces in groups (lists of indices), each run as one compiled graph and recomputed as one in the
    backward: `size` consecutive chunks that start a chunk, alike (a call's "continue" and a lone
    "lag" token stay alone, and so do the last chunks that do not fill a group). The backward keeps one start
    state per group, not per chunk: the saved fast weights, most of a Miras model's extra training memory at
    large head sizes (README, "The memory engine"). A group that starts a chunk does not read the anchor it is
    given: it gets the weights themselves there, in every position, so that dynamo (which guards on which inputs
    alias) compiles one graph per kind of group, not one for the call's first group and one for the others."""
    groups, i = [], 0
    while i < len(plan):
        kind = plan[i][0]
        run = 1
        while kind in ("refresh", "lag_chunk") and i + run < len(plan) and plan[i + run][0] == kind and run < size:
            run += 1
        if run < size:
            run = 1
        groups.append(list(range(i, i + run)))
        i += run
    return groups


def _saved_slots(plan, groups, layout):
    """Which state slots each group saves for the backward (a list of bools per group): every group that starts a
    chunk saves every slot but the anchor, which it never reads (it refreshes it: a chunk's start, the kl lag step);
    a first group continuing a chunk saves nothing, as its start is the call's own state. The first group's start
    is saved too when it starts a chunk (one state more than the backward needs), so that a run of chunks has its
    starts in one slice of the stacked buffers (_scan_run)."""
    n_st, n_w, n_a = sum(max(n, 0) for n in layout), layout[0], layout[1]
    return [[plan[g[0]][0] != "continue" and not n_w <= j < n_w + n_a for j in range(n_st)] for g in groups]


def _group_count(T, pos, b, has_lag, size):
    """len(_groups(_plan(T, pos, b, has_lag), size)) by arithmetic, without _plan's loop: under a whole-model
    compile that has seen two lengths T is symbolic, and the loop's comparisons would guard on T's range (a new
    graph around the operator for every number of chunks). A first piece continuing a chunk (pos > 0) is a group;
    the m pieces after it make m // size groups of size and m % size alone, a last lone lag token (kl's last piece
    of one token) alone too."""
    head = int(pos > 0)
    rest = T - torch.sym_min(T, b - pos) if head else T
    m = (rest + b - 1) // b
    if has_lag and b == 1:  # every piece a lone lag token
        return head + m
    lone = int(rest % b == 1) if has_lag and size > 1 else 0  # a guard on T mod b, not on its range
    return head + (m - lone) // size + (m - lone) % size + lone


def _saved_counts(T, pos, b, has_lag, size, layout):
    """How many starts each state slot saves (the stacked shapes' first sizes, _saved_slots summed): every group
    but a first one continuing a chunk (pos > 0) saves every slot but the anchor's."""
    saving = _group_count(T, pos, b, has_lag, size) - int(pos > 0)
    n_w, n_a = layout[0], layout[1]
    return [0 if n_w <= j < n_w + n_a else saving for j in range(sum(max(n, 0) for n in layout))]


def _new_stacked_starts(state, T, names, ints, pos, layout):
    """Buffers for the saved starts, one per state slot, stacked over the groups that save it (_saved_counts): the
    operator's outputs are as many whatever T is (so is the graph a whole-model compile traces around it). The
    kernel and its fake implementation both make them here."""
    has_lag = resolve("retention", names.split(",")[1]).lag_step is not None
    counts = _saved_counts(T, pos, ints[0], has_lag, ints[4], layout)
    return [t.new_empty((n, *t.shape)) for t, n in zip(state, counts)]


def _group_start(state, stacked, slots, gi, head):
    """Group gi's start state, flattened: a first group continuing a chunk (one that saved nothing) starts from
    `state`; the others read their saved slots from row gi - head of `stacked` (every group but such a head saves,
    _saved_slots) and get an empty tensor for a slot they did not save."""
    if not any(slots[gi]):
        return list(state)
    return [stacked[j][gi - head] if saved else stacked[j].new_empty(0) for j, saved in enumerate(slots[gi])]


def _with_absent(xs, present):
    it = iter(xs)
    return [next(it) if p else None for p in present]


def _like(layout):
    return tuple(None if n < 0 else [None] * n for n in layout)


def _fresh(tensors, seen):
    """A custom op's outputs: contiguous, as its fake (meta) implementation promises, and aliasing neither its
    inputs nor each other (the anchor is often the weights themselves)."""
    out = []
    for t in tensors:
        t = t.contiguous()
        out.append(t.clone() if id(t) in seen else t)
        seen.add(id(out[-1]))
    return out


def _empty(t):
    return t.new_empty(t.shape)  # contiguous, whatever t's strides


@torch.library.custom_op("miras::chunk_loop", mutates_args=())
def _chunk_loop(xs: list[torch.Tensor], present: list[bool], state: list[torch.Tensor], ln_w: torch.Tensor,
                ln_b: torch.Tensor, names: str, ints: list[int], floats: list[float], pos: int, layout: list[int],
                save_starts: bool) -> list[torch.Tensor]:
    """The whole chunk loop as one operator, so that torch.compile of a model sees one node whatever T is.
    xs: the present ones of (q, k, v, eta, log alpha, log mu, delta), [N, T, ...]; state: the flattened
    (weights, anchor, norm, momentum, grad_sum) with part lengths `layout` (-1: absent); names, ints, floats:
    the rule (_spec); pos: tokens of the current chunk already consumed.
    Returns [y, *state after, *the saved piece starts (if save_starts): one tensor per state slot]."""
    # the kernel records no autograd graph (the backward recomputes); detached inputs under no_grad give
    # compiled chunks one variant for the forward, whatever requires_grad the caller's tensors have
    xs, state, ln_w, ln_b = [t.detach() for t in xs], [t.detach() for t in state], ln_w.detach(), ln_b.detach()
    inputs = _with_absent(xs, present)
    plan, groups, rule, fns = _loop_setup(inputs, state, names, ints, floats, pos)
    like = _like(layout)
    st = _unflatten_state(state, like)
    slots = _saved_slots(plan, groups, layout) if save_starts else []
    compiled = fns[5] is not None
    segments = _segments(plan, groups, compiled and bool(ints[5]))
    head = int(plan[0][0] == "continue")  # a first group continuing a chunk saves no start (_saved_slots)
    # the saved starts are copied into their stacked buffers as each group begins, while the previous group's
    # output is still in cache (a stack at the end re-reads them all from memory); a scan that runs every group
    # that saves one returns them stacked itself
    direct = save_starts and any(scanned and n == len(groups) - head for _, n, scanned in segments)
    if direct:  # the scan's saved starts stand in for every slot it saves; the anchor's saves none
        stacked = [t.new_empty((0, *t.shape)) for t in state]
    else:
        stacked = _new_stacked_starts(state, xs[0].shape[1], names, ints, pos, layout) if save_starts else []
    ys = []
    if compiled:  # whole chunks (a first piece continuing a chunk padded to one), one graph per kind of group
        pieces, stacks = _chunked_split(inputs, plan, fns[5], _NO_OP)
        last_rows, key = _last_rows(plan, groups, xs[0].device), _chunk_key(inputs, state, names, ints, floats)
    else:
        pieces, last_rows = _split(inputs, plan), [None] * len(groups)
    # below ADInplaceOrView, as the op's autograd kernel calls it: a whole-model compile's first call ran it with
    # that key excluded and its later calls did not, and compiled chunks guard on it (one more graph, compiled
    # on the second training step)
    with torch.no_grad(), torch._C._AutoDispatchBelowADInplaceOrView():
        for gi, n_groups, scanned in segments:
            if scanned:
                first = groups[gi][0]  # one piece per group: pieces first.., stacks' rows first - head..
                kind, keep = plan[first][0], [j for j, kept in enumerate(slots[gi]) if kept] if save_starts else []
                y, flat, saved = _compiled(_scan_run, ("scan", kind, *key))(
                    kind, present, *_run_inputs(stacks, plan, first, n_groups, head), _unaliased(_flatten_state(st)),
                    ln_w, ln_b, rule, fns, like, keep)
                st = _unflatten_state(flat, like)
                ys.append(y.movedim(0, 1).flatten(1, 2)[:, :sum(n for _, n in plan[first:first + n_groups])])
                for j, starts in zip(keep, saved):
                    if direct:
                        stacked[j] = starts
                    else:
                        stacked[j][gi - head:gi - head + n_groups].copy_(starts)
                continue
            group = groups[gi]
            if save_starts and any(slots[gi]):
                for j, t in enumerate(_flatten_state(st)):
                    if slots[gi][j]:
                        stacked[j][gi - head].copy_(t)
            kinds = tuple(plan[i][0] for i in group)
            if kinds[0] != "continue":  # the anchor is not read: the weights stand in for it (_groups)
                st = (st[0], list(st[0]), *st[2:])
            run = _compiled(_run_group, (kinds, *key)) if compiled else _run_group
            group_ys, st = run(kinds, [pieces[i] for i in group], st, ln_w, ln_b, rule, fns, last_rows[gi])
            ys += [y[:, :plan[i][1]] for i, y in zip(group, group_ys)]
    y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)
    return _fresh([y, *_flatten_state(st), *stacked], {id(t) for t in (*xs, *state)})


def _segments(plan, groups, scan):
    """The groups as the loop runs them: (first group, number of groups, scanned). With scan (compiled chunks on
    SCAN_DEVICES) two or more consecutive groups of one whole chunk each, of one kind that starts a chunk, run as
    one scan (_scan_run); every other group runs alone."""
    out, gi = [], 0
    while gi < len(groups):
        kind, n = plan[groups[gi][0]][0], 1
        if scan and len(groups[gi]) == 1 and kind in ("refresh", "lag_chunk"):
            while gi + n < len(groups) and len(groups[gi + n]) == 1 and plan[groups[gi + n][0]][0] == kind:
                n += 1
        out.append((gi, n, n >= 2))
        gi += n
    return out


def _run_inputs(stacks, plan, first, n, head):
    """A scanned run's inputs (pieces first.. first + n - 1): the present chunk-major stacks' rows of its chunks
    (their first dimension marked dynamic, so that one graph serves every number of chunks) and each chunk's last
    real row [n, 1]."""
    xs = [t[first - head:first - head + n] for t in stacks if t is not None]
    last_rows = torch.full((n, 1), plan[first][1] - 1, device=xs[0].device)
    if plan[first + n - 1][1] != plan[first][1]:  # a padded last chunk
        last_rows[-1].fill_(plan[first + n - 1][1] - 1)
    for t in (*xs, last_rows):
        torch._dynamo.mark_dynamic(t, 0)
    return xs, last_rows


def _scan_run(kind, present, xs, last_rows, start, ln_w, ln_b, rule, fns, like, keep):
    """Consecutive whole chunks of one kind that each start one (_segments), as one scan
    (torch._higher_order_ops.scan) over their chunk-major inputs xs (the present ones, [n, N, b, ...]; last_rows
    [n, 1]: each one's last real row), from the flat state `start`. What compiled chunks compile as one graph for
    every n >= 2, which Inductor runs as one loop in its C++ wrapper. Returns (y [n, N, b, d], the flat state after,
    and every chunk's start in the slots `keep` (those a chunk start saves, _saved_slots; none without a backward),
    [n, ...] each)."""

    def chunk(carry, x):
        st = _unflatten_state(carry, like)
        st = (st[0], list(st[0]), *st[2:])  # the anchor is not read: the weights stand in for it (_groups)
        y, st = _run_piece(kind, _with_absent(list(x[:-1]), present), st, ln_w, ln_b, rule, fns, x[-1])
        after = [t.clone() if any(t is c for c in carry) else t for t in _flatten_state(st)]  # no aliases
        return after, [y, *[carry[j].clone() for j in keep]]

    after, ys = torch._higher_order_ops.scan(chunk, list(start), [*xs, last_rows])
    return ys[0], after, ys[1:]


def _unaliased(tensors):
    """tensors, each one that shares storage with an earlier one cloned: a scan's carried inputs must not alias (the
    anchor is often the weights themselves; a model's start state can be views of one buffer)."""
    seen, out = set(), []
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        out.append(t.clone() if ptr in seen else t)
        seen.add(ptr)
    return out


def _run_group(kinds, xs, st, ln_w, ln_b, rule, fns, last_rows):
    """A group of consecutive pieces (_groups; kinds and xs: each piece's kind and inputs; last_rows: their last
    real rows, [pieces], or None) from state st: ([each piece's y, padded length], st after). What compiled chunks
    compile as one graph per kind of group, and what the backward recomputes and differentiates (_group_grads)."""
    ys = []
    for k, (kind, x) in enumerate(zip(kinds, xs)):
        y, st = _run_piece(kind, x, st, ln_w, ln_b, rule, fns, None if last_rows is None else last_rows[k:k + 1])
        ys.append(y)
    return ys, st


@_chunk_loop.register_fake
def _(xs, present, state, ln_w, ln_b, names, ints, floats, pos, layout, save_starts):
    stacked = _new_stacked_starts(state, xs[0].shape[1], names, ints, pos, layout) if save_starts else []
    return [_empty(t) for t in (xs[0], *state)] + stacked  # distinct tensors: no aliasing


def _autograd_inside_op():
    """Custom-op kernels run below autograd (its dispatch keys excluded); the backward's recompute needs it."""
    key = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set().remove(key.AutogradFunctionality).remove(key.ADInplaceOrView)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _group_grads(kinds, xs, start, ln_w, ln_b, dys, d_state, rule, fns, like, last_rows):
    """One group's backward: (d ln_w, d ln_b, [d of each piece's present inputs], [d of its start state]) from the
    gradients of its pieces' outputs and its end state (d_state: every slot's, full-sized), through its recompute
    (_vjp)."""
    present = [t is not None for t in xs[0]]
    n_x = sum(present)
    flat = [t for x in xs for t in x if t is not None]

    def group(ln_w, ln_b, flat, start):
        pieces = [_with_absent(flat[i * n_x:(i + 1) * n_x], present) for i in range(len(kinds))]
        ys, st = _run_group(kinds, pieces, _unflatten_state(start, like), ln_w, ln_b, rule, fns, last_rows)
        return ys, _flatten_state(st)

    d_lw, d_lb, d_flat, d_start = _vjp(group, ln_w, ln_b, flat, start, dys, d_state)
    return d_lw, d_lb, [list(d_flat[i * n_x:(i + 1) * n_x]) for i in range(len(kinds))], list(d_start)


def _vjp(fn, ln_w, ln_b, flat, start, dys, d_state):
    """(d ln_w, d ln_b, [d flat], [d start]) of fn(ln_w, ln_b, flat, start) -> ([ys], [state after]) for the
    gradients dys and d_state of its outputs. Compiled, by torch.func.vjp: the recompute and its backward are one
    graph, and no autograd graph is built and replayed between them, which cuts the host's work per chunk (what a
    GPU waits on at small chunks; README, "A GPU, twice"). Eager, by autograd (torch.func's eager transforms cost
    more per op)."""
    if torch.compiler.is_compiling():
        _, vjp = torch.func.vjp(fn, ln_w, ln_b, flat, start)
        d_lw, d_lb, d_flat, d_start = vjp((list(dys), list(d_state)))
        return d_lw, d_lb, list(d_flat), list(d_start)
    leaves = [t.detach().requires_grad_(True) for t in (ln_w, ln_b, *flat, *start)]
    ys, outs = fn(leaves[0], leaves[1], leaves[2:2 + len(flat)], leaves[2 + len(flat):])
    used = [(o, g) for o, g in zip((*ys, *outs), (*dys, *d_state)) if o.requires_grad]  # kl's lag: a fresh grad_sum
    grads = torch.autograd.grad([o for o, _ in used], leaves, [g for _, g in used], allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    return grads[0], grads[1], grads[2:2 + len(flat)], grads[2 + len(flat):]


@torch.library.custom_op("miras::chunk_loop_backward", mutates_args=())
def _chunk_loop_backward(xs: list[torch.Tensor], present: list[bool], starts: list[torch.Tensor],
                         ln_w: torch.Tensor, ln_b: torch.Tensor, grads_out: list[Optional[torch.Tensor]], names: str,
                         ints: list[int], floats: list[float], pos: int, layout: list[int]) -> list[torch.Tensor]:
    """The loop's backward: walks the groups of pieces in reverse, recomputes each from its saved start
    (activation checkpointing per group: the forward kept no per-chunk activations of the E*d-wide memory MLP)
    and differentiates it (_group_grads). starts: the start state and the forward's stacked saved starts (one
    tensor per slot); grads_out: the gradients of [y, *state after]. Returns [d ln_w, d ln_b, *d xs, *d state]."""
    inputs = _with_absent(xs, present)
    like, n_st = _like(layout), sum(max(n, 0) for n in layout)
    plan, groups, rule, fns = _loop_setup(inputs, starts[:n_st], names, ints, floats, pos)
    compiled = fns[5] is not None  # compile_chunks: pieces padded to a chunk, one graph per kind of group
    key = _chunk_key(inputs, starts[:n_st], names, ints, floats) if compiled else None
    if len(starts) != 2 * n_st:
        raise RuntimeError("miras::chunk_loop backward without the saved piece starts: the forward ran with "
                           "grad mode off; run it under torch.enable_grad() to differentiate it")
    state, stacked, slots = starts[:n_st], starts[n_st:], _saved_slots(plan, groups, layout)
    segments = _segments(plan, groups, compiled and bool(ints[5]))
    head = int(plan[0][0] == "continue")
    if compiled:  # whole chunks, padded once per call (_chunked_split), dy with zeros
        both, stacks = _chunked_split([*inputs, grads_out[0]], plan, fns[5], (*_NO_OP, 0.0))
        pieces, dys = [x[:-1] for x in both], [x[-1] for x in both]
        last_rows = _last_rows(plan, groups, grads_out[0].device)
    else:
        pieces, dys = _split(inputs, plan), grads_out[0].split([n for _, n in plan], dim=1)
        last_rows = [None] * len(groups)
    # the state after the call, where unused: zeros of the full start's shapes (distinct from `zeros` below, as
    # the compiled vjp guards on its inputs' aliasing)
    d_state = [s.new_zeros(s.shape) if g is None else g for s, g in zip(state, grads_out[1:])]
    d_lws, d_lbs = [], []
    d_segments = [None] * len(segments)  # per segment, per piece (a scanned run: one), each present input's grad
    # a start slot not saved (_saved_slots) is not read by its group: zeros of its size stand in for it and
    # for its gradient, so that every group of a kind has the same inputs (one graph)
    zeros = [t.new_zeros(t.shape) for t in state]
    for si in range(len(segments) - 1, -1, -1):
        gi, n_groups, scanned = segments[si]
        d_state = [t.detach() if t.shape == z.shape else z for t, z in zip(d_state, zeros)]
        if scanned:  # one reverse scan over the run's chunks, each recomputed from its saved start
            first = groups[gi][0]
            kind, keep = plan[first][0], [j for j, kept in enumerate(slots[gi]) if kept]
            # detached, as a group's inputs are below: the saved starts are outputs of the forward
            xs_r, last_r = _run_inputs([None if t is None else t.detach() for t in stacks[:-1]], plan, first,
                                       n_groups, head)
            saved = [stacked[j][gi - head:gi - head + n_groups].detach() for j in keep]
            dys_r = stacks[-1][first - head:first - head + n_groups].detach()
            for t in (*saved, dys_r):
                torch._dynamo.mark_dynamic(t, 0)
            with _autograd_inside_op(), torch.enable_grad(), torch.autocast(ln_w.device.type, enabled=False):
                d_xs, d_lw, d_lb, d_state = _compiled(_scan_run_grads, ("scan_grads", kind, *key))(
                    kind, present, xs_r, last_r, dys_r, saved, _unaliased(d_state), ln_w.detach(), ln_b.detach(),
                    rule, fns, like)
            length = sum(n for _, n in plan[first:first + n_groups])
            # the reverse scan's outputs are in reverse chunk order: one copy puts them back and in [N, T] order
            back = torch.arange(n_groups - 1, -1, -1, device=ln_w.device)
            d_segments[si] = [[g.movedim(0, 1).index_select(1, back).flatten(1, 2)[:, :length] for g in d_xs]]
            d_lws.append(d_lw.sum(0))
            d_lbs.append(d_lb.sum(0))
            continue
        group = groups[gi]
        kinds, start = tuple(plan[i][0] for i in group), _group_start(state, stacked, slots, gi, head)
        xs_g, dys_g = [pieces[i] for i in group], [dys[i] for i in group]
        group_grads = _group_grads
        if compiled:  # one graph per kind of group, whatever its length, strides and requires_grad
            group_grads = _compiled(_group_grads, (kinds, *key))
            xs_g = [[None if t is None else t.detach() for t in x] for x in xs_g]
            dys_g = [dy.detach() for dy in dys_g]
        start = [t.detach() if t.shape == z.shape else z for t, z in zip(start, zeros)]
        if kinds[0] != "continue":  # the anchor is not read: the weights stand in for it, as in the forward
            start[layout[0]:2 * layout[0]] = start[:layout[0]]
        # recompute as the forward ran: with grad, and in the compute dtype whatever autocast is around
        with _autograd_inside_op(), torch.enable_grad(), torch.autocast(ln_w.device.type, enabled=False):
            d_lw, d_lb, d_xs, d_state = group_grads(kinds, xs_g, start, ln_w.detach(), ln_b.detach(), dys_g,
                                                    d_state, rule, fns, like, last_rows[gi])
        d_segments[si] = [[g[:, :plan[i][1]] for g in d_x] for i, d_x in zip(group, d_xs)]
        d_lws.append(d_lw)
        d_lbs.append(d_lb)
    d_ln = [torch.stack(d_lws).sum(0), torch.stack(d_lbs).sum(0)]  # two kernels, not two per group
    d_pieces = [d for segment in d_segments for d in segment]
    d_inputs = [parts[0] if len(parts) == 1 else torch.cat(parts, dim=1) for parts in zip(*d_pieces)]
    return _fresh([*d_ln, *d_inputs, *d_state], {id(t) for t in (*xs, ln_w, ln_b, *grads_out)})


def _scan_run_grads(kind, present, xs, last_rows, dys, saved, d_end, ln_w, ln_b, rule, fns, like):
    """_scan_run's backward: a scan over the chunks in reverse that recomputes each chunk from its saved start
    (saved: [n, ...] for each slot but the anchor's) and differentiates it (torch.func.vjp), carrying the gradient
    of the state from d_end (the state after the run). Returns (d xs [n, N, b, ...] per present input and d ln_w and
    d ln_b [n, ...], each in reverse chunk order, and d of the run's start state, zeros for the anchor, which a
    chunk start does not read)."""
    n_w, n_x = len(like[0]), len(xs)

    def chunk_grads(d_after, i):
        x = [t.index_select(0, i[0]).squeeze(0) for t in (*xs, dys, last_rows, *saved)]  # chunk i's rows
        inputs, dy, last_row, start = x[:n_x], x[n_x], x[n_x + 1], x[n_x + 2:]

        def chunk(ln_w, ln_b, x, start):
            # the weights stand in for the anchor, which a chunk start does not read
            st = _unflatten_state([*start[:n_w], *start[:n_w], *start[n_w:]], like)
            y, st = _run_piece(kind, _with_absent(x, present), st, ln_w, ln_b, rule, fns, last_row)
            return [y], _flatten_state(st)

        d_lw, d_lb, d_inputs, d_start = _vjp(chunk, ln_w, ln_b, inputs, start, [dy], d_after)
        d_anchor = [torch.zeros_like(t) for t in d_after[n_w:2 * n_w]]
        d_start = [t.clone() if any(t is c for c in d_after) else t for t in d_start]  # a slot passed through
        return [*d_start[:n_w], *d_anchor, *d_start[n_w:]], [*d_inputs, d_lw, d_lb]

    # the chunks in reverse by an index each reads its rows at: scan's reverse=True flips (copies) every input
    # first, the saved starts included, which raised a training step's peak memory
    order = torch.arange(xs[0].shape[0] - 1, -1, -1, device=xs[0].device).unsqueeze(-1)
    d_start, ys = torch._higher_order_ops.scan(chunk_grads, list(d_end), [order])
    return ys[:n_x], ys[n_x], ys[n_x + 1], d_start


@_chunk_loop_backward.register_fake
def _(xs, present, starts, ln_w, ln_b, grads_out, names, ints, floats, pos, layout):
    n_st = sum(max(n, 0) for n in layout)
    return [_empty(t) for t in (ln_w, ln_b, *xs, *starts[:n_st])]


def _loop_setup_context(ctx, inputs, output):
    xs, present, state, ln_w, ln_b, names, ints, floats, pos, layout, _ = inputs
    n_state = len(state)
    ctx.save_for_backward(ln_w, ln_b, *xs, *state, *output[1 + n_state:])
    ctx.present, ctx.spec, ctx.pos, ctx.layout = present, (names, ints, floats), pos, layout
    ctx.n_x, ctx.n_state = len(xs), n_state
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the saved starts (outputs nothing reads)


def _loop_backward(ctx, grads):
    saved = ctx.saved_tensors
    ln_w, ln_b, xs, starts = saved[0], saved[1], list(saved[2:2 + ctx.n_x]), list(saved[2 + ctx.n_x:])
    grads_out = list(grads[:1 + ctx.n_state])
    if grads_out[0] is None:  # only the state after the call is used
        grads_out[0] = xs[0].new_zeros(xs[0].shape)
    out = _chunk_loop_backward(xs, ctx.present, starts, ln_w, ln_b, grads_out, *ctx.spec, ctx.pos, ctx.layout)
    return (list(out[2:2 + ctx.n_x]), None, list(out[2 + ctx.n_x:]), out[0], out[1], None, None, None, None, None,
            None)


torch.library.register_autograd("miras::chunk_loop", _loop_backward, setup_context=_loop_setup_context)


def _loop_flops(xs, present, state, names, ints):
    """chunk_flops for a whole call of the operator (xs, state: shapes, as torch's FLOP counter passes them)."""
    (N, T, d), memory = xs[0], names.split(",")[2]
    expansion = state[0][-2] // d if memory == "mlp" else 1
    return N * T * chunk_flops(d, expansion, memory, present[5], min(T, ints[0]))


@register_flop_formula(torch.ops.miras.chunk_loop)
def _(xs, present, state, ln_w, ln_b, names, ints, floats, pos, layout, save_starts, out_shape=None, **_):
    return _loop_flops(xs, present, state, names, ints)


@register_flop_formula(torch.ops.miras.chunk_loop_backward)
def _(xs, present, starts, ln_w, ln_b, grads_out, names, ints, floats, pos, layout, out_shape=None, **_):
    return 3 * _loop_flops(xs, present, starts, names, ints)  # each piece recomputed (1x), then differentiated (2x)


def _under_transform():
    """Forward-mode AD or a torch.func transform is active: the operator has neither rule."""
    if torch.compiler.is_compiling():
        return False
    return torch.autograd.forward_ad._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None


def _run_loop(inputs, st, ln_w, ln_b, spec, pos):
    """The chunk loop through the operator: (y, state after)."""
    layout = [-1 if part is None else len(part) for part in st]
    # what the backward recomputes from; by grad mode alone, because under torch.compile's tracing the inputs'
    # requires_grad does not say whether a backward will run
    save = torch.is_grad_enabled()
    state = _flatten_state(st)
    out = _chunk_loop([t for t in inputs if t is not None], [t is not None for t in inputs], state,
                      ln_w, ln_b, *spec, pos, layout, save)
    return out[0], _unflatten_state(out[1:1 + len(state)], st)


# ----------------------------------------------------------------------------------------------
# The public ops

def _check_state_step_norm(state, normalize_step):
    """A carried MemoryState holds a grad_sum exactly when it was built for a normalized step."""
    built_for = len(state.grad_sum) > 0  # len(), not bool(): torch 2.11's dynamo cannot trace bool() of a tuple
    if bool(normalize_step) != built_for:
        raise ValueError(f"the MemoryState was built for normalize_step={built_for}: pass the same normalize_step "
                         "as the call that made it")


def miras_memory(q, k, v, eta, alpha, state, ln_weight, ln_bias, *, objective="l2", retention="l2",
                 chunk_size=64, delta=None, p=3.0, q_norm=4.0, sharpness=10.0, eps=1e-6, simplex_scale=None,
                 memory="mlp", momentum=None, normalize_step=False, link="printed", check_values=True,
                 compile_chunks=False):
    """Chunked parallel memory over a whole sequence.

    q, k, v [B, H, T, d] (q, k l2-normalized); eta, alpha (, delta, momentum) [B, H, T].
    state: a plain tuple of fast weights (a chunk boundary; a plain tuple of final weights is returned) or
    a MemoryState (returned as one: exact continuation of a sequence cut anywhere).
    Returns y [B, H, T, d] in q's dtype; the fast-weight arithmetic runs in float32 (float64 for float64).

    normalize_step=True (or "gain") reads eta as the bounded step eta_hat of normalized_eta (Memora's default),
    "gauss_newton" as the same step sized by the output change of the step itself (normalized_eta); False (the
    default here) is the plain per-token step eta_t G_t.
    link (lq only): "printed" reads W = A / ||A||_q^(q-2) (Eq. 24 as printed); "pnorm" the p-norm link of
    section 5.2 (Variant 4), W = sign(A) |A|^(r-1) / ||A||_r^(r-2), r = q / (q - 1) (model_moneta.py).

    The chunk loop runs inside one operator (miras::chunk_loop, a torch.library custom op with a recomputing
    backward), so torch.compile of a whole model traces it as one node: its graph and compile time do not
    grow with T. compile_chunks=True runs each chunk inside it through a torch.compile'd (fullgraph,
    static-shape, padded to a whole chunk) chunk function: one graph for every T, with or without a
    whole-model compile around the call."""
    rule = _rule(objective, retention, chunk_size, p, q_norm, sharpness, eps, simplex_scale, memory, normalize_step,
                 link)
    _check(q, k, v, eta, alpha, state, ln_weight, ln_bias, rule, delta, momentum, check_values)
    ret = rule["retention"]
    carried = isinstance(state, MemoryState)
    if carried:
        _check_state_step_norm(state, normalize_step)
    else:
        state = MemoryState.start(state, momentum is not None, retention)
    B, H, T, d = q.shape
    with torch.autocast(q.device.type, enabled=False):
        (qf, kf, vf, eta_f, log_alpha, log_mu, delta_f, ln_w, ln_b, weights, anchor, norm,
         mom, grad_sum) = _flat_inputs(q, k, v, eta, alpha, delta, momentum, state, ln_weight, ln_bias)
        pos = int(state.pos)
        # the chunk's running gradient sum is needed only to continue a chunk cut by the caller
        track = bool(rule["normalize_step"]) and carried
        grad_sum = grad_sum if track else None
        inputs = (qf, kf, vf, eta_f, log_alpha, log_mu, delta_f)
        st = (weights, anchor, norm, mom, grad_sum)
        spec = _spec(rule, compile_chunks, track, q.device)
        if T == 0:  # an empty prefill
            y = qf
        elif RECOMPUTE_BACKWARD and not _under_transform():
            y, st = _run_loop(inputs, st, ln_w, ln_b, spec, pos)
        else:  # plain autograd through the same pieces: keeps every chunk's activations (the tests' reference;
            # also under forward-mode AD and torch.func transforms, which the operator does not support)
            plan, _, _, fns = _loop_setup(inputs, _flatten_state(st), *spec, pos)
            ys = []
            for (kind, _), x in zip(plan, _split(inputs, plan)):
                y, st = _run_piece(kind, x, st, ln_w, ln_b, rule, fns)
                ys.append(y)
            y = torch.cat(ys, dim=1)
        pos = (pos + T) % rule["chunk_size"]
        weights, anchor, norm, mom, grad_sum = st
        y = y.view(B, H, T, d).to(q.dtype)

    if not carried:
        return y, _unflat(B, H, weights)
    norm_out = tuple(n.view(B, H) for n in norm)
    mom_out = _unflat(B, H, mom) if mom is not None else ()
    grad_out = _unflat(B, H, grad_sum) if track else ()
    return y, MemoryState(_unflat(B, H, weights), _unflat(B, H, anchor), norm_out, mom_out, pos, grad_out)


def miras_memory_step(q, k, v, eta, alpha, state, ln_weight, ln_bias, *, objective="l2", retention="l2",
                      chunk_size=64, delta=None, p=3.0, q_norm=4.0, sharpness=10.0, eps=1e-6, simplex_scale=None,
                      memory="mlp", momentum=None, normalize_step=False, link="printed", check_values=False,
                      chunk_start=None):
    """One token of decoding with static shapes: q, k, v [B, H, d]; gates [B, H]; state a MemoryState.

    With a tensor position, chunk boundaries are selected with torch.where, so one compiled graph serves
    every position (compile the step itself with torch.compile). chunk_start (a bool: whether state.pos is 0,
    when the caller knows it on the host) runs only the branch taken instead, as an int position does in eager
    decoding: a compiled caller then keeps one graph for a chunk's first token and one for the rest, and the
    rest skip the anchor refresh and kl's exact step. Calling it token by token after a miras_memory prefill
    reproduces one miras_memory call over the whole sequence."""
    if not isinstance(state, MemoryState):
        raise ValueError("miras_memory_step needs a MemoryState; build one with MemoryState.start(weights)")
    add_t = (lambda x: None if x is None else x.unsqueeze(2))
    q, k, v, eta, alpha, delta, momentum = (add_t(x) for x in (q, k, v, eta, alpha, delta, momentum))
    rule = _rule(objective, retention, chunk_size, p, q_norm, sharpness, eps, simplex_scale, memory, normalize_step,
                 link)
    _check(q, k, v, eta, alpha, state, ln_weight, ln_bias, rule, delta, momentum, check_values)
    _check_state_step_norm(state, normalize_step)
    B, H, _, d = q.shape
    ret = rule["retention"]
    with torch.autocast(q.device.type, enabled=False):
        (qf, kf, vf, eta_f, log_alpha, log_mu, delta_f, ln_w, ln_b, weights, anchor, norm,
         mom, grad_sum) = _flat_inputs(q, k, v, eta, alpha, delta, momentum, state, ln_weight, ln_bias)
        pos = state.pos
        if check_values and chunk_start is not None and bool(chunk_start) != (int(pos) == 0):
            raise ValueError(f"chunk_start={chunk_start} but the state is at position {int(pos)} of its chunk")
        if chunk_start is not None or (isinstance(pos, int) and not torch.compiler.is_compiling()):
            # the branch is known on the host (the caller's chunk_start, or an int position in eager decoding;
            # traced, an int position may become symbolic), so only the branch taken runs
            fresh = bool(chunk_start) if chunk_start is not None else pos == 0

            def choose(make_new, old):
                return make_new() if fresh else old
        else:  # a tensor position (a compiled step): both branches run, torch.where picks
            pos = torch.as_tensor(pos, device=q.device)
            fresh = pos == 0

            def choose(make_new, old):
                return [torch.where(fresh, n, o) for n, o in zip(make_new(), old)]
        # first token of a chunk: the anchor (and normalizers) are refreshed
        if fresh is not False:
            new_anchor, new_norm = ret.refresh(weights, rule)
            anchor, norm = choose(lambda: list(new_anchor), anchor), choose(lambda: list(new_norm), norm)
        if normalize_step:
            grad_sum = choose(lambda: [torch.zeros_like(s) for s in grad_sum], grad_sum)
        # one inner gradient per token: at a chunk's first token the anchor is the weights, which is where
        # the lag step (if any) takes it too
        grads = inner_grad(kf, vf, delta_f, anchor, ln_w, ln_b, rule)
        lag_only = ret.lag_step is not None and fresh is True
        if not lag_only:
            y, new, mom, grad_sum = _token_step(qf, eta_f, log_alpha, log_mu, delta_f, weights, anchor,
                                                ret.read_scale(norm), ret.read_offset(anchor, norm, rule), mom,
                                                grad_sum, ln_w, ln_b, rule, grads)
        if ret.lag_step is not None and fresh is not False:  # a chunk's first token takes the exact step instead
            y_lag, lag = ret.lag_step(qf, kf, vf, eta_f[:, 0], log_alpha[:, 0].exp(), delta_f, weights, ln_w, ln_b,
                                      rule, grads)
            if lag_only:
                y, new, anchor = y_lag, list(lag), list(lag)
            else:
                y = torch.where(fresh, y_lag, y)
                new = [torch.where(fresh, w_lag, w) for w_lag, w in zip(lag, new)]
                anchor = [torch.where(fresh, w_lag, a) for w_lag, a in zip(lag, anchor)]
            if normalize_step:  # the rest of the chunk is normalized among itself
                grad_sum = choose(lambda: [torch.zeros_like(s) for s in grad_sum], grad_sum)
        y = y.view(B, H, d).to(q.dtype)

    # inside a chunk (fresh is False) the anchor and normalizers are the state's own tensors, returned as they
    # are: a caller that keeps its state in place (sample.make_step) then has nothing to copy back for them
    kept = fresh is False
    new_state = MemoryState(_unflat(B, H, new), state.anchor if kept else _unflat(B, H, anchor),
                            state.norm if kept else tuple(n.view(B, H) for n in norm),
                            _unflat(B, H, mom) if mom is not None else (), (pos + 1) % rule["chunk_size"],
                            _unflat(B, H, grad_sum) if normalize_step else ())
    return y, new_state
