"""The lq retention's p-norm link (link="pnorm", section 5.2, Variant 4) against its oracles, in float64.

W = f_r(A) with r = q / (q - 1); inside a chunk tokens read W_c + (A_t - A_c) / n with the radial slope
1 / n = ||W_c|| / ||A_c|| frozen at the chunk start (model_moneta.LqRetention). Held here to: the link's own
algebra, the chunked oracle (forward, state, outer gradients), chunk_size = 1 == the per-token recurrence,
prefill + decode == one pass, and the one-line errors (compiled chunks: tests/test_memory_core.py)."""
import pytest
import torch

from memory_core import OBJECTIVES, miras_memory
from memory_reference import miras_memory_exact, miras_memory_reference
from model_moneta import conjugate, pnorm_link
from models import build_model, make_config
from test_memory_core import (SPLITS, assert_close, assert_state_close, call, check_gradients, decode, lengths,
                              make_inputs)

PNORM = dict(retention="lq", link="pnorm")


def test_link_is_invertible_and_homogeneous_of_degree_one():
    a = torch.randn(3, 2, 8, 5, dtype=torch.float64)
    w = pnorm_link(a, conjugate(4.0), 1e-6)
    assert_close(pnorm_link(w, 4.0, 1e-6), a, 1e-12, 1e-14, "f_q(f_r(A))")
    assert_close(pnorm_link(2.5 * a, conjugate(4.0), 1e-6), 2.5 * w, 1e-12, 1e-14, "f_r(cA)")
    # the printed link A / ||A||_4^2 is homogeneous of degree -1: a larger accumulator gives smaller weights
    printed = lambda x: x / x.pow(4).sum((-1, -2), keepdim=True).sqrt()  # noqa: E731
    assert_close(printed(2.5 * a), printed(a) / 2.5, 1e-12, 1e-14, "printed link")
    # the link keeps signs and the order of magnitudes entry by entry, and maps 0 to 0 with a finite gradient
    assert torch.equal(torch.sign(w), torch.sign(a))
    z = torch.zeros(1, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(pnorm_link(z, conjugate(4.0), 1e-6).sum(), z)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_chunk1_equals_exact_recurrence(objective):
    """chunk_size = 1: the state trajectory A_t is the per-token rule's; token t reads through the previous
    token's linearized link (the link lands one token later), which differs from reading f_r(A_t)."""
    inp = make_inputs(170, T=7, retention="lq")
    y, s = call(miras_memory, inp, objective=objective, chunk_size=1, **PNORM)
    y_ref, s_ref = call(miras_memory_reference, inp, objective=objective, chunk_size=1, **PNORM)
    y_ex, s_ex = call(miras_memory_exact, inp, objective=objective, lq_read="previous", **PNORM)
    y_cur, _ = call(miras_memory_exact, inp, objective=objective, **PNORM)
    for got in (y, y_ref):
        assert_close(got, y_ex, what="y")
    for st in (s, s_ref):
        assert_state_close(st, s_ex)
    assert not torch.allclose(y, y_cur, rtol=1e-6, atol=1e-6)
    y_printed, _ = call(miras_memory, inp, objective=objective, retention="lq", chunk_size=1)
    assert not torch.allclose(y, y_printed, rtol=1e-3, atol=1e-3), "the link must change the function"


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("memory", ["mlp", "linear"])
def test_forward_matches_reference(objective, memory):
    for b in (1, 4, 16):
        for T in lengths(b):
            inp = make_inputs(171 + T + b, T=T, retention="lq", memory=memory)
            y, s = call(miras_memory, inp, objective=objective, chunk_size=b, memory=memory, **PNORM)
            y_ref, s_ref = call(miras_memory_reference, inp, objective=objective, chunk_size=b, memory=memory,
                                **PNORM)
            assert_close(y, y_ref, what=f"y (b={b}, T={T})")
            assert_state_close(s, s_ref)


@pytest.mark.parametrize("objective,b,T,use_momentum,normalize_step", [
    ("lp", 4, 9, False, False), ("l2", 1, 4, False, False), ("huber", 16, 17, False, False),
    ("lp", 4, 9, True, False), ("lp", 4, 9, False, True), ("dot", 4, 6, False, True)])
def test_gradients_match_reference(objective, b, T, use_momentum, normalize_step):
    check_gradients(objective, "lq", b, T, use_momentum=use_momentum, seed=180 + T, normalize_step=normalize_step,
                    link="pnorm")


@pytest.mark.parametrize("objective,memory,use_momentum,normalize_step", [
    ("lp", "mlp", False, False), ("lp", "mlp", True, False), ("lp", "mlp", False, True),
    ("l2", "linear", False, True)])
def test_prefill_then_decode_equals_full_pass(objective, memory, use_momentum, normalize_step):
    T = 14
    inp = make_inputs(190, T=T, retention="lq", memory=memory)
    kw = dict(objective=objective, memory=memory, use_momentum=use_momentum, chunk_size=4,
              normalize_step=normalize_step, **PNORM)
    y_full, s_full = call(miras_memory, inp, **kw)
    y_ref, s_ref = call(miras_memory_reference, inp, **kw)
    assert_close(y_full, y_ref, what="full pass vs reference")
    assert_state_close(s_full, s_ref)
    for n in SPLITS:
        y, st = decode(inp, n, objective, "lq", memory, use_momentum, link="pnorm", normalize_step=normalize_step)
        assert_close(y, y_full, what=f"y, prefill {n}")
        assert_state_close(st.weights, s_full, what=f"weights, prefill {n}")


def test_bad_link_is_a_one_line_error():
    inp = make_inputs(192, T=3, retention="l2")
    with pytest.raises(ValueError, match="does not apply to retention 'l2'"):
        call(miras_memory, inp, retention="l2", link="pnorm")
    with pytest.raises(ValueError, match=r"use one of \('printed', 'pnorm'\)"):
        call(miras_memory, make_inputs(192, T=3, retention="lq"), retention="lq", link="pnrom")
    with pytest.raises(ValueError, match="needs q_norm > 1"):
        call(miras_memory, make_inputs(192, T=3, retention="lq"), retention="lq", link="pnorm", q_norm=1.0)
    with pytest.raises(ValueError, match="lq_link='dual'"):
        make_config("moneta", "tiny", lq_link="dual")


def test_model_starts_from_fan_in_weights():
    """Moneta with the p-norm link learns its initial weights W_0 (fan-in scale) and starts the accumulator at
    f_q(W_0), so the first chunk's anchor f_r(A_0) is W_0 itself."""
    torch.manual_seed(0)
    model = build_model(make_config("moneta", "tiny", lq_link="pnorm", n_layer=1, vocab_size=11))
    layer = next(m for m in model.modules() if hasattr(m, "mem_init"))
    for w0, a0 in zip(layer.mem_init, layer.initial_weights(1)):
        assert abs(w0.std().item() * w0.shape[-1] ** 0.5 - 1.0) < 0.1
        assert_close(pnorm_link(a0[0], conjugate(4.0), 1e-6), w0.detach(), 1e-5, 1e-7, "f_r(A_0) = W_0")
