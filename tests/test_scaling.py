"""scaling.py: the micro grid runs end to end on a synthetic char dataset, writes valid JSON (every field) and
the plots; a second invocation reuses the cache (training is monkeypatched to fail); a failed run is
recorded and does not stop the others; the power-law fit."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import scaling
import train
from conftest import write_word_dataset

FIELDS = ["key", "model", "size", "sweeps", "n_params", "n_params_non_embedding", "flops_per_token", "block_size",
          "tokens_trained", "train_flops", "val_loss", "val_ppl", "wall_s", "config", "n_layer", "n_embd"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_word_dataset(tmp_path_factory.mktemp("data"), 600)


def _no_training(*a, **k):
    raise AssertionError("training must not run: every run is cached")


def test_micro_grid_end_to_end_and_cache(tmp_path, dataset, monkeypatch):
    out = tmp_path / "out"
    argv = ["--grid=micro", f"--out={out}", f"--dataset={dataset}"]
    assert scaling.main(argv) == 0
    grid_dir = out / "micro"
    res = json.loads((grid_dir / "results.json").read_text())
    recs = res["records"]
    assert len(recs) == 8 and not res["failed"] and not res["pending"]
    assert {r["model"] for r in recs} == {"moneta", "transformer"}
    assert {r["block_size"] for r in recs} == {16, 32} and len({r["size"] for r in recs}) == 2
    for r in recs:
        for f in FIELDS:
            assert f in r and r[f] is not None, f
        assert math.isfinite(r["val_loss"]) and r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert r["tokens_trained"] == 3 * 64 and r["n_params"] > r["n_params_non_embedding"] > 0
        assert r["train_flops"] == r["flops_per_token"] * r["tokens_trained"]
    per_pos = json.loads((grid_dir / "per_position.json").read_text())
    assert set(per_pos) == {r["key"] for r in recs}
    for r in recs:
        losses = per_pos[r["key"]]["per_position"]
        assert len(losses) == r["block_size"]
        assert np.mean(losses) == pytest.approx(r["val_loss"], rel=1e-6)
        balanced = per_pos[r["key"]]["per_position_balanced"]
        assert len(balanced) == r["block_size"] and all(math.isfinite(x) for x in balanced)
        assert per_pos[r["key"]]["balanced_bin"] == r["block_size"] // scaling.POSITION_SHIFTS
    for name in ("scaling_params.png", "scaling_flops.png", "scaling_context.png", "per_position.png"):
        data = (grid_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name
    assert set(res["summary"]["power_law"]) == {"moneta", "transformer"}
    assert not list((out / "cache").glob("*/ckpt*.pt"))  # checkpoints removed after the evaluation

    # second invocation: everything from the cache, no training at all
    monkeypatch.setattr(train, "train", _no_training)
    monkeypatch.setattr(scaling.train_mod, "train", _no_training)
    assert scaling.main(argv) == 0
    res2 = json.loads((grid_dir / "results.json").read_text())
    assert [r["key"] for r in res2["records"]] == [r["key"] for r in recs]
    assert [r["val_loss"] for r in res2["records"]] == [r["val_loss"] for r in recs]


def test_sizes_filter_and_kept_checkpoints(tmp_path, dataset):
    """--sizes runs only the grid's runs of those sizes; --keep_ckpt keeps each run's checkpoint (what eval.py
    scores); a size the grid lacks is a one-line error naming its sizes."""
    out = tmp_path / "out"
    assert scaling.main(["--grid=micro", f"--out={out}", f"--dataset={dataset}", "--sizes=b", "--keep_ckpt",
                         "--no_plots"]) == 0
    recs = json.loads((out / "micro_sizes_b" / "results.json").read_text())["records"]
    assert {r["size"] for r in recs} == {"b"} and len(recs) == 4 and not (out / "micro").exists()
    assert len(list((out / "cache").glob("*/ckpt.pt"))) == 4
    with pytest.raises(SystemExit, match="has no size xl; its sizes: a, b"):
        scaling.main(["--grid=micro", f"--out={out}", f"--dataset={dataset}", "--sizes=b,xl"])


def test_failed_run_is_recorded_and_others_go_on(tmp_path, dataset, monkeypatch):
    real = train.train

    def flaky(cfg):
        if cfg.block_size == 32:
            raise RuntimeError("boom")
        return real(cfg)

    monkeypatch.setattr(scaling.train_mod, "train", flaky)
    res = scaling.run_grid("micro", ["transformer"], out=tmp_path / "o", dataset=dataset, log=lambda *a: None)
    assert len(res["records"]) == 2 and len(res["failed"]) == 2
    assert all("boom" in f["error"] for f in res["failed"])
    saved = json.loads((tmp_path / "o" / "micro" / "results.json").read_text())
    assert len(saved["failed"]) == 2 and len(saved["records"]) == 2
    # without training (--plots_only) they stay failures, not pending runs
    res = scaling.run_grid("micro", ["transformer"], out=tmp_path / "o", dataset=dataset, log=lambda *a: None,
                           plots=False, plots_only=True)
    assert len(res["records"]) == 2 and len(res["failed"]) == 2 and not res["pending"]
    assert "boom" in (tmp_path / "o" / "micro" / "summary.md").read_text()
    # the failed runs are retried next time; the finished ones come from the cache
    monkeypatch.setattr(scaling.train_mod, "train", real)
    res = scaling.run_grid("micro", ["transformer"], out=tmp_path / "o", dataset=dataset, log=lambda *a: None,
                           plots=False)
    assert len(res["records"]) == 4 and not res["failed"]


def test_power_law_fit_and_grids():
    n = np.array([1e4, 3e4, 1e5, 3e5])
    a, b = scaling.fit_power_law(n, 5.0 * n ** -0.07)
    assert a == pytest.approx(5.0) and b == pytest.approx(0.07)
    cpu = scaling.grid_cpu(scaling.ALL_MODELS)
    for m in scaling.ALL_MODELS:
        mine = [s for s in cpu if s["config"]["model"] == m]
        sizes = {s["size"] for s in mine if "size" in s["sweeps"]}
        ctx = {s["config"]["block_size"] for s in mine if "context" in s["sweeps"]}
        assert len(sizes) >= 4 and len(ctx) >= 4 and min(ctx) == 64 and max(ctx) == 1024
    assert len({s["config"]["max_iters"] * s["config"]["batch_size"] * s["config"]["block_size"] for s in cpu}) == 1
    keys = {scaling.cache_key(s["config"]) for s in cpu}
    abl = scaling.grid_ablation(["moneta"])
    assert len(abl) == 12 and sum(scaling.cache_key(s["config"]) in keys for s in abl) == 3  # p=3,q=4 (T=256, 1024)
    check = scaling.grid_context_check(["transformer"])
    assert len(check) == 6 and {s["config"]["block_size"] for s in check} == {1024}
    check_keys = {scaling.cache_key(s["config"]) for s in check}
    shared_with_check = 0
    for name, dataset in (("bpe", "shakespeare_compact"), ("code", "torch_code")):
        grid = scaling.GRIDS[name](scaling.ALL_MODELS)
        assert {s["config"]["dataset"] for s in grid} == {dataset}
        for m in scaling.ALL_MODELS:
            mine = [s for s in grid if s["config"]["model"] == m]
            assert len({s["size"] for s in mine if "size" in s["sweeps"]}) >= 4
            assert sorted(s["config"]["block_size"] for s in mine if "context" in s["sweeps"]) == [128, 256, 512, 1024]
        grid_keys = [scaling.cache_key(s["config"]) for s in grid]
        assert len(set(grid_keys)) == len(grid)  # no run listed twice
        assert grid[0]["config"]["block_size"] == 1024  # the per-position check comes first
        n_context = sum(s["size"] == "s" for s in grid)
        assert all(s["size"] == "s" for s in grid[:n_context])  # then the rest of the context sweep, then sizes
        abl = scaling.GRIDS[f"{name}_ablation"](["moneta"])
        assert len(abl) == 14 and sum(scaling.cache_key(s["config"]) in grid_keys for s in abl) == 2  # p=3, q=4
        seeds = scaling.GRIDS[f"{name}_seeds"](scaling.ALL_MODELS)
        assert sum(scaling.cache_key(s["config"]) in grid_keys for s in seeds) == len(scaling.ALL_MODELS)
        shared_with_check += len(check_keys & set(grid_keys))
    assert len(check_keys & keys) + shared_with_check == 3  # the 1x runs are the grids'
    bpe_4x = scaling.GRIDS["bpe_4x"](scaling.ALL_MODELS)  # the BPE context sweep at the check's 4x budget
    assert len(bpe_4x) == 16 and {s["config"]["max_iters"] for s in bpe_4x} == {1024}
    assert sorted({s["config"]["block_size"] for s in bpe_4x}) == [128, 256, 512, 1024]
    assert bpe_4x[0]["config"]["block_size"] == 1024 and all(s["size"] == "s" for s in bpe_4x)
    assert len(check_keys & {scaling.cache_key(s["config"]) for s in bpe_4x}) == 1  # the BPE Transformer++ at 4x
    paper = scaling.grid_paper(scaling.ALL_MODELS)
    cmd = scaling.torchrun_command(scaling.train_config(paper[0]["config"], "out-x"), 8)
    assert cmd[:4] == ["torchrun", "--standalone", "--nproc_per_node=8", "train.py"]
    assert "--preset=340m" in cmd and "--dataset=fineweb_edu" in cmd


def test_processes_sharing_a_grid_skip_each_others_runs(tmp_path, dataset, monkeypatch):
    """A run claimed by a live process is skipped (pending), as is a claim still being written (empty); a claim
    left by a dead process is taken over; a process removes its claims, on failure too."""
    specs = scaling.GRIDS["micro"](["transformer"])
    keys = []
    for spec in specs:
        spec["config"]["dataset"] = dataset  # as run_grid keys a run on another corpus
        keys.append(scaling.cache_key(spec["config"]))
    cache = tmp_path / "o" / "cache"
    cache.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (cache / f"{keys[0]}.claim").write_text(str(os.getppid()))  # alive: the test runner's parent
    (cache / f"{keys[1]}.claim").write_text("")
    (cache / f"{keys[2]}.claim").write_text(dead.stdout.strip())
    res = scaling.run_grid("micro", ["transformer"], out=tmp_path / "o", dataset=dataset, log=lambda *a: None,
                           plots=False)
    assert [p["key"] for p in res["pending"]] == keys[:2] and not res["failed"]
    assert sorted(r["key"] for r in res["records"]) == sorted(keys[2:])
    assert sorted(p.name for p in cache.glob("*.claim")) == sorted(f"{k}.claim" for k in keys[:2])  # untouched

    def boom(cfg):
        raise RuntimeError("boom")
    for k in keys[:2]:
        (cache / f"{k}.claim").unlink()
    monkeypatch.setattr(scaling.train_mod, "train", boom)
    res = scaling.run_grid("micro", ["transformer"], out=tmp_path / "o", dataset=dataset, log=lambda *a: None,
                           plots=False)
    assert len(res["failed"]) == 2 and not list(cache.glob("*.claim"))


class _BigramLM(torch.nn.Module):
    """A model whose loss at a token depends only on the previous token and the token itself, never on its
    position in the window: any slope of its per-position curve is the text's, not the model's."""

    def __init__(self, vocab):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)) * 3)

    def forward(self, x):
        return self.table[x], None


def test_position_balanced_losses_hold_the_same_text_in_every_bin():
    """For a position-blind model every 1/8 of the window has the same mean loss (to rounding), as it must when
    each bin holds the same tokens; the single-pass windows' bins of the same model differ (the confound the
    balanced curve removes); a bin's mean equals the mean loss over the kept targets computed directly."""
    vocab, T = 17, 64
    rng = np.random.default_rng(0)
    # text whose difficulty drifts along the stream: repetitive at the start, random later
    val = np.concatenate([np.tile(np.arange(4), 600), rng.integers(0, vocab, 3000)]).astype(np.uint16)
    model = _BigramLM(vocab)
    balanced, step = scaling.position_balanced_losses(model, val, T, 60, torch.device("cpu"), False)
    assert step == T // scaling.POSITION_SHIFTS
    bins = np.asarray(balanced).reshape(scaling.POSITION_SHIFTS, step).mean(1)
    np.testing.assert_allclose(bins, bins[0], rtol=0, atol=1e-12)
    # the direct mean over the kept targets val[lo + 1 : hi + 1] (each scored with its previous token)
    lo, hi = (scaling.POSITION_SHIFTS - 1) * step, 60 * T
    with torch.no_grad():
        logp = torch.log_softmax(model.table.double(), -1)
    prev, nxt = torch.from_numpy(val[lo:hi].astype(np.int64)), torch.from_numpy(val[lo + 1:hi + 1].astype(np.int64))
    assert bins[0] == pytest.approx(-logp[prev, nxt].mean().item(), rel=1e-6)
    # one pass over evenly spaced windows (as evaluate's val loss): its bins hold different text, and differ
    starts = np.linspace(0, len(val) - T - 1, 60).astype(np.int64)
    single = scaling._window_losses(model, val, starts, T, torch.device("cpu"), False).mean(0).numpy()
    assert np.ptp(single.reshape(scaling.POSITION_SHIFTS, step).mean(1)) > 0.05
    with pytest.raises(ValueError, match="not a multiple of 8"):
        scaling.position_balanced_losses(model, val, 60, 4, torch.device("cpu"), False)
    with pytest.raises(ValueError, match="too short"):  # one window plus 7/8 of another does not fit
        scaling.position_balanced_losses(model, val[:T + 7 * step], T, 4, torch.device("cpu"), False)
    fits, _ = scaling.position_balanced_losses(model, val[:T + 7 * step + 1], T, 4, torch.device("cpu"), False)
    assert len(fits) == T


def test_a_val_split_too_short_for_the_balanced_curve_fails_before_training(tmp_path, dataset, monkeypatch):
    """run_one checks the val split against the balanced per-position loss's need before it trains (a run that
    trained for hours must not fail at its evaluation)."""
    monkeypatch.setattr(scaling.train_mod, "train", _no_training)
    spec = scaling.GRIDS["micro"](["transformer"])[0]
    T = spec["config"]["block_size"]
    need = T + 7 * (T // 8) + 1
    monkeypatch.setattr(scaling, "load_split", lambda path, split: np.zeros(need - 1, dtype=np.uint16))
    with pytest.raises(ValueError, match=f"too short for 8 shifted windows of {T}: it needs {need}"):
        scaling.run_one(spec, tmp_path, dataset=dataset)
    monkeypatch.setattr(scaling, "load_split", lambda path, split: np.zeros(need, dtype=np.uint16))
    with pytest.raises(AssertionError, match="training must not run"):  # it fits: on to training
        scaling.run_one(spec, tmp_path, dataset=dataset)
