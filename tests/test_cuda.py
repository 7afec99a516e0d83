"""The CUDA paths, on an NVIDIA GPU (skipped without one; `.ci/gpu` runs them with the GPU benchmarks): the
memory op in float32 on the GPU against float64 on the CPU, eager and with compiled chunks; a compiled bf16
training step of every model that then evaluates at another batch size (as DDP ranks do); training and decode
steps that never synchronize with the GPU; compiled decoding against eager; a short train.py run (bf16, compile,
fused AdamW) and its resume; bench.py's spawned CUDA workers; torchrun with NCCL where there are two GPUs."""
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import memory_core
import sample
import train
from conftest import f32_tol, write_word_dataset
from models import build_model
from test_memory_core import call, make_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (.ci/gpu runs these)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.device("cuda")
MODELS = ("moneta", "yaad", "memora", "transformer")
# each model's rule at its defaults (model_*.py): retention, objective, step normalization
RULES = [("lq", "lp", False), ("l2", "huber", "gain"), ("kl", "l2", "gain")]


def _to(inp, device, dtype):
    return {n: (tuple(s.to(device, dtype).requires_grad_() for s in x) if isinstance(x, tuple)
                else x.to(device, dtype).requires_grad_()) for n, x in inp.items()}


def _grads(inp, kw):
    y, _ = call(memory_core.miras_memory, inp, **kw)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device, y.dtype)
    loss = (y * weight).sum()
    names = [n for n in ("q", "k", "v", "eta", "alpha", "ln_weight", "ln_bias") if inp[n].requires_grad]
    return y, dict(zip(names, torch.autograd.grad(loss, [inp[n] for n in names])))


@pytest.mark.parametrize("retention,objective,norm", RULES)
@pytest.mark.parametrize("compile_chunks", [False, True])
def test_op_on_cuda_equals_cpu_float64(retention, objective, norm, compile_chunks):
    """float32 on the GPU (IEEE matmuls: fast_float32's TF32 is not set here) against float64 on the CPU, within
    the float32 bound of conftest.f32_tol (n_ops: 37 tokens in sequence through the memory, 9d + 2Ed + b; on
    CUDA a group of four chunks, memory_core.CHUNKS_PER_GROUP, then a padded one alone)."""
    inp = make_inputs(3, B=2, H=2, T=37, d=16, E=4, retention=retention)
    kw = dict(objective=objective, retention=retention, chunk_size=8, normalize_step=norm, check_values=False)
    y64, g64 = _grads(_to(inp, "cpu", torch.float64), kw)
    y32, g32 = _grads(_to(inp, "cpu", torch.float32), kw)
    y, g = _grads(_to(inp, CUDA, torch.float32), dict(kw, compile_chunks=compile_chunks))
    n_ops = 37 * (9 * 16 + 2 * 64 + 8)
    torch.testing.assert_close(y.cpu().double(), y64, rtol=0, atol=f32_tol(y64, n_ops, observed=[(y32, y64)]))
    for n in g64:
        torch.testing.assert_close(g[n].cpu().double(), g64[n], rtol=0,
                                   atol=f32_tol(g64[n], n_ops, observed=[(g32[n], g64[n])]), msg=f"d/d{n}")


@pytest.mark.parametrize("name", MODELS)
def test_compiled_bf16_train_step_then_eval_at_another_batch(name):
    """torch.compile of a whole model under bf16 autocast: a training step at batch 2 gives eager's loss (bf16
    rounding apart) and finite gradients, and an evaluation at batch 4 (a DDP rank trains on batch / world rows
    and evaluates on batch rows: dynamo marks the size dynamic) runs too."""
    torch.manual_seed(0)
    model = build_model(name, "tiny", vocab_size=64, block_size=128).to(CUDA)
    compiled = torch.compile(model)
    idx = torch.randint(64, (4, 129), device=CUDA)
    x, y = idx[:2, :-1], idx[:2, 1:]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss_e = model(x, y)
        _, loss_c = compiled(x, y)
    loss_c.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert abs(loss_c.item() - loss_e.item()) < 2e-2 * abs(loss_e.item())
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss4 = compiled(idx[:, :-1], idx[:, 1:])
    assert torch.isfinite(loss4)


@pytest.mark.parametrize("name", ["moneta", "memora"])  # lq and kl (its exact first step); Yaad's l2 on the CPU
def test_train_and_decode_steps_never_synchronize(name):
    """The engine issue's rule that nothing in the chunk loop makes the host wait on the GPU (what capturing it as
    CUDA graphs needs), on the device itself: after warm-up calls that compile the memory's chunks (compile_memory
    None: compiled on CUDA), a training step (forward + backward, T = 150: two whole chunks and a partial one) and
    eight eager decode steps across a chunk boundary run under torch.cuda.set_sync_debug_mode("error"), which
    raises at any call that synchronizes with the GPU. tests/test_recompute.py checks the same op by op on a CPU."""
    torch.manual_seed(0)
    model = build_model(name, "tiny", vocab_size=64, block_size=300).to(CUDA)
    idx = torch.randint(64, (2, 151), device=CUDA)
    step = sample.make_step(model)

    def train_step():
        model.train()
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()

    def prefilled():
        model.eval()
        cache = model.init_cache(1, 300)
        with torch.no_grad():
            model.prefill(idx[:1, :60], cache)
        return cache

    def decode(cache):
        model.eval()
        with torch.no_grad():
            tok = idx[:1, 60:61]
            for _ in range(8):  # positions 60-67: a chunk's first token (64) among them
                tok, _ = step(tok, cache)

    for _ in range(2):  # compiles every chunk graph these calls use
        train_step()
        decode(prefilled())
    cache = prefilled()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step()
        decode(cache)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name, mode, regions", [(m, "default", None) for m in MODELS] +
                         [("moneta", "default", False), ("moneta", "reduce-overhead", None),
                          ("transformer", "reduce-overhead", None)])
def test_compiled_decode_on_cuda_matches_eager(name, mode, regions):
    """sample.make_step compiled on the GPU (float32; by block regions, CUDA's default, and once whole;
    reduce-overhead: replayed as a CUDA graph over the state
    buffers it writes in place, none skipped) against the eager step over 40 tokens that cross chunk
    boundaries after a 30-token prefill, all three following the eager tokens: the same logits within the float32
    bound of conftest.f32_tol from a float64 copy (n_ops: the 70 tokens in sequence, each through the memory,
    9d + 2Ed + b = 608 for d = 32, E = 4, b = 64, and ~3,700 of dense reductions: 4 layers of 128-wide
    projections and a 512-wide MLP, and the head)."""
    from torch._dynamo.utils import counters
    counters.clear()
    torch.manual_seed(0)
    model = build_model(name, "tiny", vocab_size=64, block_size=128).to(CUDA).eval()
    m64 = build_model(name, "tiny", vocab_size=64, block_size=128).to(CUDA).double().eval()
    m64.load_state_dict(model.state_dict())
    prompt = torch.randint(64, (1, 30), device=CUDA)
    caches = [model.init_cache(1, 80), model.init_cache(1, 80), m64.init_cache(1, 80)]
    steps = [sample.make_step(model), sample.make_step(model, compile=True, compile_mode=mode, regions=regions),
             sample.make_step(m64)]
    assert steps[1].regions is (regions is None)
    n_ops = 70 * (608 + 3700)
    with torch.no_grad():
        tok = model.prefill(prompt, caches[0])[0][:, -1:].argmax(-1)
        model.prefill(prompt, caches[1])
        m64.prefill(prompt, caches[2])
        for i in range(40):
            (nxt, l_e), (_, l_c), (_, l64) = (step(tok, cache) for step, cache in zip(steps, caches))
            tol = f32_tol(l64, n_ops, observed=[(l_e, l64)])
            torch.testing.assert_close(l_c.double(), l_e.double(), rtol=0, atol=tol, msg=f"compiled step {i}")
            tok = nxt  # all three follow the eager tokens
    assert counters["inductor"]["cudagraph_skips"] == 0


def test_train_py_bf16_compiled_and_resumed(tmp_path, capsys):
    data = write_word_dataset(tmp_path / "data", 1500)
    out = tmp_path / "out"
    common = [f"--dataset={data}", f"--out_dir={out}", "--n_layer=2", "--n_embd=64", "--n_head=2", "--block_size=64",
              "--batch_size=8", "--eval_interval=10", "--eval_iters=2", "--log_interval=5", "--learning_rate=3e-3",
              "--lr_decay_iters=30"]
    assert train.main([*common, "--max_iters=20"]) == 0
    assert "device cuda:0, dtype bfloat16, compile True (auto)" in capsys.readouterr().out
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0]
    assert train.main([*common, "--max_iters=30", "--init_from=resume"]) == 0
    assert train.load_checkpoint(out / "ckpt.pt")["iter_num"] == 30


def test_train_py_cuda_graphs_give_the_default_modes_losses(tmp_path, capsys):
    """--compile_mode=reduce-overhead (the compiled forward and backward replayed as CUDA graphs, the Miras chunk
    loop's kernels included) trains as the default mode does: the same kernels, so the same losses up to
    float32 reduction order, with two micro-steps per step and an evaluation (each a new replay)."""
    from torch._dynamo.utils import counters
    data = write_word_dataset(tmp_path / "data", 1500)
    losses = {}
    for mode in ("default", "reduce-overhead"):
        counters.clear()
        out = tmp_path / mode
        assert train.main([f"--dataset={data}", f"--out_dir={out}", "--n_layer=2", "--n_embd=64", "--n_head=2",
                           "--block_size=64", "--batch_size=4", "--gradient_accumulation_steps=2", "--dtype=float32",
                           "--max_iters=8", "--eval_interval=8", "--eval_iters=2", "--log_interval=1",
                           "--compile=true", f"--compile_mode={mode}"]) == 0
        assert (f", mode {mode}," in capsys.readouterr().out) == (mode != "default")
        log = [json.loads(line) for line in open(out / "log.jsonl")]
        losses[mode] = [r["loss"] for r in log if "loss" in r] + [r["val_loss"] for r in log if "val_loss" in r]
    assert counters["inductor"]["cudagraph_skips"] == 0  # the graphs were captured, not skipped
    assert len(losses["default"]) == 9
    torch.testing.assert_close(losses["reduce-overhead"], losses["default"], rtol=1e-4, atol=0)


def test_bench_spawned_cuda_workers(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--models=moneta,transformer", "--seq_lens=128", "--model_preset=tiny", "--vocab_size=256",
                       "--tokens_per_step=512", "--decode_tokens=4", "--repeats=1", "--warmup=1", "--profile=true",
                       f"--json={out}"]) == 0
    records = json.loads(out.read_text())["records"]
    assert {(r["model"], r["mode"]) for r in records} == {(m, x) for m in ("moneta", "transformer")
                                                          for x in ("train", "prefill", "decode")}
    for r in records:
        assert "error" not in r and "oom" not in r, r
        assert r["tokens_per_s"] > 0 and r["peak_mem_bytes"] > 0, r
        p = r["profile"]  # the kernels a warm call ran on the GPU, and the host calls that launched them
        assert p["kernels"] > 0 and p["launches"] > 0 and 0 < p["kernel_s"] and 0 < p["busy_fraction"], p
        if r["model"] == "moneta" and r["mode"] == "train":
            assert p["memory_op"]["calls"] == 2 * 4 and p["memory_op"]["device_s"] > 0, p


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_torchrun_nccl_two_gpus(tmp_path):
    data = write_word_dataset(tmp_path / "data", 1500)
    args = [f"--dataset={data}", "--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=32", "--batch_size=4",
            "--max_iters=6", "--eval_interval=3", "--eval_iters=2", f"--out_dir={tmp_path / 'two'}"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=600,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(train.load_checkpoint(tmp_path / "two" / "ckpt.pt")["rng_states"]) == 2
