"""The scaling study (paper Fig. 3 and Fig. 4): models x sizes x context lengths at a fixed token budget.

    python scaling.py --grid=cpu                      # shakespeare_char, 4 models, one CPU core: ~40 minutes
    python scaling.py --grid=ablation                 # Moneta's p and q: ~8 minutes (9 new runs + 2 of the cpu grid)
    python scaling.py --grid=seeds                    # seed noise of one grid point: ~4 minutes
    python scaling.py --grid=context_check            # does the data carry usable long context? (2 new runs)
    python scaling.py --grid=bpe                      # the cpu grid on BPE Shakespeare (+ _ablation, _seeds, _4x)
    python scaling.py --grid=code                     # ... on source code, characters (+ code_ablation, code_seeds)
    python scaling.py --grid=micro --out=/tmp/s       # 2 sizes x 2 contexts x 2 models, seconds (the CI test)
    python scaling.py --grid=paper                    # prints the torchrun commands of the paper-scale grid
    python scaling.py --grid=paper --launch --nproc=8 # ... or runs them one after the other, then evaluates
    python scaling.py --grid=cpu --models=moneta,transformer --max_runs=3 --plots_only ...
    python scaling.py --grid=cpu --sizes=l --keep_ckpt --out=out-scaling   # the largest models (out-scaling/cpu_sizes_l), checkpoints kept

Each run is `train.train(TrainConfig(...))` in-process (under torchrun for the paper grid) in its own out_dir
under the cache directory (default <out>/cache/<key>/), then an evaluation on the held-out split: val loss
and perplexity over `eval_tokens` tokens of fixed, evenly spaced, non-overlapping windows of the run's own
context length (the same windows for every model), and the per-position loss (the mean loss at each
position inside the context; it shows whether a model uses its long context), position-balanced: scored over
8 shifted tilings of the val text so that every bin of 1/8 of the window holds the same tokens
(`position_balanced_losses`; the single-pass curve over the val-loss windows, kept as `per_position`, compares
different text at each position, which moves its bins as much as a model's use of context does).

Grids (`GRIDS`; every run of a grid trains on the same number of tokens, which is the fair comparison:
the Miras models are several times slower than the Transformer on a CPU, and at a fixed token budget the
training FLOPs differ only by the models' FLOPs per token):
  cpu       character-level Shakespeare; moneta, yaad, memora, transformer. A size sweep (4 sizes, 2x32 to
            4x128, ~25x in non-embedding parameters) at context 256 plus a context sweep (64, 128, 256, 512,
            1024) at the 2x64 size -- as the paper's Fig. 3 does, and not the full cross product, to fit the
            CPU budget. 2,048 tokens per step (batch 2048 / context), 256 steps = 524,288 tokens per run.
  ablation  Moneta at the 2x64 size: p in {1, 2, 3, 4} at q = 4 (context 256) and q in {2, 3, 4, 5} at
            p = 3 at contexts 256 and 1024 (the p=3, q=4 runs are the cpu grid's, shared through the cache).
  seeds     the cpu grid's 2x64 / context-256 point of every model with seeds 1337 (cached), 1338, 1339:
            the run-to-run noise that the differences between models must be judged against.
  context_check  the Transformer at size s, context 1,024, on character and on BPE Shakespeare and on source
            code, at the grids' budget and at 4x it: a context sweep tests nothing unless this per-position loss
            keeps falling past a few hundred tokens.
  bpe       GPT-2 BPE Shakespeare with the vocabulary compacted to the 18.7K ids that occur
            (data/shakespeare_compact; whole plays as documents): contexts 128-1,024 at size s, then 4 sizes at
            context 512. bpe_ablation: Moneta's p and q at contexts 128 and 1,024; bpe_seeds: 3 seeds at s / 512;
            bpe_4x: the 4 contexts at size s at 4x the budget (1,024 steps), where context_check's Transformer++
            still gains past a few hundred tokens.
            The LM head over 18.7K ids makes these runs ~8x slower than the character ones on a CPU.
  code      the same three grids (code, code_ablation, code_seeds) on torch 2.13.0's Python source at character
            level (data/torch_code; one document per file), at 4x the budget (1,024 steps = 2.1M tokens).
  micro     2 sizes x 2 contexts x {moneta, transformer}, a few steps: the CI test.
  paper     FineWeb-Edu (data/prepare_text.py), the paper's 340M and 760M sizes x contexts 2K..32K, 15B
            tokens per run at 0.5M tokens per step, bf16, torch.compile; torchrun on a GPU node.

Outputs in <out>/<grid>/: results.json (one record per run: model, size, sweeps, n_params,
n_params_non_embedding, flops_per_token, block_size, tokens_trained, train_flops, val_loss, val_ppl,
wall_s, ..., key and config; failed runs under "failed" with their error), per_position.json (key -> the
per-position losses, single-pass and balanced), and the plots scaling_params.png (val loss vs non-embedding
parameters, log-log, with a fitted power law L = a N^-b per model), scaling_flops.png, scaling_context.png,
per_position.png (and ablation.png for the ablation grid).

Resumable: a finished run is cached as <cache>/<key>.json (written atomically), the key being a hash of
the run's full config (model, sizes, context, data, optimizer, steps, seed, evaluation) and of the resolved
model config (so a change of a model's defaults is a new run); re-running a grid
skips cached runs, so a grid can be interrupted, extended or completed later. A failed run is recorded with
its error (and retried at the next invocation); it does not stop the others. Checkpoints are deleted after
the evaluation unless --keep_ckpt (the paper grid always keeps them). Several processes on one machine can share
a grid (start the same command N times for N cores): each claims a run before training it (<cache>/<key>.claim)
and skips the runs claimed by the others; once all have finished, the command once more (or --plots_only)
collects every run into results.json and the plots.
"""
import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import shlex
import subprocess
import sys
import time
import traceback

import numpy as np
import torch

import cli
import models
import train as train_mod
from data.common import load_split

REPO = pathlib.Path(__file__).resolve().parent
CACHE_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Grids

def _mlp_hidden(n_embd):
    """8/3 n_embd rounded up to 16 (the presets round to 256, which would dominate these small models)."""
    return 16 * math.ceil(int(8 * n_embd / 3) / 16)


def run_spec(model, size, shape, block_size, *, tokens_per_step, max_iters, learning_rate, warmup_iters,
             dataset, preset, eval_tokens, sweeps, model_args=None, batch_size=None, grad_accum=1,
             min_lr=None, dtype="auto", compile=False, seed=1337, label=None, train_extra=None):
    """One run: `config` (everything that determines the result; hashed into the cache key) plus tags."""
    n_layer, n_embd, n_head = shape if shape else (None, None, None)
    margs = dict(model_args or {})
    if n_embd is not None and "mlp_hidden" not in margs:
        margs["mlp_hidden"] = _mlp_hidden(n_embd)
    if batch_size is None:
        batch_size = max(1, tokens_per_step // (block_size * grad_accum))
    config = {
        "version": CACHE_VERSION, "model": model, "preset": preset, "n_layer": n_layer, "n_embd": n_embd,
        "n_head": n_head, "block_size": block_size, "model_args": _canonical_args(model, preset, margs),
        "dataset": dataset, "batch_size": batch_size, "gradient_accumulation_steps": grad_accum,
        "max_iters": max_iters, "learning_rate": learning_rate, "min_lr": min_lr, "warmup_iters": warmup_iters,
        "seed": seed, "dtype": dtype, "compile": compile, "eval_tokens": eval_tokens,
    }
    if train_extra:  # more TrainConfig keys (the paper grid: periodic checkpoints and evaluations)
        config["train_extra"] = dict(train_extra)
    return {"config": config, "size": size, "sweeps": list(sweeps), "label": label}


def _canonical_args(model, preset, margs):
    """model_args without the entries equal to the model's defaults (so that equal models share a key)."""
    base = models.make_config(model, preset).to_dict()
    out = {}
    for k, v in sorted(margs.items()):
        if k not in base:
            raise ValueError(f"unknown model arg {k!r} for {model}")
        if base[k] != v:
            out[k] = v
    return out


CPU_SIZES = {"xs": (2, 32, 2), "s": (2, 64, 4), "m": (3, 96, 4), "l": (4, 128, 4)}  # n_layer, n_embd, n_head
CPU_CONTEXTS = [64, 128, 256, 512, 1024]
CPU = dict(tokens_per_step=2048, max_iters=256, learning_rate=3e-3, warmup_iters=25, eval_tokens=65536,
           dataset="shakespeare_char", preset="tiny")
ALL_MODELS = ["moneta", "yaad", "memora", "transformer"]

# GPT-2 BPE Shakespeare, vocabulary compacted to the 18.7K ids that occur (data/shakespeare_compact), whole plays
# as documents: a candidate corpus with long-range structure (grid context_check tests whether a model uses it).
LONG_CONTEXTS = [128, 256, 512, 1024]
BPE = dict(CPU, dataset="shakespeare_compact")

# The BPE context sweep at 4x the budget (1,024 steps = 2.1M tokens): there the Transformer++'s position-balanced
# loss still falls past a few hundred tokens (context_check), which a context sweep needs to measure anything.
BPE_4X = dict(BPE, max_iters=1024)

# The Python source of torch 2.13.0 at character level (data/torch_code): code repeats its identifiers across
# a whole file. 4x the character grids' budget (1,024 steps = 2.1M tokens), and 4x their evaluation windows: the
# loss of code varies more from file to file than Shakespeare's from play to play.
CODE = dict(CPU, dataset="torch_code", max_iters=1024, eval_tokens=262144)


def _sweep_grid(model_list, sizes, size_context, contexts, context_size, common):
    """A size sweep at one context plus a context sweep at one size (shared runs are listed once)."""
    runs = []  # ordered by size, then context, then model: an interrupted grid has every model at the same points
    for size, shape in sizes.items():
        for T in contexts:
            for model in model_list:
                sweeps = (["size"] if T == size_context else []) + (["context"] if size == context_size else [])
                if sweeps:
                    runs.append(run_spec(model, size, shape, T, sweeps=sweeps, **common))
    return runs


def grid_cpu(model_list):
    return _sweep_grid(model_list, CPU_SIZES, 256, CPU_CONTEXTS, "s", CPU)


def grid_ablation(model_list):
    runs = []
    for p in (1.0, 2.0, 3.0, 4.0):
        runs.append(run_spec("moneta", "s", CPU_SIZES["s"], 256, sweeps=["p"], label=f"p={p:g},q=4",
                             model_args={"p": p, "q_norm": 4.0}, **CPU))
    for T in (256, 1024):  # the paper: q changes how the results scale with context
        for q in (2.0, 3.0, 4.0, 5.0):
            runs.append(run_spec("moneta", "s", CPU_SIZES["s"], T, sweeps=["q"],
                                 label=f"p=3,q={q:g}" + (f",T={T}" if T != 256 else ""),
                                 model_args={"p": 3.0, "q_norm": q}, **CPU))
    return runs


def grid_seeds(model_list):
    """Seed noise of the cpu grid: its 2x64 / context-256 point with two more seeds (the first is cached)."""
    return [run_spec(m, "s", CPU_SIZES["s"], 256, sweeps=["seed"], label=f"seed={seed}", seed=seed, **CPU)
            for seed in (1337, 1338, 1339) for m in model_list]


def grid_context_check(model_list):
    """Does the data carry usable long context? The Transformer at size s, context 1,024, on both corpora, at the
    grids' budget and at 4x it: the per-position loss must keep falling past a few hundred tokens for a context
    sweep to test anything (the runs at 1x are the cpu and bpe grids' own)."""
    runs = []
    for dataset in ("shakespeare_char", "shakespeare_compact"):
        for steps in (256, 1024):
            runs += [run_spec(m, "s", CPU_SIZES["s"], 1024, sweeps=["check"], label=f"{dataset},{steps} steps",
                              **dict(CPU, dataset=dataset, max_iters=steps)) for m in model_list]
    for steps in (1024, 4096):  # source code, at the code grids' budget and at 4x it
        runs += [run_spec(m, "s", CPU_SIZES["s"], 1024, sweeps=["check"], label=f"torch_code,{steps} steps",
                          **dict(CODE, max_iters=steps)) for m in model_list]
    return runs


# The grids of a corpus with long-range structure (BPE Shakespeare: bpe*; source code: code*).

def long_context_grid(common, model_list):
    """4 contexts at size s, then 4 sizes at context 512. The context sweep's longest point comes first: its
    Transformer run is the per-position check the rest depends on; then the context sweep, then the sizes."""
    first = [run_spec(m, "s", CPU_SIZES["s"], 1024, sweeps=["context"], **common) for m in model_list]
    rest = _sweep_grid(model_list, CPU_SIZES, 512, LONG_CONTEXTS[:-1], "s", common)
    return first + sorted(rest, key=lambda spec: spec["size"] != "s")  # stable: the context sweep first


def context_sweep(common, model_list):
    """The 4 contexts at size s, the longest first (its Transformer++ run at 1,024 is context_check's)."""
    return [run_spec(m, "s", CPU_SIZES["s"], T, sweeps=["context"], **common)
            for T in LONG_CONTEXTS[::-1] for m in model_list]


def long_context_ablation(common, model_list):
    """Moneta's p (at q = 4) and q (at p = 3), size s, at contexts 128 and 1024."""
    runs = []
    for T in (128, 1024):
        for p in (1.0, 2.0, 3.0, 4.0):
            runs.append(run_spec("moneta", "s", CPU_SIZES["s"], T, sweeps=["p"], label=f"p={p:g},q=4,T={T}",
                                 model_args={"p": p, "q_norm": 4.0}, **common))
        for q in (2.0, 3.0, 5.0):  # q = 4 is the p = 3 run above
            runs.append(run_spec("moneta", "s", CPU_SIZES["s"], T, sweeps=["q"], label=f"p=3,q={q:g},T={T}",
                                 model_args={"p": 3.0, "q_norm": q}, **common))
    return runs


def long_context_seeds(common, model_list):
    """Seed noise of a long-context grid: size s, context 512, seeds 1337 (the grid's run), 1338, 1339."""
    return [run_spec(m, "s", CPU_SIZES["s"], 512, sweeps=["seed"], label=f"seed={seed}", seed=seed, **common)
            for seed in (1337, 1338, 1339) for m in model_list]


def grid_micro(model_list):
    common = dict(tokens_per_step=64, max_iters=3, learning_rate=3e-3, warmup_iters=1, eval_tokens=256,
                  dataset="shakespeare_char", preset="tiny")
    sizes = {"a": (1, 16, 2), "b": (2, 32, 2)}
    runs = []
    for model in model_list:
        for size, shape in sizes.items():
            for T in (16, 32):
                sweeps = (["size"] if T == 16 else []) + (["context"] if size == "a" else [])
                runs.append(run_spec(model, size, shape, T, sweeps=sweeps or ["extra"], **common))
    return runs


PAPER_CONTEXTS = [2048, 4096, 8192, 16384, 32768]


def grid_paper(model_list):
    """The paper's sizes x contexts (full cross product: Fig. 3 shows both sizes over 2K..32K)."""
    common = dict(tokens_per_step=524288, max_iters=28610, learning_rate=None, warmup_iters=2000, eval_tokens=4194304,
                  dataset="fineweb_edu", dtype="bfloat16", compile=True, grad_accum=16,
                  train_extra={"always_save_checkpoint": True, "eval_interval": 1000, "eval_iters": 50,
                               "log_interval": 10})
    runs = []
    for model in model_list:
        for size in ("340m", "760m"):
            for T in PAPER_CONTEXTS:
                sweeps = (["size"] if T == 4096 else []) + ["context"]
                runs.append(run_spec(model, size, None, T, preset=size, sweeps=sweeps, **common))
    return runs


GRIDS = {"cpu": grid_cpu, "ablation": grid_ablation, "seeds": grid_seeds, "context_check": grid_context_check,
         "bpe": functools.partial(long_context_grid, BPE),
         "bpe_ablation": functools.partial(long_context_ablation, BPE),
         "bpe_seeds": functools.partial(long_context_seeds, BPE),
         "bpe_4x": functools.partial(context_sweep, BPE_4X),
         "code": functools.partial(long_context_grid, CODE),
         "code_ablation": functools.partial(long_context_ablation, CODE),
         "code_seeds": functools.partial(long_context_seeds, CODE),
         "micro": grid_micro, "paper": grid_paper}
DEFAULT_MODELS = {"cpu": ALL_MODELS, "ablation": ["moneta"], "seeds": ALL_MODELS, "context_check": ["transformer"],
                  "bpe": ALL_MODELS, "bpe_ablation": ["moneta"], "bpe_seeds": ALL_MODELS, "bpe_4x": ALL_MODELS,
                  "code": ALL_MODELS, "code_ablation": ["moneta"], "code_seeds": ALL_MODELS,
                  "micro": ["moneta", "transformer"], "paper": ALL_MODELS}


def cache_key(config):
    # the resolved model config is hashed too, so a change of a model's defaults never reuses a stale run
    mcfg = models.make_config(
        config["model"], config["preset"], **config["model_args"],
        **{k: config[k] for k in ("n_layer", "n_embd", "n_head") if config[k] is not None},
        block_size=config["block_size"])
    resolved = models.function_dict(mcfg)
    resolved.pop("vocab_size")  # set from the dataset by train.py
    if hasattr(mcfg, "compile_memory"):  # not a function of the model, but False in every finished run's key
        resolved["compile_memory"] = False
    # the preset's lr was a model config field when the finished runs were keyed: kept, so their keys still match
    resolved["learning_rate"] = models.preset_learning_rate(config["preset"])
    return hashlib.sha1(json.dumps([config, resolved], sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Running one configuration

def train_config(config, out_dir, device="auto", dataset=None):
    """The TrainConfig of a run."""
    c = config
    cfg = train_mod.TrainConfig(
        model=c["model"], preset=c["preset"], n_layer=c["n_layer"], n_embd=c["n_embd"], n_head=c["n_head"],
        block_size=c["block_size"], model_args=json.dumps(c["model_args"]) if c["model_args"] else "",
        dataset=dataset or c["dataset"], out_dir=str(out_dir), init_from="scratch", always_save_checkpoint=False,
        max_iters=c["max_iters"], batch_size=c["batch_size"],
        gradient_accumulation_steps=c["gradient_accumulation_steps"], eval_interval=max(1, c["max_iters"]),
        eval_iters=2, log_interval=max(1, c["max_iters"] // 8), seed=c["seed"], learning_rate=c["learning_rate"],
        min_lr=c["min_lr"], warmup_iters=c["warmup_iters"], device=device, dtype=c["dtype"], compile=c["compile"])
    return dataclasses.replace(cfg, **c.get("train_extra", {}))


def torchrun_command(cfg, nproc):
    """The torchrun command line of a TrainConfig (the keys that differ from TrainConfig's defaults)."""
    default = dataclasses.asdict(train_mod.TrainConfig())
    args = [f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items()
            if k == "model" or (v != default[k] and v is not None)]
    return ["torchrun", "--standalone", f"--nproc_per_node={nproc}", "train.py", *args]


# The per-position curve scores each target token once in every POSITION_SHIFTS-th of the window (below)
POSITION_SHIFTS = 8


@torch.no_grad()
def _window_losses(model, val, starts, T, dev, use_bf16):
    """[len(starts), T] float64: the loss of each target token of the T-token windows of val at `starts`."""
    window = np.arange(T + 1)
    bs = max(1, 8192 // T)
    out = []
    for i in range(0, len(starts), bs):
        w = torch.from_numpy(val[starts[i:i + bs, None] + window].astype(np.int64)).to(dev)
        x, y = w[:, :-1], w[:, 1:]
        with torch.autocast(dev.type, dtype=torch.bfloat16) if use_bf16 else torch.autocast(dev.type, enabled=False):
            logits, _ = model(x)  # the full logits; the per-token loss is taken below
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                 reduction="none").view(y.shape)
        out.append(loss.double().cpu())
    return torch.cat(out)


def check_val_fits(val_tokens, T, shifts=POSITION_SHIFTS):
    """The balanced per-position loss needs T to be a multiple of `shifts` and a val split of at least one window
    plus the last tiling's offset (and its target): run_one checks it before training, not after."""
    if T % shifts:
        raise ValueError(f"context {T} is not a multiple of {shifts}: the balanced per-position loss needs one")
    need = T + (shifts - 1) * (T // shifts) + 1
    if val_tokens < need:
        raise ValueError(f"the val split ({val_tokens} tokens) is too short for {shifts} shifted windows of {T}: "
                         f"it needs {need}; use a shorter context or a larger val split")


def position_balanced_losses(model, val, T, n_windows, dev, use_bf16, shifts=POSITION_SHIFTS):
    """Mean loss at each position of the window, with the same target tokens in every bin of T // shifts
    positions. One pass over fixed windows scores different text at each position (with 64 windows of 1,024
    tokens, positions 513-1,024 hold other tokens than positions 129-256), and text difficulty moves such bins
    as much as a model's use of its context does. Here `shifts` tilings of one contiguous stretch of val, each
    T // shifts tokens later than the one before, score every kept target once at a position in each such bin
    (kept: the targets that every tiling covers). Inside the first bin the finer positions are interleaved
    (every T // shifts-th token), not the same tokens."""
    check_val_fits(len(val), T, shifts)
    step = T // shifts
    n_windows = min(n_windows, (len(val) - 1 - (shifts - 1) * step) // T)
    total, count = torch.zeros(T, dtype=torch.float64), torch.zeros(T, dtype=torch.float64)
    lo, hi = (shifts - 1) * step, n_windows * T  # kept targets: val[lo + 1 : hi + 1], in every tiling
    for j in range(shifts):
        starts = j * step + np.arange(n_windows, dtype=np.int64) * T
        loss = _window_losses(model, val, starts, T, dev, use_bf16)
        target = torch.from_numpy(starts[:, None] + np.arange(T))  # index of each target in val, minus 1
        keep = ((target >= lo) & (target < hi)).double()
        total += (loss * keep).sum(0)
        count += keep.sum(0)
    return (total / count).tolist(), step


@torch.no_grad()
def evaluate(ckpt_path, eval_tokens, device="auto", dataset=None):
    """val loss over fixed evenly spaced non-overlapping val windows of the run's context, the mean loss at each
    position of those windows, and the position-balanced one (position_balanced_losses: the same tokens in every
    bin, the curve that says whether a model uses its long context). Loads the final checkpoint written by
    train.py."""
    dev = cli.resolve_device(device)
    ckpt = train_mod.load_checkpoint(ckpt_path, map_location=dev)
    mcfg = models.config_from_dict(ckpt["model_name"], ckpt["model_config"])
    model = models.build_model(mcfg).to(dev)
    model.load_state_dict(ckpt["model"])
    model.eval()
    data_dir = pathlib.Path(dataset) if dataset else pathlib.Path(ckpt["dataset"]["dir"])
    val = load_split(data_dir, "val")
    T = mcfg.block_size
    n_win = max(1, min(eval_tokens // T, (len(val) - 1) // T))
    starts = np.linspace(0, len(val) - T - 1, n_win).astype(np.int64)
    use_bf16 = dev.type == "cuda" and ckpt["train_config"].get("dtype") in ("bfloat16", "auto")
    per_pos = _window_losses(model, val, starts, T, dev, use_bf16).mean(0)
    balanced, step = position_balanced_losses(model, val, T, n_win, dev, use_bf16)
    return {"val_loss": per_pos.mean().item(), "per_position": per_pos.tolist(), "val_windows": int(n_win),
            "val_tokens": int(n_win * T), "per_position_balanced": balanced, "balanced_bin": step,
            "model": model, "mcfg": mcfg, "iter_num": int(ckpt["iter_num"])}


def finish_record(spec, key, out_dir, ev, train_s, result=None):
    """The record of an evaluated run."""
    c, model, mcfg = spec["config"], ev["model"], ev["mcfg"]
    T = mcfg.block_size
    tokens = c["max_iters"] * c["batch_size"] * c["gradient_accumulation_steps"] * T
    fpt = model.flops_per_token(T)
    rec = {
        "key": key, "model": c["model"], "size": spec["size"], "label": spec["label"], "sweeps": spec["sweeps"],
        "n_layer": mcfg.n_layer, "n_embd": mcfg.n_embd, "n_head": mcfg.n_head, "mlp_hidden": mcfg.hidden,
        "block_size": T, "n_params": model.num_params(False), "n_params_non_embedding": model.num_params(),
        "flops_per_token": fpt, "tokens_trained": tokens, "train_flops": fpt * tokens,
        "val_loss": ev["val_loss"], "val_ppl": math.exp(ev["val_loss"]), "val_windows": ev["val_windows"],
        "val_tokens": ev["val_tokens"], "train_loss": result.get("train_loss") if result else None,
        "train_val_loss": result.get("val_loss") if result else None,
        "train_s": train_s, "tokens_per_s": tokens / train_s if train_s else None,
        "wall_s": None, "out_dir": str(out_dir),
        "model_config": mcfg.to_dict(), "config": c, "per_position": ev["per_position"],
        "per_position_balanced": ev["per_position_balanced"], "balanced_bin": ev["balanced_bin"],
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return rec


def run_one(spec, cache_dir, device="auto", dataset=None, keep_ckpt=False, launch=None, log=print):
    """Train (in-process, or via `launch` = a torchrun command runner) and evaluate one run; returns its
    record, also written atomically to <cache>/<key>.json."""
    key = cache_key(spec["config"])
    out_dir = cache_dir / key
    t0 = time.time()
    cfg = train_config(spec["config"], out_dir, device, dataset)
    check_val_fits(len(load_split(train_mod.resolve_dataset(cfg.dataset), "val")), spec["config"]["block_size"])
    result = None
    if launch is not None:
        launch(cfg)
    else:
        result = train_mod.train(cfg)  # validates cfg first
    train_s = time.time() - t0
    t1 = time.time()
    ev = evaluate(out_dir / "ckpt.pt", spec["config"]["eval_tokens"], device, dataset)
    if ev["iter_num"] != spec["config"]["max_iters"]:
        raise RuntimeError(f"{out_dir / 'ckpt.pt'} is at iteration {ev['iter_num']}, not {spec['config']['max_iters']}")
    rec = finish_record(spec, key, out_dir, ev, train_s, result)
    rec["wall_s"] = time.time() - t0
    rec["eval_s"] = time.time() - t1
    if result is not None:
        rec["train_s"] = result["elapsed_s"]
    train_mod.save_json(rec, cache_dir / f"{key}.json")
    if not keep_ckpt:
        for name in ("ckpt.pt", "ckpt_best.pt"):
            (out_dir / name).unlink(missing_ok=True)
    return rec


def load_cached(cache_dir, key):
    path = cache_dir / f"{key}.json"
    if path.is_file():
        try:
            rec = json.loads(path.read_text())
            if rec.get("key") == key and rec.get("val_loss") is not None:
                return rec
        except (json.JSONDecodeError, OSError):
            pass
    return None


# ----------------------------------------------------------------------------------------------
# Analysis and plots

def fit_power_law(n, loss):
    """L = a N^-b by least squares in log-log: (a, b); None with fewer than 2 distinct sizes."""
    n, loss = np.asarray(n, float), np.asarray(loss, float)
    if len(set(n.tolist())) < 2:
        return None
    slope, intercept = np.polyfit(np.log(n), np.log(loss), 1)
    return float(math.exp(intercept)), float(-slope)


def _by_model(records, sweep):
    out = {}
    for r in records:
        if sweep in r["sweeps"]:
            out.setdefault(r["model"], []).append(r)
    return out


def summarize(records):
    """Power-law fits per model (size sweep) and the context sweep's loss change."""
    fits, context = {}, {}
    for model, rs in _by_model(records, "size").items():
        fit = fit_power_law([r["n_params_non_embedding"] for r in rs], [r["val_loss"] for r in rs])
        if fit:
            fits[model] = {"a": fit[0], "b": fit[1], "n_sizes": len(rs)}
    flops, ranges = {}, {}
    for model, rs in _by_model(records, "size").items():
        fit = fit_power_law([r["train_flops"] for r in rs], [r["val_loss"] for r in rs])
        if fit:
            flops[model] = {"a": fit[0], "b": fit[1]}
            ranges[model] = (min(r["train_flops"] for r in rs), max(r["train_flops"] for r in rs))
    if len(flops) >= 2:  # the fitted loss of every model at one compute inside all models' ranges
        lo, hi = max(r[0] for r in ranges.values()), min(r[1] for r in ranges.values())
        if lo <= hi:
            ref = math.sqrt(lo * hi)
            for model, f in flops.items():
                f["ref_flops"] = ref
                f["loss_at_ref_flops"] = f["a"] * ref ** -f["b"]
    for model, rs in _by_model(records, "context").items():
        rs = sorted(rs, key=lambda r: r["block_size"])
        if len(rs) >= 2:
            context[model] = {"contexts": [r["block_size"] for r in rs], "val_loss": [r["val_loss"] for r in rs],
                              "gain_shortest_to_longest": rs[0]["val_loss"] - rs[-1]["val_loss"]}
    seeds = {}
    for model, rs in _by_model(records, "seed").items():
        v = np.array([r["val_loss"] for r in rs])
        seeds[model] = {"seeds": [r["config"]["seed"] for r in rs], "val_loss": v.tolist(), "mean": float(v.mean()),
                        "std": float(v.std(ddof=1)) if len(v) > 1 else None}
    return {"power_law": fits, "power_law_flops": flops, "context": context, "seeds": seeds}


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("scaling.py: the plots need matplotlib: pip install matplotlib "
                         "(or pass --no_plots)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


COLORS = {"moneta": "tab:blue", "yaad": "tab:orange", "memora": "tab:green", "transformer": "tab:gray"}


def position_curve(record):
    """(per-position losses, balanced?): the position-balanced curve, or a run's single-pass one when it was
    evaluated before the balanced one existed (its bins hold different text)."""
    if record.get("per_position_balanced"):
        return record["per_position_balanced"], True
    return record["per_position"], False


def _smooth_positions(losses, n_bins=40):
    """Per-position losses averaged in log-spaced position bins: (positions, losses)."""
    y = np.asarray(losses)
    T = len(y)
    edges = np.unique(np.round(np.logspace(0, math.log10(T), n_bins + 1)).astype(int))
    edges = np.concatenate([[0], edges])
    edges[-1] = T
    xs, ys = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        if b > a:
            xs.append((a + b + 1) / 2)
            ys.append(y[a:b].mean())
    return xs, ys


def _loss_ticks(ax, values):
    """Readable linear tick labels on a log-scaled loss axis."""
    from matplotlib import ticker
    lo, hi = min(values), max(values)
    if hi > lo:
        ax.set_yticks(np.round(np.linspace(lo, hi, 6), 3))
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.3f"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def plot(records, out_dir, grid, summary):
    plt = _plt()
    written = []
    sizes = _by_model(records, "size")
    if sizes:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for model, rs in sizes.items():
            rs = sorted(rs, key=lambda r: r["n_params_non_embedding"])
            n = [r["n_params_non_embedding"] for r in rs]
            fit = summary["power_law"].get(model)
            lab = model + (f" (b={fit['b']:.3f})" if fit else "")
            ax.plot(n, [r["val_loss"] for r in rs], "o", color=COLORS.get(model), label=lab)
            if fit:
                xx = np.logspace(math.log10(min(n)), math.log10(max(n)), 50)
                ax.plot(xx, fit["a"] * xx ** -fit["b"], "-", color=COLORS.get(model), alpha=0.7)
        ax.set_xscale("log"); ax.set_yscale("log")
        ax.set_xlabel("non-embedding parameters"); ax.set_ylabel("val loss (nats/token)")
        _loss_ticks(ax, [r["val_loss"] for rs in sizes.values() for r in rs])
        T = sorted({r["block_size"] for rs in sizes.values() for r in rs})
        ax.set_title(f"{grid}: val loss vs size (context {', '.join(map(str, T))}); fit L = a N^-b", fontsize=9)
        ax.legend(fontsize=8); ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout(); fig.savefig(out_dir / "scaling_params.png", dpi=120); plt.close(fig)
        written.append("scaling_params.png")

        fig, ax = plt.subplots(figsize=(6, 4.5))
        for model, rs in sizes.items():
            rs = sorted(rs, key=lambda r: r["train_flops"])
            f = summary.get("power_law_flops", {}).get(model)
            lab = model + (f" (fit at {f['ref_flops']:.2g} FLOPs: {f['loss_at_ref_flops']:.3f})"
                           if f and "ref_flops" in f else "")
            ax.plot([r["train_flops"] for r in rs], [r["val_loss"] for r in rs], "o-", color=COLORS.get(model),
                    label=lab)
            if f and "ref_flops" in f:
                ax.axvline(f["ref_flops"], color="k", lw=0.5, ls=":")
        ax.set_xscale("log"); ax.set_yscale("log")
        ax.set_xlabel("training FLOPs (tokens x flops_per_token)"); ax.set_ylabel("val loss (nats/token)")
        _loss_ticks(ax, [r["val_loss"] for rs in sizes.values() for r in rs])
        ax.set_title(f"{grid}: val loss vs training compute (size sweep)", fontsize=9)
        ax.legend(fontsize=8); ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout(); fig.savefig(out_dir / "scaling_flops.png", dpi=120); plt.close(fig)
        written.append("scaling_flops.png")
    ctx = _by_model(records, "context")
    if ctx:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for model, rs in ctx.items():
            rs = sorted(rs, key=lambda r: r["block_size"])
            ax.plot([r["block_size"] for r in rs], [r["val_loss"] for r in rs], "o-", color=COLORS.get(model),
                    label=model)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training context (tokens)"); ax.set_ylabel("val loss at that context (nats/token)")
        S = sorted({r["size"] for rs in ctx.values() for r in rs})
        ax.set_title(f"{grid}: val loss vs context length (size {', '.join(S)})", fontsize=9)
        ax.legend(fontsize=8); ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout(); fig.savefig(out_dir / "scaling_context.png", dpi=120); plt.close(fig)
        written.append("scaling_context.png")
    # per-position curves: one panel per model (context sweep), or per ablation axis
    groups = {m: sorted(rs, key=lambda r: r["block_size"]) for m, rs in ctx.items()}
    for axis in ("p", "q"):
        rs = [r for r in records if axis in r["sweeps"]]
        if rs:
            groups[f"moneta, {axis} sweep"] = rs
    if not groups:
        groups = {"all runs": records}
    n = len(groups)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False, sharey=True)
    for ax, (name, rs) in zip(axes[0], groups.items()):
        cmap = plt.get_cmap("viridis")
        single = 0  # runs evaluated before the balanced curve existed
        for i, r in enumerate(rs):
            curve, balanced = position_curve(r)
            single += not balanced
            xs, ys = _smooth_positions(curve)
            lab = r.get("label") if name.startswith("moneta,") else f"T={r['block_size']} ({r['size']})" + (
                f" {r['label']}" if r.get("label") else "")
            if name == "all runs":
                lab = f"{r['model']} {r['size']} T={r['block_size']}" + (f" {r['label']}" if r.get("label") else "")
            ax.plot(xs, ys, "-", color=cmap(i / max(1, len(rs) - 1)), label=lab)
        ax.set_xscale("log"); ax.set_xlabel("position in context")
        ax.set_title(name + (f" ({single} of {len(rs)} single-pass)" if single else " (position-balanced)"), fontsize=9)
        ax.grid(True, which="both", alpha=0.3); ax.legend(fontsize=7)
    axes[0][0].set_ylabel("val loss at position (nats)")
    fig.tight_layout(); fig.savefig(out_dir / "per_position.png", dpi=120); plt.close(fig)
    written.append("per_position.png")
    ab = {axis: sorted([r for r in records if axis in r["sweeps"]], key=lambda r, a=axis: ablation_value(r, a))
          for axis in ("p", "q")}
    if any(ab.values()):
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), squeeze=False)
        for ax, (axis, rs) in zip(axes[0], ab.items()):
            for j, T in enumerate(sorted({r["block_size"] for r in rs})):
                sub = [r for r in rs if r["block_size"] == T]
                ax.plot([ablation_value(r, axis) for r in sub], [r["val_loss"] for r in sub], "o-",
                        color=["tab:blue", "tab:purple", "tab:red"][j % 3], label=f"context {T}")
            ax.legend(fontsize=8)
            ax.set_xlabel(axis if axis == "p" else "q"); ax.set_ylabel("val loss")
            ax.set_title(f"Moneta: {'p at q=4' if axis == 'p' else 'q at p=3'}", fontsize=9)
            ax.grid(True, alpha=0.3)
        fig.tight_layout(); fig.savefig(out_dir / "ablation.png", dpi=120); plt.close(fig)
        written.append("ablation.png")
    return written


def ablation_value(r, axis):
    return r["model_config"]["p"] if axis == "p" else r["model_config"]["q_norm"]


def table(records):
    lines = [f"{'model':12s} {'size':5s} {'T':>5s} {'N_nonemb':>10s} {'tokens':>9s} {'GFLOPs':>9s} "
             f"{'val_loss':>8s} {'ppl':>6s} {'wall_s':>7s}  label"]
    for r in sorted(records, key=lambda r: (r["model"], r["n_params_non_embedding"], r["block_size"], r["key"])):
        lines.append(f"{r['model']:12s} {r['size']:5s} {r['block_size']:5d} {r['n_params_non_embedding']:10,d} "
                     f"{r['tokens_trained']:9,d} {r['train_flops'] / 1e9:9.1f} {r['val_loss']:8.4f} "
                     f"{r['val_ppl']:6.3f} {r['wall_s']:7.0f}  {r.get('label') or ''}")
    return "\n".join(lines)


POSITION_BIN_EDGES = [0, 1, 8, 32, 128, 256, 512, 1024, 2048, 4096]


def markdown(grid, records, summary, failed=()):
    """Markdown tables of a grid's results (written to <out>/<grid>/summary.md)."""
    out = [f"# Scaling grid `{grid}`", ""]
    models_ = [m for m in COLORS if any(r["model"] == m for r in records)]
    for sweep, col, what in (("size", "size", "size sweep"), ("context", "block_size", "context sweep")):
        rs = [r for r in records if sweep in r["sweeps"]]
        if not rs:
            continue
        cols = sorted({(r["n_params_non_embedding"] if sweep == "size" else r["block_size"], r[col]) for r in rs
                       if r["model"] == models_[0]} or {(r[col], r[col]) for r in rs})
        keys = [c[1] for c in cols]
        head = ([f"{r['size']} ({r['n_layer']}x{r['n_embd']})" for k in keys for r in rs
                 if r["model"] == models_[0] and r[col] == k][:len(keys)] if sweep == "size" else [f"T={k}" for k in keys])
        fixed = sorted({r["block_size"] if sweep == "size" else r["size"] for r in rs})
        out += [f"## {what} (val loss, nats/token; {'context' if sweep == 'size' else 'size'} {fixed})", "",
                "| model | " + " | ".join(map(str, head)) + " |", "|---" * (len(keys) + 1) + "|"]
        for m in models_:
            vals = {r[col]: r for r in rs if r["model"] == m}
            cells = []
            for k in keys:
                r = vals.get(k)
                cells.append("-" if r is None else (f"{r['val_loss']:.4f} ({r['n_params_non_embedding'] / 1e3:.0f}K)"
                                                    if sweep == "size" else f"{r['val_loss']:.4f}"))
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    for axis in ("p", "q"):
        rs = [r for r in records if axis in r["sweeps"]]
        if rs:
            out += [f"## Moneta {axis} sweep", "", "| run | val loss | ppl |", "|---|---|---|"]
            out += [f"| {r['label']} | {r['val_loss']:.4f} | {r['val_ppl']:.3f} |" for r in rs]
            out.append("")
    if summary["power_law"]:
        out += ["## power law L = a N^-b (non-embedding parameters)", "", "| model | a | b |", "|---|---|---|"]
        out += [f"| {m} | {f['a']:.3f} | {f['b']:.4f} |" for m, f in summary["power_law"].items()]
        out.append("")
    eq = {m: f for m, f in summary.get("power_law_flops", {}).items() if "ref_flops" in f}
    if eq:
        ref = next(iter(eq.values()))["ref_flops"]
        out += [f"## equal compute: fitted val loss at {ref:.3g} training FLOPs (L = a C^-b per model)", "",
                "| model | loss at equal FLOPs | b (FLOPs) |", "|---|---|---|"]
        out += [f"| {m} | {f['loss_at_ref_flops']:.4f} | {f['b']:.4f} |" for m, f in eq.items()]
        out.append("")
    if summary.get("seeds"):
        out += ["## seed noise (same run, other seeds)", "", "| model | val losses | mean | std |", "|---|---|---|---|"]
        out += [f"| {m} | {', '.join(f'{x:.4f}' for x in s['val_loss'])} | {s['mean']:.4f} | "
                f"{s['std']:.4f} |" if s["std"] is not None else f"| {m} | {s['val_loss']} | | |"
                for m, s in summary["seeds"].items()]
        out.append("")
    longest = max((r["block_size"] for r in records if r.get("per_position")), default=0)
    if longest >= 256:  # does a model use its long context? (the per-position loss past a few hundred tokens)
        edges = [e for e in POSITION_BIN_EDGES if e < longest] + [longest]
        out += [f"## mean loss by position in the window (runs at context {longest})", "",
                "Position-balanced (the same tokens in every bin of 1/8 of the window; `position_balanced_losses`)"
                " unless marked *: those runs predate it, and their bins hold different text.", "",
                "| run | " + " | ".join(f"{a + 1}-{b}" if b > a + 1 else str(b) for a, b in zip(edges, edges[1:]))
                + " |",
                "|---" * len(edges) + "|"]
        for r in records:
            if r["block_size"] == longest and r.get("per_position"):
                curve, balanced = position_curve(r)
                pp = np.asarray(curve)
                out.append(f"| {r['model']} {r['size']}" + (f" {r['label']}" if r.get("label") else "")
                           + ("" if balanced else " *") + " | "
                           + " | ".join(f"{pp[a:b].mean():.3f}" for a, b in zip(edges, edges[1:])) + " |")
        out.append("")
    if failed:
        out += ["## failed runs", ""] + [f"- {f['name']}: {f['error']}" for f in failed] + [""]
    out += ["## all runs", "", "```", table(records), "```", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Driver

def write_results(grid_dir, grid, records, failed, pending, summary):
    grid_dir.mkdir(parents=True, exist_ok=True)
    slim = [{k: v for k, v in r.items() if k not in ("per_position", "per_position_balanced")} for r in records]
    train_mod.save_json({"grid": grid, "n_runs": len(records), "records": slim, "failed": failed, "pending": pending,
                         "summary": summary, "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                        grid_dir / "results.json")
    per_position = {r["key"]: {"model": r["model"], "size": r["size"], "block_size": r["block_size"],
                               "label": r.get("label"), "per_position": r["per_position"],
                               "per_position_balanced": r.get("per_position_balanced"),
                               "balanced_bin": r.get("balanced_bin")} for r in records}
    train_mod.save_json(per_position, grid_dir / "per_position.json")


def _claim(cache_dir, key):
    """Claims a run for this process, or returns None when another live process on this machine has it: several
    scaling.py processes can share one grid (one run each at a time). A claim whose process is gone is taken
    over; an empty one is being written, so it counts as taken. Returns the claim file to remove when done."""
    path = cache_dir / f"{key}.claim"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text())
            except (OSError, ValueError):
                return None
            try:
                os.kill(pid, 0)
                return None  # its process is alive
            except ProcessLookupError:
                path.unlink(missing_ok=True)  # its process died: take the run over
            except PermissionError:
                return None  # alive, another user's
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return path
    return None


def run_grid(grid, models_=None, out="results/scaling", cache=None, max_runs=None, device="auto", dataset=None,
             keep_ckpt=False, launch=False, nproc=8, plots=True, plots_only=False, log=print, sizes=None):
    """Run (or complete) a grid, or only its runs of the named sizes; returns {"records", "failed", "pending",
    "summary", "plots"}."""
    if grid not in GRIDS:
        raise SystemExit(f"scaling.py: unknown grid {grid!r}; valid: {', '.join(GRIDS)}")
    models_ = models_ or DEFAULT_MODELS[grid]
    for m in models_:
        if m not in models.MODELS:
            raise SystemExit(f"scaling.py: unknown model {m!r}; valid: {', '.join(models.MODELS)}")
    out = pathlib.Path(out)
    # a subset of the sizes gets its own results directory: it must not overwrite the whole grid's
    grid_dir = out / (grid if not sizes else f"{grid}_sizes_{'_'.join(sizes)}")
    cache_dir = pathlib.Path(cache) if cache else out / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    specs = GRIDS[grid](models_)
    if sizes:
        known = sorted({spec["size"] for spec in specs})
        if set(sizes) - set(known):
            raise SystemExit(f"scaling.py: grid {grid!r} has no size {', '.join(sorted(set(sizes) - set(known)))}; "
                             f"its sizes: {', '.join(known)}")
        specs = [spec for spec in specs if spec["size"] in sizes]
    if dataset:  # another corpus is another run: it goes into the cache key
        for spec in specs:
            spec["config"]["dataset"] = dataset
    paper = grid == "paper"
    keep_ckpt = keep_ckpt or paper
    records, failed, pending, new_runs = [], [], [], 0
    log(f"grid {grid}: {len(specs)} runs ({', '.join(models_)}); cache {cache_dir}")
    for i, spec in enumerate(specs):
        key = cache_key(spec["config"])
        c = spec["config"]
        name = f"[{i + 1}/{len(specs)}] {c['model']} size={spec['size']} T={c['block_size']}" + (
            f" {spec['label']}" if spec["label"] else "") + f" ({key})"
        rec = load_cached(cache_dir, key)
        if rec is not None:
            rec.update(size=spec["size"], sweeps=spec["sweeps"], label=spec["label"])
            records.append(rec)
            log(f"{name}: cached, val loss {rec['val_loss']:.4f}")
            continue
        out_dir = cache_dir / key
        if paper and not launch:
            ckpt = out_dir / "ckpt.pt"
            done = False
            if ckpt.is_file():
                try:
                    done = int(torch.load(ckpt, map_location="cpu", weights_only=True)["iter_num"]) == c["max_iters"]
                except Exception:  # noqa: BLE001 - a partial or foreign file: not done
                    done = False
            if not done:
                cmd = torchrun_command(train_config(c, out_dir, "auto", dataset), nproc)
                pending.append({"key": key, "command": shlex.join(cmd)})
                log(f"{name}: to run:\n  {shlex.join(cmd)}")
                continue
        if plots_only or (max_runs is not None and new_runs >= max_runs):
            err_file = cache_dir / f"{key}.error.json"
            if err_file.is_file():  # failed last time and not retried now: still a failure
                failed.append({**json.loads(err_file.read_text()), "name": name, "retried": False})
                log(f"{name}: failed before (not retried): {failed[-1]['error']}")
            else:
                pending.append({"key": key, "name": name})
            continue
        claim = _claim(cache_dir, key)
        if claim is None:
            pending.append({"key": key, "name": name})
            log(f"{name}: running in another process, skipped")
            continue
        new_runs += 1
        log(f"{name}: training ...")
        try:
            runner = None
            if paper and launch:
                def runner(cfg, _n=nproc):
                    subprocess.run(torchrun_command(cfg, _n), cwd=REPO, check=True)
            elif paper:  # finished checkpoint: evaluate only
                def runner(cfg):
                    return None
            rec = run_one(spec, cache_dir, device, dataset, keep_ckpt, runner, log)
            records.append(rec)
            (cache_dir / f"{key}.error.json").unlink(missing_ok=True)
            log(f"{name}: val loss {rec['val_loss']:.4f} (ppl {rec['val_ppl']:.3f}), "
                f"{rec['n_params_non_embedding']:,} non-embedding params, {rec['wall_s']:.0f}s")
        except (Exception, SystemExit) as e:  # noqa: BLE001 - one failed run must not stop the grid
            err = f"{type(e).__name__}: {e}"
            failed.append({"key": key, "name": name, "config": c, "error": err, "traceback": traceback.format_exc(),
                           "failed_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            train_mod.save_json(failed[-1], cache_dir / f"{key}.error.json")  # kept for --plots_only; retried next run
            log(f"{name}: FAILED: {err}")
        finally:
            claim.unlink(missing_ok=True)
        summary = summarize(records)
        write_results(grid_dir, grid, records, failed, pending, summary)
    summary = summarize(records)
    write_results(grid_dir, grid, records, failed, pending, summary)
    written = []
    if plots and records:
        written = plot(records, grid_dir, grid, summary)
    if records:
        (grid_dir / "summary.md").write_text(markdown(grid, records, summary, failed))
        log(table(records))
    for model, fit in summary["power_law"].items():
        log(f"power law {model}: L = {fit['a']:.3f} N^-{fit['b']:.4f}  (b = {fit['b']:.4f}, {fit['n_sizes']} sizes)")
    for model, f in summary["power_law_flops"].items():
        if "ref_flops" in f:
            log(f"equal compute {model}: fitted val loss {f['loss_at_ref_flops']:.4f} at {f['ref_flops']:.3g} FLOPs "
                f"(L = {f['a']:.3f} C^-{f['b']:.4f})")
    for model, s in summary.get("seeds", {}).items():
        log(f"seeds {model}: " + ", ".join(f"{x:.4f}" for x in s["val_loss"])
            + (f"  mean {s['mean']:.4f} std {s['std']:.4f}" if s["std"] is not None else ""))
    for model, s in summary["context"].items():
        log(f"context {model}: " + ", ".join(f"T={t}: {l:.4f}" for t, l in zip(s["contexts"], s["val_loss"]))
            + f"  (gain {s['gain_shortest_to_longest']:+.4f})")
    if failed:
        log(f"{len(failed)} run(s) failed: " + "; ".join(f"{f['name']}: {f['error']}" for f in failed))
    if pending:
        log(f"{len(pending)} run(s) pending")
    if paper and pending and not launch:
        log("prepare the data once (online): python data/prepare_text.py --hf_dataset=HuggingFaceFW/fineweb-edu "
            "--hf_name=sample-100BT --hf_split=train --max_tokens=15200000000 --val_fraction=0.005 "
            "--out=data/fineweb_edu\nthen run the commands above (or pass --launch; an interrupted run continues "
            "with the same command plus --init_from=resume), then this command again to evaluate and plot")
    log(f"wrote {grid_dir / 'results.json'}" + (f" and {', '.join(written)}" if written else ""))
    return {"records": records, "failed": failed, "pending": pending, "summary": summary, "plots": written,
            "grid_dir": str(grid_dir)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default="cpu", choices=sorted(GRIDS))
    ap.add_argument("--models", default=None, help="comma-separated subset (default: the grid's models)")
    ap.add_argument("--out", default="results/scaling", help="results root: <out>/<grid>/results.json, plots")
    ap.add_argument("--cache", default=None, help="cache directory of finished runs (default <out>/cache)")
    ap.add_argument("--max_runs", type=int, default=None, help="train at most N new runs in this invocation")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dataset", default=None, help="override the grid's dataset (name under data/ or a dir)")
    ap.add_argument("--keep_ckpt", action="store_true", help="keep each run's checkpoints")
    ap.add_argument("--sizes", default=None, help="comma-separated subset of the grid's sizes (default: all)")
    ap.add_argument("--launch", action="store_true", help="paper grid: run the torchrun commands")
    ap.add_argument("--nproc", type=int, default=8, help="paper grid: GPUs per node for torchrun")
    ap.add_argument("--no_plots", action="store_true")
    ap.add_argument("--plots_only", action="store_true", help="no training: results and plots from the cache")
    args = ap.parse_args(argv)
    if os.environ.get("OMP_NUM_THREADS") is None and args.grid != "paper":
        torch.set_num_threads(1)  # a shared CPU: one thread per process unless told otherwise
    models_ = [m.strip() for m in args.models.split(",")] if args.models else None

    def log(msg, **_):
        print(msg, flush=True)
    res = run_grid(args.grid, models_, args.out, args.cache, args.max_runs, args.device, args.dataset,
                   args.keep_ckpt, args.launch, args.nproc, not args.no_plots, args.plots_only, log,
                   [s.strip() for s in args.sizes.split(",")] if args.sizes else None)
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
