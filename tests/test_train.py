"""train.py: config parsing and errors, a tiny run that learns, exact resume, a damaged checkpoint, DDP == one
process (explicit and default batch splits), atomic checkpoints, non-finite stops. Every run uses a tiny model
on a synthetic dataset written into tmp_path."""
import glob
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import models
import train
from conftest import write_word_dataset
from train import ConfigError, TrainConfig, TrainingDiverged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model of a few thousand parameters: one Moneta layer, short chunks.
# Eager: compiling (the CPU default where Inductor can build) would cost each test tens of seconds.
TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=32", "--batch_size=4",
        "--model_args=chunk_size=16,gate_rank=8", "--warmup_iters=2", "--eval_iters=2", "--log_interval=1",
        "--compile=false"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A character-level dataset with learnable structure (a repeated sentence with random words)."""
    return write_word_dataset(tmp_path_factory.mktemp("data"), 1500)


def cfg_of(dataset, out_dir, *args):
    return train.parse_args([f"--dataset={dataset}", f"--out_dir={out_dir}", *TINY, *args])


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def step_losses(out_dir):
    return {r["iter"]: (r["loss"], r["grad_norm"]) for r in read_log(out_dir) if "loss" in r}


# ---------------------------------------------------------------------------------------------- config

def test_overrides_are_typed():
    cfg = train.parse_args(["--max_iters=7", "--learning_rate=3e-3", "--compile=true", "--always_save_checkpoint=False",
                            "--n_layer=None", "--min_lr=1", "--model=yaad"])
    assert (cfg.max_iters, cfg.learning_rate, cfg.compile, cfg.always_save_checkpoint) == (7, 3e-3, True, False)
    assert cfg.n_layer is None and cfg.min_lr == 1.0 and isinstance(cfg.min_lr, float) and cfg.model == "yaad"


def test_compile_defaults_to_the_device(monkeypatch):
    """train.py's --compile default (None) compiles where it pays: on CUDA, and on a CPU whose Inductor can build
    its kernels (this machine's can), else trains eagerly and says why; an explicit value wins. sample.py's and
    bench.py's default compiles on CUDA only."""
    import cli
    assert train.parse_args([]).compile is None and train.parse_args(["--compile=None"]).compile is None
    assert cli.resolve_train_compile(None, "cuda") == (True, "auto")
    assert cli.resolve_train_compile(None, "cpu") == (True, "auto")
    assert cli.resolve_train_compile(False, "cpu") == (False, "") and cli.resolve_train_compile(True, "mps")[0]
    assert cli.resolve_train_compile(None, "mps") == (False, "auto: not compiled on mps")
    monkeypatch.setattr(cli.torch, "compile", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no g++\nmore")))
    ok, why = cli.resolve_train_compile(None, "cpu")
    assert not ok and "RuntimeError: no g++" in why and "more" not in why and "--compile=false" in why
    assert cli.resolve_compile(None, "cpu") is False and cli.resolve_compile(None, "cuda") is True
    assert cli.resolve_compile(True, "cpu") is True and cli.resolve_compile(False, "cuda") is False


@pytest.mark.parametrize("args, expect", [
    (["--max_itres=5"], "unknown config key 'max_itres'"),
    (["--max_iters=five"], "'max_iters' must be int"),
    (["--max_iters=1.5"], "'max_iters' must be int"),
    (["--compile=yes"], "'compile' must be bool"),
    (["--batch_size=None"], "'batch_size' must be int"),
    (["--max_iters"], "must look like --key=value"),
    (["--model=gpt"], "model must be one of moneta, yaad, memora, transformer"),
    (["--init_from=gpt2"], "init_from must be scratch or resume"),
    (["--compile_mode=fast"], "compile_mode must be one of default, reduce-overhead, max-autotune"),
])
def test_bad_keys_and_types(args, expect, capsys):
    with pytest.raises(ConfigError, match=expect):
        train.parse_args(args)
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expect in err  # one line
    if "key" in expect:
        assert "valid keys: model:str, preset:str" in err and "learning_rate:float|None" in err


def test_compile_mode_needs_compiling_and_cuda_graphs_need_cuda():
    """cli.check_compile_mode, which train.py, sample.py and bench.py run once the device and --compile are known:
    a mode without compiling, or a CUDA-graph mode on a CPU, is a one-line error that says what to pass."""
    import cli
    with pytest.raises(ConfigError, match="compile_mode=reduce-overhead is a mode of torch.compile: add --compile=true"):
        cli.check_compile_mode("reduce-overhead", False, "cuda")
    with pytest.raises(ConfigError, match="captures CUDA graphs: use it with --device=cuda, or compile_mode=default"):
        cli.check_compile_mode("max-autotune", True, "cpu")
    cli.check_compile_mode("reduce-overhead", True, "cuda")
    cli.check_compile_mode("max-autotune-no-cudagraphs", True, "cpu")
    cli.check_compile_mode("default", False, "cpu")


def test_config_files(tmp_path):
    py = tmp_path / "c.py"
    py.write_text("config = {'max_iters': 12, 'learning_rate': 1e-3, 'dataset': 'x'}\n")
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"max_iters": 13, "compile": True}))
    cfg = train.parse_args([str(py), str(js), "--dataset=y"])  # files left to right, then the overrides
    assert (cfg.max_iters, cfg.learning_rate, cfg.compile, cfg.dataset) == (13, 1e-3, True, "y")
    js.write_text(json.dumps({"max_iters": "13"}))  # config files hold typed values: no string conversion
    with pytest.raises(ConfigError, match="'max_iters' must be int"):
        train.parse_args([str(js)])
    py.write_text("config = {'nope': 1}\n")
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        train.parse_args([str(py)])
    with pytest.raises(ConfigError, match="not found"):
        train.parse_args([str(tmp_path / "missing.py")])


def test_shipped_configs_parse():
    files = sorted(glob.glob(os.path.join(ROOT, "config", "*.py")) + glob.glob(os.path.join(ROOT, "config", "*.json")))
    assert any(f.endswith("train_moneta_tiny.py") for f in files)
    for f in files:
        cfg = train.parse_args([f])
        train.model_overrides(cfg, 50257)  # model_args parse for that model
    # the main job (`python train.py`) is the TrainConfig defaults, which train_moneta_tiny.py spells out
    assert train.parse_args([str(train.MAIN_JOB)]) == train.parse_args([]) == TrainConfig()
    assert TrainConfig().model == "moneta" and TrainConfig().dataset == "shakespeare_char"


def test_model_args():
    cfg = train.parse_args(["--model_args=objective=l2,chunk_size=32,momentum=true,p=4", "--n_layer=2"])
    over = train.model_overrides(cfg, 65)
    assert over == {"objective": "l2", "chunk_size": 32, "momentum": True, "p": 4.0, "n_layer": 2, "block_size": 128,
                    "vocab_size": 65}
    assert train.model_overrides(train.parse_args(['--model_args={"chunk_size": 8}']), 50257)["vocab_size"] == 50304
    with pytest.raises(ConfigError, match="unknown model_args key 'bogus'.*valid model_args keys: block_size:int"):
        train.model_overrides(train.parse_args(["--model_args=bogus=1"]), 65)
    with pytest.raises(ConfigError, match="'chunk_size' must be int"):
        train.model_overrides(train.parse_args(["--model_args=chunk_size=big"]), 65)


def test_lr_schedule():
    lrs = [train.get_lr(i, 1.0, 0.1, 10, 100) for i in range(120)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[100] == lrs[119] == 0.1


def test_step_offsets_split_over_ranks():
    """The micro-batches of a step are one draw keyed by (seed, step): ranks take slices of it."""
    full = train.step_offsets(1, 0, 5, 4, 3, 1000, 32)
    assert full.shape == (4, 3) and full.max() < 1000 - 32
    np.testing.assert_array_equal(full, train.step_offsets(1, 0, 5, 4, 3, 1000, 32))
    assert not np.array_equal(full, train.step_offsets(1, 0, 6, 4, 3, 1000, 32))


@pytest.mark.parametrize("batch_size, accumulation, world, sizes", [
    (16, None, 1, [[16]]), (16, None, 2, [[8], [8]]), (16, None, 3, [[6], [5], [5]]), (4, None, 3, [[2], [1], [1]]),
    (16, None, 8, [[2]] * 8), (2, 4, 2, [[2, 2], [2, 2]]), (3, 6, 3, [[3, 3]] * 3), (5, 1, 1, [[5]]),
])
def test_batch_split(batch_size, accumulation, world, sizes):
    """Every window of the step's draw goes to exactly one rank, and the loss divisors weight each window's
    tokens equally in DDP's mean over the ranks: the gradient of the global batch, whatever `world` is."""
    n_micro, shares, how = train.batch_split(batch_size, accumulation, world)
    assert n_micro == (accumulation or 1) and len(shares) == world
    assert [[end - first for _, first, end, _ in share] for share in shares] == sizes
    taken = sorted((m, i) for share in shares for m, first, end, _ in share for i in range(first, end))
    assert taken == [(m, i) for m in range(n_micro) for i in range(batch_size)]
    for share in shares:
        for _, first, end, divisor in share:
            assert 1 / (divisor * world) == pytest.approx((end - first) / (n_micro * batch_size))
    assert how.startswith(f"batch_size {batch_size} x {n_micro} accumulation step")
    if accumulation is None and world > 1:
        assert how.endswith(f"split over {world} processes as {'+'.join(str(s[0]) for s in sizes)}")


def test_batch_split_errors():
    with pytest.raises(ConfigError, match=r"^gradient_accumulation_steps=3 must be divisible by the number of "
                                          r"processes \(2\)"):
        train.batch_split(16, 3, 2)
    with pytest.raises(ConfigError, match=r"batch_size=2 sequences cannot be split over 3 processes"):
        train.batch_split(2, None, 3)
    assert train.parse_args(["--gradient_accumulation_steps=None"]).gradient_accumulation_steps is None
    with pytest.raises(ConfigError, match="gradient_accumulation_steps must be >= 1"):
        train.parse_args(["--gradient_accumulation_steps=0"])


# ---------------------------------------------------------------------------------------------- data errors

def test_missing_dataset(tmp_path):
    with pytest.raises(ConfigError, match="has no complete train.bin / val.bin / meta.json.*prepare_text.py"):
        train.train(cfg_of(tmp_path / "nothing", tmp_path / "out"))
    with pytest.raises(ConfigError, match="dataset 'no_such_corpus' not found"):
        train.train(cfg_of("no_such_corpus", tmp_path / "out"))


def test_default_corpus_is_prepared_when_missing(tmp_path, monkeypatch, dataset):
    """A missing default corpus is prepared by its data/<name>/prepare.py prepare() (faked here)."""
    import data.shakespeare_char.prepare as prep

    calls = []
    target = tmp_path / "data" / "shakespeare_char"

    def fake_prepare(out_dir=None, **kw):
        calls.append(out_dir)
        os.makedirs(target)
        for name in ("train.bin", "val.bin", "meta.json"):
            with open(os.path.join(dataset, name), "rb") as src, open(target / name, "wb") as dst:
                dst.write(src.read())
        return target

    monkeypatch.setattr(train, "REPO", tmp_path)
    monkeypatch.setattr(prep, "prepare", fake_prepare)
    assert train.resolve_dataset("shakespeare_char") == target and calls == [None]
    assert train.resolve_dataset("shakespeare_char") == target and calls == [None]  # ready: not again


# ---------------------------------------------------------------------------------------------- training

def test_tiny_run_lowers_loss(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    assert train.main([f"--dataset={dataset}", f"--out_dir={out}", *TINY, "--max_iters=40", "--learning_rate=1e-2",
                       "--eval_interval=20", "--log_interval=5"]) == 0
    stdout = capsys.readouterr().out
    assert f"checkpoint: {out}/ckpt.pt" in stdout and f"python sample.py --out_dir={out}" in stdout
    assert "tok/s" in stdout and "ms/iter" in stdout and "mfu" not in stdout  # no MFU without a known peak
    log = read_log(out)
    losses = [r["loss"] for r in log if "loss" in r]
    evals = [r for r in log if "val_loss" in r]
    assert losses[-1] < losses[0] - 1.0
    assert [r["iter"] for r in evals] == [20, 40] and evals[1]["val_loss"] < evals[0]["val_loss"]
    assert evals[1]["val_ppl"] == pytest.approx(np.exp(evals[1]["val_loss"]))
    assert set(log[0]) == {"iter", "loss", "lr", "grad_norm", "tokens_per_s", "ms_per_iter", "mfu"}
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # plain types: loads without pickle
    assert ckpt["iter_num"] == 40 and ckpt["model_name"] == "moneta"
    assert ckpt["best_val_loss"] == pytest.approx(evals[1]["val_loss"])
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    assert {"model", "optimizer", "model_config", "train_config", "rng_states", "sampler", "dataset"} <= set(ckpt)
    assert torch.load(out / "ckpt_best.pt", weights_only=True)["iter_num"] == 40


def test_resume_continues_the_same_curve(dataset, tmp_path):
    common = ["--max_iters=8", "--lr_decay_iters=8", "--eval_interval=3", "--learning_rate=1e-2"]
    full = tmp_path / "full"
    train.train(cfg_of(dataset, full, *common))
    part = tmp_path / "part"
    train.train(cfg_of(dataset, part, *common, "--max_iters=5"))  # stops after 5 steps, ckpt.pt at 5
    assert torch.load(part / "ckpt.pt", weights_only=True)["iter_num"] == 5
    result = train.train(cfg_of(dataset, part, *common, "--init_from=resume"))
    a, b = step_losses(full), step_losses(part)
    assert sorted(b) == list(range(1, 9))
    for it in range(1, 9):
        assert b[it] == pytest.approx(a[it], rel=1e-6, abs=1e-7), it
    assert result["iter"] == 8
    assert result["best_val_loss"] == pytest.approx(train.load_checkpoint(full / "ckpt.pt")["best_val_loss"])


def test_resume_of_a_checkpoint_with_conv1d_taps(dataset, tmp_path):
    """A checkpoint written before the short conv's taps became [K, 3C] (nn.Conv1d's [3C, 1, K], for the weights
    and AdamW's moments) resumes on the same curve as an uninterrupted run."""
    common = ["--max_iters=8", "--lr_decay_iters=8", "--eval_interval=3", "--learning_rate=1e-2"]
    full, part = tmp_path / "full", tmp_path / "part"
    train.train(cfg_of(dataset, full, *common))
    train.train(cfg_of(dataset, part, *common, "--max_iters=5"))
    ck = torch.load(part / "ckpt.pt", weights_only=False)
    model = models.build_model(models.config_from_dict(ck["model_name"], ck["model_config"]))
    order = [p for g in model.configure_optimizers(0.1, 1e-3).param_groups for p in g["params"]]
    legacy = 0
    for i, p in enumerate(order):
        if p.dim() == 2 and any(p is m.conv_weight for m in model.modules() if hasattr(m, "conv_weight")):
            name = next(n for n, q in model.named_parameters() if q is p)
            ck["model"][name] = ck["model"][name].t().unsqueeze(1).clone()
            for key in ("exp_avg", "exp_avg_sq"):
                ck["optimizer"]["state"][i][key] = ck["optimizer"]["state"][i][key].t().unsqueeze(1).clone()
            legacy += 1
    assert legacy == ck["model_config"]["n_layer"]
    torch.save(ck, part / "ckpt.pt")
    train.train(cfg_of(dataset, part, *common, "--init_from=resume"))
    a, b = step_losses(full), step_losses(part)
    for it in range(1, 9):
        assert b[it] == pytest.approx(a[it], rel=1e-6, abs=1e-7), it


def test_resume_needs_the_same_model(dataset, tmp_path):
    out = tmp_path / "out"
    train.train(cfg_of(dataset, out, "--max_iters=1"))
    with pytest.raises(ConfigError, match="holds a 'moneta' model, not 'transformer'"):
        train.train(train.parse_args([f"--dataset={dataset}", f"--out_dir={out}", "--model=transformer",
                                      "--init_from=resume", "--max_iters=2"]))
    with pytest.raises(ConfigError, match="n_embd=64 asked, 32 saved"):
        train.train(cfg_of(dataset, out, "--max_iters=2", "--init_from=resume", "--n_embd=64"))
    with pytest.raises(ConfigError, match="no checkpoint at"):
        train.train(cfg_of(dataset, tmp_path / "empty", "--init_from=resume"))


def test_resume_of_a_checkpoint_saved_with_compile_memory_false(dataset, tmp_path):
    """Checkpoints written when compile_memory was a plain bool (False) resume under today's default (None:
    by device): how the chunks run is not part of the model, so it is no mismatch, and the run takes its own."""
    out = tmp_path / "out"
    train.train(cfg_of(dataset, out, "--max_iters=1"))
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck["model_config"]["compile_memory"] is None
    ck["model_config"]["compile_memory"] = False
    torch.save(ck, out / "ckpt.pt")
    cfg = cfg_of(dataset, out, "--max_iters=2", "--init_from=resume")
    mcfg = train.model_config(cfg, ck["model_config"]["vocab_size"], ck, out / "ckpt.pt")
    assert mcfg.compile_memory is None
    assert train.train(cfg)["iter"] == 2


def test_resume_may_change_what_the_backward_keeps(dataset, tmp_path):
    """recompute_inputs changes what a training step keeps for its backward, not what the model computes: a run
    resumed with another value is no config mismatch, and it trains with its own choice."""
    out = tmp_path / "out"
    train.train(cfg_of(dataset, out, "--max_iters=1"))
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck["model_config"]["recompute_inputs"] is True
    cfg = cfg_of(dataset, out, "--max_iters=2", "--init_from=resume", "--model_args=chunk_size=16,gate_rank=8,recompute_inputs=false")
    mcfg = train.model_config(cfg, ck["model_config"]["vocab_size"], ck, out / "ckpt.pt")
    assert mcfg.recompute_inputs is False
    assert train.train(cfg)["iter"] == 2


def test_checkpoint_with_learning_rate_in_its_model_config_loads(dataset, tmp_path):
    """Checkpoints written before learning_rate left the model config (it was the preset's peak lr) still
    resume, sample and load: models.config_from_dict drops that key."""
    import models
    import sample
    out = tmp_path / "out"
    train.train(cfg_of(dataset, out, "--max_iters=2", "--eval_interval=2"))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert "learning_rate" not in ckpt["model_config"]
    ckpt["model_config"]["learning_rate"] = 1e-3  # the tiny preset's, as it was saved
    for name in ("ckpt.pt", "ckpt_best.pt"):  # (ckpt_best.pt may be a hard link to ckpt.pt)
        (out / name).unlink()
        torch.save(ckpt, out / name)
    cfg = models.config_from_dict("moneta", ckpt["model_config"])
    assert cfg.to_dict() == {k: v for k, v in ckpt["model_config"].items() if k != "learning_rate"}
    with pytest.raises(ValueError, match="unknown config key"):  # the legacy key only, nothing else
        models.config_from_dict("moneta", dict(ckpt["model_config"], bogus=1))
    assert sample.load_model(out, device="cpu").config == cfg
    assert train.train(cfg_of(dataset, out, "--max_iters=3", "--eval_interval=2", "--init_from=resume"))["iter"] == 3


def test_resume_from_a_damaged_checkpoint(dataset, tmp_path, capsys):
    """A truncated ckpt.pt is a one-line error naming it and the way out (ckpt_best.pt when it loads); no file
    is changed or removed."""
    out = tmp_path / "out"
    common = ["--max_iters=4", "--eval_interval=2", "--learning_rate=1e-2"]
    train.train(cfg_of(dataset, out, *common))
    ckpt, best = out / "ckpt.pt", out / "ckpt_best.pt"
    best_iter = torch.load(best, weights_only=True)["iter_num"]
    whole = ckpt.read_bytes()
    damaged = tmp_path / "damaged.pt"  # a new file (ckpt_best.pt may be a hard link to ckpt.pt)
    damaged.write_bytes(whole[: len(whole) // 2])
    os.replace(damaged, ckpt)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = [f"--dataset={dataset}", f"--out_dir={out}", *TINY, *common, "--max_iters=6", "--init_from=resume"]
    capsys.readouterr()
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"checkpoint {ckpt} is damaged or unreadable" in err and "left untouched" in err
    assert f"ckpt_best.pt (iteration {best_iter}) loads: copy it over ckpt.pt" in err and "--init_from=scratch" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # ckpt_best.pt damaged too: the way out is --init_from=scratch
    best.write_bytes(b"not a checkpoint")
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ckpt_best.pt is missing or unreadable too" in err and "--init_from=scratch" in err
    assert ckpt.read_bytes() == before["ckpt.pt"]
    # the advice works: a good ckpt_best.pt copied over ckpt.pt resumes
    best.write_bytes(before["ckpt_best.pt"])
    ckpt.write_bytes(before["ckpt_best.pt"])
    assert train.main(args) == 0


def test_interrupted_checkpoint_write_keeps_the_previous_one(dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_save = torch.save
    calls = []

    def save_then_crash(obj, f):
        calls.append(obj["iter_num"])
        if len(calls) == 1:
            return real_save(obj, f)
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half a file, then the "crash"
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(OSError, match="simulated"):
        train.train(cfg_of(dataset, out, "--max_iters=4", "--eval_interval=2"))
    monkeypatch.setattr(torch, "save", real_save)
    assert calls == [2, 4]
    ckpt = train.load_checkpoint(out / "ckpt.pt", "moneta")
    assert ckpt["iter_num"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "ckpt_best.pt", "config.json", "log.jsonl"]
    # and training resumes from it
    assert train.train(cfg_of(dataset, out, "--max_iters=4", "--eval_interval=2", "--init_from=resume"))["iter"] == 4


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(dataset, tmp_path, monkeypatch):
    real_build = train.models.build_model
    steps = []

    def build_poisoned(*a, **k):
        model = real_build(*a, **k)

        def poison(module, inputs, output):
            if module.training:
                steps.append(1)
                if len(steps) >= 5:  # the 5th training forward: step 5
                    return output[0], output[1] * float("nan")
            return None

        model.register_forward_hook(poison)
        return model

    monkeypatch.setattr(train.models, "build_model", build_poisoned)
    out = tmp_path / "out"
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at iteration 5 .*last good checkpoint is .*ckpt.pt "
                                               r"\(iteration 4\)"):
        train.train(cfg_of(dataset, out, "--max_iters=10", "--eval_interval=2"))
    assert train.load_checkpoint(out / "ckpt.pt")["iter_num"] == 4
    assert max(step_losses(out)) == 4


# ---------------------------------------------------------------------------------------------- DDP

def test_ddp_two_processes_match_one(dataset, tmp_path):
    """torchrun with 2 CPU processes (gloo), 2 micro-batches each == 1 process with 4 micro-batches."""
    args = [f"--dataset={dataset}", *TINY, "--batch_size=2", "--gradient_accumulation_steps=4", "--max_iters=4",
            "--eval_interval=2", "--eval_iters=3", "--learning_rate=1e-2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "train.py", *args, f"--out_dir={one}"], cwd=ROOT, env=env, check=True,
                   timeout=120, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *args, f"--out_dir={two}"], cwd=ROOT, env=env, timeout=180,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("global batch: 8 sequences x 32 tokens = 256 tokens per step (batch_size 2 x 4 accumulation steps, "
            "2 per process on 2 processes)") in proc.stdout
    assert proc.stdout.count("iter 4/4 |") == 1  # rank 0 logs alone
    a, b = read_log(one), read_log(two)
    assert [r["iter"] for r in a] == [r["iter"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm", "val_loss", "train_eval_loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["iter"], key)
    ca, cb = (train.load_checkpoint(d / "ckpt.pt") for d in (one, two))
    assert len(cb["rng_states"]) == 2
    for k, v in ca["model"].items():
        torch.testing.assert_close(cb["model"][k], v, rtol=1e-4, atol=1e-5)


def torchrun(nproc, args, env, timeout=240):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "train.py", *args], cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True)


def test_ddp_default_batch_any_number_of_processes(dataset, tmp_path, one_thread):
    """With the default gradient_accumulation_steps (None) torchrun works with 2 and 3 processes: the step's
    batch_size windows are split 2+2 and 2+1+1, the losses equal one process's; an explicit accumulation that
    the processes cannot share is the one-line error."""
    args = [f"--dataset={dataset}", *TINY, "--max_iters=3", "--eval_interval=3", "--eval_iters=3",
            "--learning_rate=1e-2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    one = tmp_path / "one"
    assert train.main([*args, f"--out_dir={one}"]) == 0
    a = read_log(one)
    for nproc, split in ((2, "2+2"), (3, "2+1+1")):
        out = tmp_path / f"n{nproc}"
        proc = torchrun(nproc, [*args, f"--out_dir={out}"], env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (f"global batch: 4 sequences x 32 tokens = 128 tokens per step (batch_size 4 x 1 accumulation step "
                f"(gradient_accumulation_steps=None), split over {nproc} processes as {split})") in proc.stdout
        b = read_log(out)
        assert [r["iter"] for r in a] == [r["iter"] for r in b]
        for ra, rb in zip(a, b):
            for key in ("loss", "grad_norm", "val_loss", "train_eval_loss"):
                if key in ra:
                    assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (nproc, ra["iter"], key)
    proc = torchrun(2, [*args, f"--out_dir={tmp_path / 'bad'}", "--gradient_accumulation_steps=3"], env, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "train.py: error:" in line]
    assert errors == ["train.py: error: gradient_accumulation_steps=3 must be divisible by the number of processes "
                      "(2); or pass --gradient_accumulation_steps=None to split one micro-batch of batch_size "
                      "sequences over the processes"], proc.stderr[-3000:]
    assert 'File "' + os.path.join(ROOT, "train.py") not in proc.stderr  # no traceback from train.py
