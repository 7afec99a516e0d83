"""Tests of the Miras memory engine (memory_core.miras_memory / miras_memory_step).

The fast chunked path is checked against a slow token-by-token oracle (miras_memory_reference, which takes
every inner gradient with torch.autograd) for outputs, final state and outer gradients, against the exact
per-token recurrence of spec section 2 for chunk_size=1, for prefill + decoding consistency, under
torch.compile, autocast and float64, for robustness on large inputs / long sequences, and for input errors.
Shapes are tiny so the file runs in well under two minutes on one CPU core.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from memory_core import OBJECTIVES, RETENTIONS, MemoryState, miras_memory, miras_memory_step
from memory_reference import miras_memory_exact, miras_memory_reference

F64 = torch.float64


# ----------------------------------------------------------------------------------------------------
# inputs and helpers

def make_inputs(seed=0, B=2, H=2, T=9, d=4, E=2, retention="l2", memory="mlp", dtype=F64,
                scale=1.0):
    """Random inputs as the layer would produce them (q, k l2-normalized per head)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=g, dtype=F64)

    def rand(*s):
        return torch.rand(*s, generator=g, dtype=F64)

    q = F.normalize(randn(B, H, T, d), dim=-1) * scale
    k = F.normalize(randn(B, H, T, d), dim=-1) * scale
    v = randn(B, H, T, d) * scale
    eta = 0.05 + 0.45 * rand(B, H, T)
    alpha = 0.8 + 0.2 * rand(B, H, T)
    # huber thresholds: half in (0.2, 1) (the usual range), half in (2, 5): with ||e|| ~ 2-4 at these
    # scales, (0.2, 1) alone would almost never take the l2 branch; the mixture exercises both
    delta = torch.where(rand(B, H, T) < 0.5, 0.2 + 0.8 * rand(B, H, T), 2.0 + 3.0 * rand(B, H, T))
    momentum = 0.9 * rand(B, H, T).clamp_min(1e-3)          # mu in (0, 0.9)
    shapes = [(E * d, d), (d, E * d)] if memory == "mlp" else [(d, d)]
    if retention == "kl":  # positive, each row c * softmax(random logits), c = row length
        state = tuple(s[1] * torch.softmax(randn(B, H, *s), dim=-1) for s in shapes)
    else:
        state = tuple(0.3 * randn(B, H, *s) * scale for s in shapes)
    ln_weight = 1.0 + 0.1 * randn(H, d)
    ln_bias = 0.1 * randn(H, d)
    out = dict(q=q, k=k, v=v, eta=eta, alpha=alpha, state=state, ln_weight=ln_weight,
               ln_bias=ln_bias, delta=delta, momentum=momentum)
    if dtype != F64:
        out = {n: (tuple(s.to(dtype) for s in x) if isinstance(x, tuple) else x.to(dtype))
               for n, x in out.items()}
    return out


def call(fn, inp, *, objective="l2", retention="l2", use_momentum=False, **kw):
    """Call the fast path or the oracle with the inputs of make_inputs."""
    return fn(inp["q"], inp["k"], inp["v"], inp["eta"], inp["alpha"], inp["state"],
              inp["ln_weight"], inp["ln_bias"], objective=objective, retention=retention,
              delta=inp["delta"] if objective == "huber" else None,
              momentum=inp["momentum"] if use_momentum else None, **kw)


def grad_inputs(inp, objective, use_momentum):
    """The differentiable inputs that the config actually uses, made leaves requiring grad."""
    names = ["q", "k", "v", "eta", "alpha", "ln_weight", "ln_bias"]
    if objective == "huber":
        names.append("delta")
    if use_momentum:
        names.append("momentum")
    new = dict(inp)
    leaves = {}
    for n in names:
        new[n] = inp[n].detach().clone().requires_grad_(True)
        leaves[n] = new[n]
    new["state"] = tuple(s.detach().clone().requires_grad_(True) for s in inp["state"])
    for i, s in enumerate(new["state"]):
        leaves[f"state{i}"] = s
    return new, leaves


def outer_grads(fn, inp, leaves, cotangent_seed=123, **kw):
    """Gradients of a random linear functional of (y, final state) w.r.t. every leaf."""
    y, state = call(fn, inp, **kw)
    g = torch.Generator().manual_seed(cotangent_seed)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    for s in state:
        loss = loss + (s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum()
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return y, state, dict(zip(names, grads))


def assert_close(actual, expected, rtol=1e-8, atol=1e-9, what=""):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_state_close(actual, expected, rtol=1e-8, atol=1e-9, what="state"):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, rtol, atol, what=f"{what}[{i}]")


def as_f64(inp):
    """The same input values in float64: their exact result, for float32 tolerances (conftest.f32_tol)."""
    return {n: (tuple(s.double() for s in x) if isinstance(x, tuple) else x.double()) for n, x in inp.items()}


def mem_ops(T, d=4, E=2, b=4):
    """n_ops for f32_tol: T tokens in sequence through the mlp memory, each through reductions of summed length
    9d + 2Ed + b (key: W_in d, W_out E d, LayerNorm mean and variance 2d; back: LayerNorm 2d, W_out^T d;
    the update over a chunk b; query read: d + E d + 2d)."""
    return T * (9 * d + 2 * E * d + b)


def lengths(b):
    """T in {1, b-1, b, b+1, 3b+5}, valid and deduplicated."""
    return sorted({t for t in (1, b - 1, b, b + 1, 3 * b + 5) if t >= 1})


FORWARD_GRID = [(o, r, b, T) for o in OBJECTIVES for r in RETENTIONS for b in (1, 4, 16)
                for T in lengths(b)]


# ----------------------------------------------------------------------------------------------------
# the oracle itself

@pytest.mark.parametrize("objective,retention", list(itertools.product(OBJECTIVES, RETENTIONS)))
def test_reference_chunk1_is_exact_recurrence(objective, retention):
    """Oracle self-check: chunk_size=1 of the chunked semantics is the section-2 recurrence
    (kl: with the same 1e-6 log floor; lq: same trajectory, read with the previous norm factor)."""
    inp = make_inputs(1, T=6, retention=retention)
    y1, s1 = call(miras_memory_reference, inp, objective=objective, retention=retention, chunk_size=1)
    y2, s2 = call(miras_memory_exact, inp, objective=objective, retention=retention,
                  lq_read="previous", kl_log_floor=1e-6)
    assert_close(y1, y2, 1e-12, 1e-12, "y")
    assert_state_close(s1, s2, 1e-12, 1e-12)


def test_reference_gradcheck():
    """Oracle self-check: its outer gradients (through autograd.grad(create_graph=True)) are right."""
    for objective, retention, memory, mom in (("lp", "lq", "mlp", False), ("huber", "kl", "mlp", False),
                                              ("l2", "lq", "linear", True)):
        inp = make_inputs(2, B=1, H=1, T=3, d=3, retention=retention, memory=memory)
        inp, leaves = grad_inputs(inp, objective, mom)
        names = list(leaves)

        def f(*xs):
            x = dict(inp)
            for n, t in zip(names, xs):
                x[n] = t
            x["state"] = tuple(x[n] for n in names if n.startswith("state"))
            y, s = call(miras_memory_reference, x, objective=objective, retention=retention,
                        use_momentum=mom, chunk_size=2, memory=memory)
            return (y,) + tuple(s)

        assert torch.autograd.gradcheck(f, [leaves[n] for n in names], eps=1e-6, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# fast path == oracle: outputs and final state

@pytest.mark.parametrize("objective,retention,b,T", FORWARD_GRID)
def test_forward_matches_reference(objective, retention, b, T):
    inp = make_inputs(10 + T + b, T=T, retention=retention)
    y, s = call(miras_memory, inp, objective=objective, retention=retention, chunk_size=b)
    y_ref, s_ref = call(miras_memory_reference, inp, objective=objective, retention=retention,
                        chunk_size=b)
    assert y.dtype == F64 and y.shape == inp["q"].shape
    assert_close(y, y_ref, what="y")
    assert_state_close(s, s_ref)


@pytest.mark.parametrize("objective,retention", list(itertools.product(OBJECTIVES, RETENTIONS)))
def test_linear_memory_matches_reference(objective, retention):
    inp = make_inputs(20, T=11, retention=retention, memory="linear")
    for b in (1, 4):
        y, s = call(miras_memory, inp, objective=objective, retention=retention, chunk_size=b,
                    memory="linear")
        y_ref, s_ref = call(miras_memory_reference, inp, objective=objective, retention=retention,
                            chunk_size=b, memory="linear")
        assert len(s) == 1 and s[0].shape == inp["state"][0].shape
        assert_close(y, y_ref, what=f"y (b={b})")
        assert_state_close(s, s_ref)


@pytest.mark.parametrize("objective,retention,memory",
                         [(o, r, m) for o in OBJECTIVES for r in ("l2", "lq") for m in ("mlp", "linear")])
def test_momentum_matches_reference(objective, retention, memory):
    for b, T in ((1, 5), (4, 11), (16, 17)):
        inp = make_inputs(30 + T, T=T, retention=retention, memory=memory)
        y, s = call(miras_memory, inp, objective=objective, retention=retention, chunk_size=b,
                    memory=memory, use_momentum=True)
        y_ref, s_ref = call(miras_memory_reference, inp, objective=objective, retention=retention,
                            chunk_size=b, memory=memory, use_momentum=True)
        assert_close(y, y_ref, what=f"y (b={b}, T={T})")
        assert_state_close(s, s_ref)


def test_nondefault_hyperparameters_match_reference():
    for objective, retention, kw in (("lp", "lq", dict(p=2.5, q_norm=3.0, sharpness=4.0, eps=1e-4)),
                                     ("huber", "l2", dict(sharpness=3.0)),
                                     ("l2", "kl", dict(simplex_scale=2.0)),
                                     ("lp", "kl", dict(p=4.0, simplex_scale=1.0))):
        inp = make_inputs(40, T=10, retention=retention)
        if retention == "kl":  # rows on the simplex scaled by the chosen c
            c = kw["simplex_scale"]
            inp["state"] = tuple(s / s.shape[-1] * c for s in inp["state"])
        y, s = call(miras_memory, inp, objective=objective, retention=retention, chunk_size=4, **kw)
        y_ref, s_ref = call(miras_memory_reference, inp, objective=objective, retention=retention,
                            chunk_size=4, **kw)
        assert_close(y, y_ref, what=f"y ({objective}, {retention}, {kw})")
        assert_state_close(s, s_ref)


@pytest.mark.parametrize("retention", RETENTIONS)
def test_other_shapes_match_reference(retention):
    """B=1, H=3, odd d=3 with the default expansion E=4, and B=3, H=1, d=5, E=1 (square matrices)."""
    for B, H, d, E, objective in ((1, 3, 3, 4, "huber"), (3, 1, 5, 1, "lp")):
        inp = make_inputs(45, B=B, H=H, T=7, d=d, E=E, retention=retention)
        y, s = call(miras_memory, inp, objective=objective, retention=retention, chunk_size=3)
        y_ref, s_ref = call(miras_memory_reference, inp, objective=objective, retention=retention,
                            chunk_size=3)
        assert_close(y, y_ref, what=f"y (B={B}, H={H}, d={d}, E={E})")
        assert_state_close(s, s_ref)


# ----------------------------------------------------------------------------------------------------
# fast path == oracle: outer gradients

def check_gradients(objective, retention, b, T, memory="mlp", use_momentum=False, seed=50, **extra):
    """Fast path == oracle: outputs, state and every outer gradient (extra: further keywords of both calls)."""
    inp = make_inputs(seed, T=T, retention=retention, memory=memory)
    kw = dict(objective=objective, retention=retention, chunk_size=b, memory=memory,
              use_momentum=use_momentum, **extra)
    inp_f, leaves_f = grad_inputs(inp, objective, use_momentum)
    inp_r, leaves_r = grad_inputs(inp, objective, use_momentum)
    y, s, gf = outer_grads(miras_memory, inp_f, leaves_f, **kw)
    y_ref, s_ref, gr = outer_grads(miras_memory_reference, inp_r, leaves_r, **kw)
    assert_close(y, y_ref, what="y")
    assert_state_close(s, s_ref)
    for name in gr:
        assert gr[name] is not None, name
        assert gf[name] is not None, f"fast path gives no gradient for {name}"
        assert_close(gf[name], gr[name], rtol=1e-7, atol=1e-8, what=f"d/d{name}")


@pytest.mark.parametrize("objective,retention", list(itertools.product(OBJECTIVES, RETENTIONS)))
def test_gradients_match_reference(objective, retention):
    """Every objective x retention: three chunks, the last one partial (4 + 4 + 1)."""
    check_gradients(objective, retention, b=4, T=9)


@pytest.mark.parametrize("objective,retention,b,T", [
    ("l2", "l2", 1, 4), ("lp", "lq", 1, 4), ("l2", "kl", 1, 4),
    ("huber", "l2", 16, 17), ("lp", "lq", 16, 17), ("dot", "kl", 16, 17),
    ("lp", "lq", 4, 3), ("huber", "kl", 4, 5),
])
def test_gradients_other_chunk_sizes(objective, retention, b, T):
    check_gradients(objective, retention, b=b, T=T, seed=60 + b + T)


@pytest.mark.parametrize("objective,retention", [("l2", "l2"), ("huber", "lq"), ("lp", "kl")])
def test_gradients_linear_memory(objective, retention):
    check_gradients(objective, retention, b=4, T=6, memory="linear")


@pytest.mark.parametrize("objective,retention,memory", [
    ("l2", "l2", "mlp"), ("huber", "l2", "mlp"), ("lp", "lq", "mlp"), ("dot", "lq", "linear"),
])
def test_gradients_momentum(objective, retention, memory):
    check_gradients(objective, retention, b=4, T=9, memory=memory, use_momentum=True)


# ----------------------------------------------------------------------------------------------------
# chunk_size=1 == exact per-token recurrence (spec sections 2-3)

@pytest.mark.parametrize("objective,retention", list(itertools.product(OBJECTIVES, RETENTIONS)))
def test_chunk1_equals_exact_recurrence(objective, retention):
    inp = make_inputs(70, T=7, retention=retention)
    y, s = call(miras_memory, inp, objective=objective, retention=retention, chunk_size=1)
    if retention == "lq":
        # state trajectory exact; each token reads A_t / n(A_{t-1}) (normalization lands one token later)
        y_ex, s_ex = call(miras_memory_exact, inp, objective=objective, retention=retention,
                          lq_read="previous")
        y_cur, _ = call(miras_memory_exact, inp, objective=objective, retention=retention)
        assert not torch.allclose(y, y_cur, rtol=1e-6, atol=1e-6), "lq read should use n(A_{t-1})"
    elif retention == "kl":
        # exact up to the 1e-6 floor of the log (which lp's large steps can reach)
        y_ex, s_ex = call(miras_memory_exact, inp, objective=objective, retention=retention,
                          kl_log_floor=1e-6)
    else:
        y_ex, s_ex = call(miras_memory_exact, inp, objective=objective, retention=retention)
    assert_close(y, y_ex, what="y")
    assert_state_close(s, s_ex)


def test_chunk1_kl_equals_unfloored_softmax_recurrence():
    """Where the weights stay above the floor, chunk_size=1 kl is the plain mirror-descent recurrence."""
    for objective in ("l2", "dot", "huber", "lp"):
        inp = make_inputs(71, T=7, retention="kl")
        # smaller steps: with eta up to 0.5 the mirror step drives some W_in entries below 1e-6 in a
        # few tokens (LN's Jacobian is large when W_in x has a small spread), and the floor matters
        inp["eta"] = inp["eta"] * (0.02 if objective == "lp" else 0.2)
        y, s = call(miras_memory, inp, objective=objective, retention="kl", chunk_size=1)
        y_ex, s_ex = call(miras_memory_exact, inp, objective=objective, retention="kl")
        y_fl, s_fl = call(miras_memory_exact, inp, objective=objective, retention="kl", kl_log_floor=1e-6)
        assert torch.equal(y_ex, y_fl), "precondition: the log floor is never reached"
        assert_close(y, y_ex, what="y")
        assert_state_close(s, s_ex)
        assert all(bool((w > 0).all()) for w in s)


def test_chunk1_momentum_equals_exact_recurrence():
    for retention in ("l2", "lq"):
        inp = make_inputs(72, T=7, retention=retention)
        y, s = call(miras_memory, inp, objective="l2", retention=retention, chunk_size=1,
                    use_momentum=True)
        y_ex, s_ex = call(miras_memory_exact, inp, objective="l2", retention=retention,
                          use_momentum=True, lq_read="previous")
        assert_close(y, y_ex, what="y")
        assert_state_close(s, s_ex)


# ----------------------------------------------------------------------------------------------------
# prefill + token-by-token decoding == one call over the whole sequence

DECODE_CONFIGS = [  # (objective, retention, memory, momentum): every retention, the paper's models
    ("huber", "l2", "mlp", False),   # Yaad
    ("lp", "lq", "mlp", False),      # Moneta
    ("l2", "kl", "mlp", False),      # Memora
    ("dot", "kl", "linear", False),
    ("l2", "l2", "mlp", True),       # Titans-LMM
    ("lp", "lq", "mlp", True),
]
B_DEC = 4
SPLITS = (0, 1, B_DEC - 1, B_DEC, B_DEC + 2, 2 * B_DEC + 1, 3 * B_DEC + 2)


def time_slice(inp, a, b, state):
    """The inputs of tokens a..b-1 (every per-token tensor cut on its time axis), starting from `state`."""
    part = {key: (x[:, :, a:b] if torch.is_tensor(x) and x.dim() >= 3 else x) for key, x in inp.items()}
    part["state"] = state
    return part


def decode(inp, n, objective, retention, memory, use_momentum, b=B_DEC, step_fn=miras_memory_step,
           tensor_pos=False, host_chunk_start=False, **extra):
    """Prefill the first n tokens with miras_memory(MemoryState), then decode one token at a time (extra:
    further keywords of both calls; host_chunk_start: tell each step whether it starts a chunk)."""
    T = inp["q"].shape[2]
    st = MemoryState.start(inp["state"], momentum=use_momentum, retention=retention,
                           normalize_step=extra.get("normalize_step", False))
    kw = dict(objective=objective, retention=retention, chunk_size=b, memory=memory, **extra)
    ys = []
    if n > 0:
        y, st = call(miras_memory, time_slice(inp, 0, n, st), use_momentum=use_momentum, **kw)
        assert isinstance(st, MemoryState)
        ys.append(y)
    if tensor_pos:  # the position as a 0-dim tensor: one compiled graph for every step
        st = st._replace(pos=torch.tensor(st.pos))
    for t in range(n, T):
        tok = lambda x: x[:, :, t]  # noqa: E731
        host = dict(chunk_start=t % b == 0, check_values=True) if host_chunk_start else {}
        y, st = step_fn(tok(inp["q"]), tok(inp["k"]), tok(inp["v"]), tok(inp["eta"]), tok(inp["alpha"]),
                        st, inp["ln_weight"], inp["ln_bias"],
                        delta=tok(inp["delta"]) if objective == "huber" else None,
                        momentum=tok(inp["momentum"]) if use_momentum else None, **host, **kw)
        assert y.shape == inp["q"][:, :, 0].shape
        ys.append(y.unsqueeze(2))
    return torch.cat(ys, dim=2), st


@pytest.mark.parametrize("objective,retention,memory,use_momentum", DECODE_CONFIGS)
def test_prefill_then_decode_equals_full_pass(objective, retention, memory, use_momentum):
    T = 3 * B_DEC + 2
    inp = make_inputs(80, T=T, retention=retention, memory=memory)
    kw = dict(objective=objective, retention=retention, memory=memory, use_momentum=use_momentum,
              chunk_size=B_DEC)
    y_full, s_full = call(miras_memory, inp, **kw)
    y_ref, s_ref = call(miras_memory_reference, inp, **kw)
    assert_close(y_full, y_ref, what="full pass vs reference")
    assert_state_close(s_full, s_ref)
    for n in SPLITS:
        y, st = decode(inp, n, objective, retention, memory, use_momentum)
        assert_close(y, y_full, what=f"y, prefill {n}")
        assert_state_close(st.weights, s_full, what=f"weights, prefill {n}")


@pytest.mark.parametrize("objective,retention,memory,use_momentum", DECODE_CONFIGS[:4])
def test_chunked_prefill_any_cut(objective, retention, memory, use_momentum):
    """Several miras_memory calls carrying a MemoryState, cut anywhere, equal one call."""
    T = 3 * B_DEC + 2
    inp = make_inputs(81, T=T, retention=retention, memory=memory)
    kw = dict(objective=objective, retention=retention, memory=memory, use_momentum=use_momentum,
              chunk_size=B_DEC)
    y_full, s_full = call(miras_memory, inp, **kw)
    for cuts in ((1, 2, 7), (3, 9), (4, 8, 12), (5, 6, 13)):
        st = MemoryState.start(inp["state"], momentum=use_momentum, retention=retention)
        ys, bounds = [], (0,) + cuts + (T,)
        for a, b in zip(bounds[:-1], bounds[1:]):
            y, st = call(miras_memory, time_slice(inp, a, b, st), **kw)
            ys.append(y)
        assert_close(torch.cat(ys, dim=2), y_full, what=f"y, cuts {cuts}")
        assert_state_close(st.weights, s_full, what=f"weights, cuts {cuts}")


def test_decode_reaches_reference_long():
    """Pure decoding (no prefill) over several chunks matches the oracle for every retention."""
    for objective, retention in (("l2", "l2"), ("lp", "lq"), ("huber", "kl")):
        inp = make_inputs(82, T=11, retention=retention)
        y, st = decode(inp, 0, objective, retention, "mlp", False, b=3)
        y_ref, s_ref = call(miras_memory_reference, inp, objective=objective, retention=retention,
                            chunk_size=3)
        assert_close(y, y_ref, what=f"y {retention}")
        assert_state_close(st.weights, s_ref)


@pytest.mark.parametrize("host_chunk_start", [False, True])
@pytest.mark.parametrize("normalize_step", [False, "gain"])
@pytest.mark.parametrize("objective,retention,memory,use_momentum", DECODE_CONFIGS)
def test_decode_with_a_tensor_position_equals_full_pass(objective, retention, memory, use_momentum, normalize_step,
                                                        host_chunk_start):
    """The static-shape step (the position a tensor, as in a compiled step: torch.where picks the chunk-start
    refresh and kl's lag step; or, with chunk_start given, only the branch taken runs) run eagerly in float64
    reproduces the one-pass output and state, across chunk boundaries, after a prefill that ends mid-chunk."""
    T = 3 * B_DEC + 2
    inp = make_inputs(83, T=T, retention=retention, memory=memory)
    kw = dict(objective=objective, retention=retention, memory=memory, use_momentum=use_momentum,
              chunk_size=B_DEC, normalize_step=normalize_step)
    y_full, s_full = call(miras_memory, inp, **kw)
    y, st = decode(inp, B_DEC + 2, objective, retention, memory, use_momentum, tensor_pos=True,
                   host_chunk_start=host_chunk_start, normalize_step=normalize_step)
    assert torch.is_tensor(st.pos) and int(st.pos) == T % B_DEC
    assert_close(y, y_full, what="y, tensor position")
    assert_state_close(st.weights, s_full, what="weights, tensor position")


# ----------------------------------------------------------------------------------------------------
# torch.compile

def test_compile_matches_eager(f32_tol):
    torch._dynamo.reset()
    inp = make_inputs(90, T=6, retention="lq", dtype=torch.float32)   # one full chunk + a partial one
    kw = dict(objective="lp", retention="lq", chunk_size=4)
    y, s = call(miras_memory, inp, **kw)
    compiled = torch.compile(miras_memory, fullgraph=True)
    y_c, s_c = call(compiled, inp, **kw)
    # float32 by design (the compiled kernels that training runs): compiled and eager differ by rounding only,
    # bounded by f32_tol from the float64 result of the same values (magnitudes, eager's own float32 error)
    y64, s64 = call(miras_memory, as_f64(inp), **kw)
    seen = [(y, y64), *zip(s, s64)]
    assert_close(y_c, y, rtol=0, atol=f32_tol(y64, mem_ops(6), observed=seen), what="compiled y")
    for i, (a, e, x) in enumerate(zip(s_c, s, s64)):
        assert_close(a, e, rtol=0, atol=f32_tol(x, mem_ops(6), observed=seen), what=f"compiled state[{i}]")


def test_compiled_chunks_match_eager_with_gradients():
    """compile_chunks=True (each chunk through a compiled function, the loop in Python) == eager, outputs,
    state and outer gradients, in float64 (float32 kl is ill-conditioned enough that fused reorderings
    differ by ~1e-4 from eager, as eager does from float64); kl covers the compiled lag step too, and lq's
    p-norm link its read offset."""
    torch._dynamo.reset()
    for retention, objective, extra in (("lq", "lp", {}), ("kl", "huber", {}), ("lq", "lp", dict(link="pnorm"))):
        inp = make_inputs(92, T=8, retention=retention)  # two full chunks: one graph per piece kind
        inp, leaves = grad_inputs(inp, objective, False)
        kw = dict(objective=objective, retention=retention, chunk_size=4, **extra)
        y, s, g = outer_grads(miras_memory, inp, leaves, **kw)
        y_c, s_c, g_c = outer_grads(miras_memory, inp, leaves, compile_chunks=True, **kw)
        assert_close(y_c, y, rtol=1e-9, atol=1e-10, what="compiled-chunks y")
        assert_state_close(s_c, s, rtol=1e-9, atol=1e-10)
        for name in g:
            assert_close(g_c[name], g[name], rtol=1e-9, atol=1e-10, what=f"compiled-chunks grad {name}")


def test_compile_step_runs(f32_tol):
    torch._dynamo.reset()
    inp = make_inputs(91, T=6, retention="kl", dtype=torch.float32)
    compiled = torch.compile(miras_memory_step, fullgraph=True)
    y_c, s_c = decode(inp, 0, "l2", "kl", "mlp", False, b=4, step_fn=compiled, tensor_pos=True)
    y, s = decode(inp, 0, "l2", "kl", "mlp", False, b=4)
    assert torch.isfinite(y_c).all()
    # float32 (the compiled decode step that sampling runs). kl is ill-conditioned here (LayerNorm of the
    # near-uniform rows of a simplex state): eager float32 is ~100 eps * max|y| off float64, and a compiled
    # graph another such amount (6e-5 on one machine), so the tolerance takes eager's observed error
    y64, s64 = decode(as_f64(inp), 0, "l2", "kl", "mlp", False, b=4)
    seen = [(y, y64), *zip(s.weights, s64.weights)]
    assert_close(y_c, y, rtol=0, atol=f32_tol(y64, mem_ops(6), observed=seen), what="compiled step y")
    for i, (a, e, x) in enumerate(zip(s_c.weights, s.weights, s64.weights)):
        assert_close(a, e, rtol=0, atol=f32_tol(x, mem_ops(6), observed=seen), what=f"compiled state[{i}]")


# ----------------------------------------------------------------------------------------------------
# dtypes

def test_bf16_autocast_keeps_float32_state(f32_tol):
    inp = make_inputs(100, T=9, retention="lq", dtype=torch.float32)
    kw = dict(objective="lp", retention="lq", chunk_size=4)
    y32, s32 = call(miras_memory, inp, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = call(miras_memory, inp, **kw)
        # as in the layer: q, k, v come out of bf16 linears, the state is a float32 parameter
        low = dict(inp, q=inp["q"].bfloat16(), k=inp["k"].bfloat16(), v=inp["v"].bfloat16())
        y_low, s_low = call(miras_memory, low, **kw)
    for st in (s, s_low):
        assert all(w.dtype == torch.float32 for w in st)
        assert all(torch.isfinite(w).all() for w in st)
    assert torch.isfinite(y).all() and torch.isfinite(y_low.float()).all()
    # autocast is off inside the engine: float32 input takes the plain float32 arithmetic (rounding only)
    assert_close(y.float(), y32, rtol=0, atol=f32_tol(y32, mem_ops(9)), what="autocast y")
    # bf16 q, k, v are computed on in float32: y_low is the float32 result for the bf16-rounded inputs
    # (float32 rounding as in f32_tol, with eager's observed float32 error), rounded once to bf16 on the
    # way out (at most eps_bf16 / 2 relative)
    r = dict(as_f64(inp), **{n: inp[n].bfloat16().double() for n in "qkv"})
    y_r, _ = call(miras_memory, r, **kw)
    y64, _ = call(miras_memory, as_f64(inp), **kw)
    atol = f32_tol(y_r, mem_ops(9), observed=[(y32, y64)])
    assert_close(y_low.double(), y_r, rtol=torch.finfo(torch.bfloat16).eps / 2, atol=atol, what="bf16-input y")


def test_bf16_autocast_decode_step_keeps_float32_state():
    inp = make_inputs(101, T=3, retention="kl", dtype=torch.float32)
    st = MemoryState.start(inp["state"], retention="kl")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for t in range(3):
            y, st = miras_memory_step(inp["q"][:, :, t].bfloat16(), inp["k"][:, :, t].bfloat16(),
                                      inp["v"][:, :, t].bfloat16(), inp["eta"][:, :, t],
                                      inp["alpha"][:, :, t], st, inp["ln_weight"], inp["ln_bias"],
                                      retention="kl", chunk_size=2)
    assert all(w.dtype == torch.float32 for w in st.weights)
    assert torch.isfinite(y.float()).all()


@pytest.mark.parametrize("retention", RETENTIONS)
def test_float64_in_float64_out(retention):
    inp = make_inputs(102, T=5, retention=retention)
    y, s = call(miras_memory, inp, objective="l2", retention=retention, chunk_size=2)
    assert y.dtype == F64 and all(w.dtype == F64 for w in s)
    y, s = call(miras_memory, make_inputs(102, T=5, retention=retention, dtype=torch.float32),
                objective="l2", retention=retention, chunk_size=2)
    assert y.dtype == torch.float32 and all(w.dtype == torch.float32 for w in s)


# ----------------------------------------------------------------------------------------------------
# robustness

@pytest.mark.parametrize("objective,retention", [("lp", "l2"), ("lp", "lq"), ("l2", "lq"),
                                                 ("huber", "lq")])
def test_large_inputs_stay_finite(objective, retention):
    inp = make_inputs(110, T=40, d=8, retention=retention, dtype=torch.float32, scale=100.0)
    y, s = call(miras_memory, inp, objective=objective, retention=retention, chunk_size=16)
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(w).all() for w in s)


@pytest.mark.parametrize("objective,retention", [("lp", "lq"), ("huber", "l2"), ("l2", "kl")])
def test_long_sequence_stays_finite(objective, retention):
    T = 16384
    inp = make_inputs(111, B=1, H=1, T=T, d=8, E=2, retention=retention, dtype=torch.float32)
    y, s = call(miras_memory, inp, objective=objective, retention=retention, chunk_size=64)
    assert y.shape == (1, 1, T, 8)
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(w).all() for w in s)


def test_zero_lq_accumulator_forward():
    """A zero accumulator (n = eps^(q-2)) is a valid lq state: finite outputs, same as the oracle."""
    inp = make_inputs(113, T=6, retention="lq")
    inp["state"] = tuple(torch.zeros_like(s) for s in inp["state"])
    y, s = call(miras_memory, inp, objective="lp", retention="lq", chunk_size=4)
    y_ref, s_ref = call(miras_memory_reference, inp, objective="lp", retention="lq", chunk_size=4)
    assert torch.isfinite(y).all()
    assert_close(y, y_ref, what="y")
    assert_state_close(s, s_ref)


def test_zero_lq_accumulator_gradients():
    """n = max(||A||_q, eps)^(q-2) must have a finite gradient at A = 0 (floor before the q-th root)."""
    inp = make_inputs(113, T=6, retention="lq")
    inp["state"] = tuple(torch.zeros_like(s) for s in inp["state"])
    inp_f, leaves_f = grad_inputs(inp, "lp", False)
    inp_r, leaves_r = grad_inputs(inp, "lp", False)
    kw = dict(objective="lp", retention="lq", chunk_size=4)
    _, _, gf = outer_grads(miras_memory, inp_f, leaves_f, **kw)
    _, _, gr = outer_grads(miras_memory_reference, inp_r, leaves_r, **kw)
    for name in gr:
        assert torch.isfinite(gf[name]).all(), name
        assert_close(gf[name], gr[name], rtol=1e-7, atol=1e-8, what=f"d/d{name}")


def test_empty_prefill_keeps_state():
    """T = 0 (an empty prefill) returns an empty y and leaves a MemoryState unchanged."""
    inp = make_inputs(114, T=3, retention="lq")
    empty = time_slice(inp, 0, 0, MemoryState.start(inp["state"], retention="lq"))
    y, st = call(miras_memory, empty, objective="lp", retention="lq", chunk_size=4)
    assert y.shape == (2, 2, 0, 4)
    assert st.pos == 0
    assert_state_close(st.weights, inp["state"])


def test_alpha_one_is_allowed():
    inp = make_inputs(112, T=5)
    inp["alpha"] = torch.ones_like(inp["alpha"])
    y, s = call(miras_memory, inp, chunk_size=2)
    y_ref, s_ref = call(miras_memory_reference, inp, chunk_size=2)
    assert_close(y, y_ref, what="y")
    assert_state_close(s, s_ref)


# ----------------------------------------------------------------------------------------------------
# input errors

def _bad(inputs=None, retention_inputs="l2", **kwargs):
    """Valid inputs with some replaced (``inputs``) and some call keywords changed (``kwargs``)."""
    inp = make_inputs(120, T=5, retention=retention_inputs)
    inp.update(inputs or {})
    kw = dict(objective="l2", retention="l2", chunk_size=2, delta=None, momentum=None)
    kw.update(kwargs)
    return inp, kw


_V = make_inputs(120, T=5)
_VKL = make_inputs(120, T=5, retention="kl")
ERROR_CASES = {
    "k shape": lambda: _bad(dict(k=_V["k"][:, :, :4])),
    "v shape": lambda: _bad(dict(v=_V["v"][..., :3])),
    "q rank": lambda: _bad(dict(q=_V["q"][0])),
    "eta shape": lambda: _bad(dict(eta=_V["eta"][:, :, :4])),
    "alpha shape": lambda: _bad(dict(alpha=_V["alpha"][:, :1])),
    "state shape": lambda: _bad(dict(state=(_V["state"][0][:, :, :, :3], _V["state"][1]))),
    "state count": lambda: _bad(dict(state=(_V["state"][0],))),
    "ln shape": lambda: _bad(dict(ln_weight=_V["ln_weight"][:, :3])),
    "delta shape": lambda: _bad(objective="huber", delta=_V["delta"][:, :, :2]),
    "eta zero": lambda: _bad(dict(eta=_V["eta"].index_fill(2, torch.tensor([2]), 0.0))),
    "eta negative": lambda: _bad(dict(eta=-_V["eta"])),
    "alpha zero": lambda: _bad(dict(alpha=_V["alpha"].index_fill(2, torch.tensor([1]), 0.0))),
    "alpha above one": lambda: _bad(dict(alpha=_V["alpha"].index_fill(2, torch.tensor([3]), 1.5))),
    "kl state negative": lambda: _bad(dict(state=(_VKL["state"][0], -_VKL["state"][1])),
                                      retention="kl"),
    "kl state zero": lambda: _bad(dict(state=(_VKL["state"][0], torch.zeros_like(_VKL["state"][1]))),
                                  retention="kl"),
    "unknown objective": lambda: _bad(objective="l1"),
    "unknown retention": lambda: _bad(retention="elastic"),
    "unknown memory": lambda: _bad(memory="transformer"),
    "huber without delta": lambda: _bad(objective="huber"),
    "momentum with kl": lambda: _bad(retention_inputs="kl", retention="kl", momentum=_V["momentum"]),
}


def test_valid_error_baseline_runs():
    """The inputs the error cases start from are valid (so each case fails for its own reason)."""
    for ret in ("l2", "kl"):
        inp, kw = _bad(retention_inputs=ret, retention=ret)
        miras_memory(inp["q"], inp["k"], inp["v"], inp["eta"], inp["alpha"], inp["state"],
                     inp["ln_weight"], inp["ln_bias"], **kw)
    inp, kw = _bad(objective="huber", delta=_V["delta"], momentum=_V["momentum"])
    miras_memory(inp["q"], inp["k"], inp["v"], inp["eta"], inp["alpha"], inp["state"],
                 inp["ln_weight"], inp["ln_bias"], **kw)


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_invalid_inputs_raise_value_error(case):
    inp, kw = ERROR_CASES[case]()
    with pytest.raises(ValueError):
        miras_memory(inp["q"], inp["k"], inp["v"], inp["eta"], inp["alpha"], inp["state"],
                     inp["ln_weight"], inp["ln_bias"], **kw)


def test_step_rejects_plain_state():
    inp = make_inputs(121, T=1)
    with pytest.raises(ValueError):
        miras_memory_step(inp["q"][:, :, 0], inp["k"][:, :, 0], inp["v"][:, :, 0], inp["eta"][:, :, 0],
                          inp["alpha"][:, :, 0], inp["state"], inp["ln_weight"], inp["ln_bias"])


def test_step_rejects_a_chunk_start_its_position_contradicts():
    inp = make_inputs(122, T=1)
    st = MemoryState.start(inp["state"])._replace(pos=torch.tensor(3))
    args = (inp["q"][:, :, 0], inp["k"][:, :, 0], inp["v"][:, :, 0], inp["eta"][:, :, 0], inp["alpha"][:, :, 0], st,
            inp["ln_weight"], inp["ln_bias"])
    with pytest.raises(ValueError, match="chunk_start=True but the state is at position 3 of its chunk"):
        miras_memory_step(*args, chunk_start=True, check_values=True)
