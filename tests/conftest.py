"""Shared pytest setup: make the repository root importable (memory_core, model, ...)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from data.common import write_dataset  # noqa: E402

# Under pytest-xdist (README's test command runs two workers: the suite's time is mostly Inductor compiling, one
# core each) every worker computes on one thread, so that two workers do not oversubscribe a 2-core box
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def write_word_dataset(directory, n_sentences, seed=0):
    """A character-level dataset with structure a few training steps can pick up: three random words, then
    "the end.". Returns the directory as a string (train.py's --dataset accepts a directory)."""
    rng = np.random.default_rng(seed)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"]
    text = " ".join(" ".join(rng.choice(words, 3)) + " the end." for _ in range(n_sentences))
    itos = sorted(set(text))
    ids = np.array([itos.index(c) for c in text], dtype=np.uint16)
    n = int(len(ids) * 0.9)
    write_dataset(directory, ids[:n], ids[n:], {"tokenizer": "char", "vocab_size": len(itos), "itos": itos,
                                                 "eot": None})
    return str(directory)


@pytest.fixture
def one_thread():
    """Training-heavy tests run on one thread: on a shared 2-core box, oversubscribed threads are far slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def decode_graph_counter(monkeypatch):
    """sample.make_step, wherever the code under test calls it, compiles with a counting aot_eager backend instead
    of Inductor: the counter's frame_count is the number of decode graphs compiled (dynamo reset first)."""
    import sample
    from torch._dynamo.testing import CompileCounterWithBackend
    counter, make_step = CompileCounterWithBackend("aot_eager"), sample.make_step
    monkeypatch.setattr(sample, "make_step", lambda *a, **kw: make_step(*a, **kw, backend=counter))
    torch._dynamo.reset()
    return counter


@pytest.fixture
def chunks_on_aot_eager(monkeypatch):
    """memory_core's compiled chunks through aot_eager instead of Inductor (memory_core.CHUNK_BACKEND), in a cache of
    compiled chunk functions of their own (the process's is put back after, so that no other test runs these): for
    the tests whose subject is dynamo's graphs and guards or what surrounds the chunks, not Inductor's code for them,
    which was the suite's costliest compile on a cold cache. The tests that compare compiled chunks with eager run
    Inductor. Returns the backend, aot_eager counting the graphs it compiles (frame_count)."""
    import memory_core
    from torch._dynamo.testing import CompileCounterWithBackend
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(memory_core, "CHUNK_BACKEND", counter)
    monkeypatch.setattr(memory_core, "_COMPILED", {})
    return counter


# Tolerances for comparisons that must run in float32 / bfloat16 (compile vs eager, autocast). Exactness checks
# run in float64 instead: a float32 comparison with a hand-picked atol passes on one machine and fails on the
# next, because thread count, vectorization and fusion change the reduction order and so the rounding.
SQRT_FACTOR = 7.0      # lambda of the probabilistic bound below
OBSERVED_FACTOR = 4.0  # room over the error one float32 evaluation is seen to make


def f32_tol(exact, n_ops, dtype=torch.float32, observed=()):
    """Absolute tolerance for comparing two evaluations in `dtype` of one computation (compiled vs eager,
    autocast vs plain float32) whose exact value is `exact` (its float64 result; only its magnitude is used):

        n * eps(dtype) * max|exact|,   n = max(7 * sqrt(n_ops), 4 * n_observed)

    n_ops, stated by the caller, is the length of the chain of roundings an output is reached through (the
    tokens in sequence times the summed lengths of the reductions each token passes). A rounding is off by at most u = eps / 2
    relative; with roundings that behave as independent zero-mean errors, a chain of n of them is off by at
    most lambda * sqrt(n) * u relative with probability >= 1 - 2 n exp(-lambda^2 / 2) (Higham and Mary, SIAM
    J. Sci. Comput. 2019; the worst case is n * u), so two evaluations differ by at most
    lambda * sqrt(n) * eps * max|exact|; lambda = 7 keeps the odds of a false failure per element below 1e-6
    for n <= 1e4. A bug (a wrong term, branch, cast or chunk boundary) moves a result by >= 1e-3 relative,
    far above that (7 * sqrt(1e4) * eps = 8e-5).

    That model ignores conditioning (a LayerNorm of a vector with a small spread, a log near 0 or a mirror
    step amplifies one rounding many times). `observed` takes (value, exact) pairs of one `dtype` evaluation
    of the same computation (e.g. the eager float32 outputs and their float64 values): n_observed is their
    largest error in units of eps * max|exact|, what the computation really does. The factor 4: |a - b| <=
    |a - exact| + |b - exact|, where b is the observed evaluation and a (another reduction order, the same
    conditioning) may be up to 3x less accurate."""
    eps = torch.finfo(dtype).eps
    n = SQRT_FACTOR * n_ops ** 0.5
    for value, ref in observed:
        ref = ref.detach().double()
        scale = float(ref.abs().max())
        if scale > 0:
            err = float((value.detach().double() - ref).abs().max())
            n = max(n, OBSERVED_FACTOR * err / (eps * scale))
    return n * eps * float(exact.detach().double().abs().max())


@pytest.fixture(name="f32_tol")
def f32_tol_fixture():
    """f32_tol, for test files that do not import from conftest."""
    return f32_tol
