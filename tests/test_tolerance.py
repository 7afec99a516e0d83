"""conftest.f32_tol, the tolerance of every float32 comparison in the suite (compile vs eager, autocast): it
covers what reordering a float32 computation does, scales with the magnitudes (a fixed atol does not), stays
far below a bug, and with an observed float32 error covers an ill-conditioned computation too."""
import torch
import torch.nn.functional as F

from conftest import f32_tol

EPS = torch.finfo(torch.float32).eps


def sums(scale, n, seed=0):
    """Rows of n random float32 terms of size `scale`: their exact sums, and two float32 evaluations in
    different orders (torch.sum's vectorized blocks, and a sequential running sum)."""
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(64, n, generator=g, dtype=torch.float64)).float()
    return x, x.double().sum(-1), x.sum(-1), x.cumsum(-1)[:, -1]


def test_covers_reordered_float32_sums_at_every_scale():
    for scale in (1e-3, 1.0, 1e3):
        for n in (16, 256, 4096):
            _, exact, blocked, sequential = sums(scale, n)
            tol = f32_tol(exact, n)
            for a, b in ((blocked, sequential), (blocked, exact), (sequential, exact)):
                torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=tol, msg=f"scale {scale}, n {n}")
    # the same reordering at scale 1e3 is far beyond a hand-picked float32 atol like 1e-5 (the old
    # compile-vs-eager check): a fixed atol holds at one magnitude and fails at the next
    _, _, blocked, sequential = sums(1e3, 4096)
    assert (blocked - sequential).abs().max() > 1e-5


def test_far_below_a_bug():
    for n in (16, 256, 4096):
        x, exact, blocked, _ = sums(1.0, n)
        tol = f32_tol(exact, n)
        assert tol < 1e-3 * exact.abs().max()
        # one term 1% off (a wrong coefficient somewhere) is caught
        wrong = x.clone()
        wrong[:, 0] *= 1.01
        assert (wrong.sum(-1) - blocked).abs().max() > tol


def test_observed_error_covers_an_ill_conditioned_computation():
    """LayerNorm of rows with a small spread (1 + 1e-3 noise) amplifies the rounding of the mean ~1e3 times:
    two float32 evaluations differ by far more than the a-priori count allows, and by less than the
    tolerance taken from one evaluation's observed error against float64."""
    n = 64
    z = (1.0 + 1e-3 * torch.randn(256, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).float()
    exact = F.layer_norm(z.double(), (n,), eps=0.0)
    eager = F.layer_norm(z, (n,), eps=0.0)
    zc = z - z.cumsum(-1)[:, -1:] / n  # the same, with sequential sums
    other = zc / ((zc * zc).cumsum(-1)[:, -1:] / n).sqrt()
    diff = (eager - other).abs().max()
    assert diff > f32_tol(exact, 3 * n)  # mean, variance, normalize: the count misses the conditioning
    assert diff <= f32_tol(exact, 3 * n, observed=[(eager, exact)])
    assert f32_tol(exact, 3 * n, observed=[(eager, exact)]) < 1e-3 * exact.abs().max()
