"""Recall-intensive evaluation (issue 8): train each model on a synthetic recall task at a short length, then
score exact-match accuracy at the training length and beyond it (length generalization).

    python recall.py --preset=cpu --settings=mqar_d64 --extra_seeds=1,2   # one setting: lr sweep, then seeds
    python recall.py --preset=cpu --models=moneta,transformer --tasks=mqar
    python recall.py --preset=cpu --settings=mqar_d64_p8 --models=memora --lrs=5e-3   # part of a sweep
    python recall.py --preset=cpu --settings=mqar_d64_p8 --models=yaad --lrs=1e-2 --extra_seeds=1,2  # part of seeds
    python recall.py --preset=micro --out=/tmp/recall                # seconds (the CI test)
    python recall.py --preset=cpu --calibrate                        # tokens/s per model and task, no results

Models: moneta, yaad, memora, transformer (Transformer++, RoPE), transformer_nope (the same Transformer with
no position encoding: is "attention fails beyond its training length" RoPE's failure or attention's?),
transformer_rope500k (the same with RoPE base 500,000 instead of 10,000, as Llama 3: its four slowest frequency
pairs per head turn less than 0.3 rad over 4,096 positions, channels nearly free of position, where base 10,000
has none) and
moneta_linear, the linear-memory ablation of the Miras layer (Moneta with models.py's "linear_ablation"
variant). Every model runs at its defaults: no setting overrides a model internal such as the inner learning
rate. Parameter counts are matched by widening the SwiGLU of the models whose mixer has fewer parameters (the
Transformers and the linear ablation), so that non-embedding parameters are within ~5%. Each setting lists the
models it runs by default (`Setting.models`); --models overrides the list.

Tasks (data/recall_tasks.py):
  mqar      multi-query associative recall, Zoology-style. "State size" means the model width n_embd, as in
            Zoology (head_dim fixed at 32, so the heads and the recurrent state of every Miras layer grow with
            the width). Trained at train_len, scored at train_len and longer sequences with the same number of
            key-value pairs (the queries spread over a longer region). Loss on the query positions only.
  passkey   character-level passkey retrieval (RULER S-NIAH style) in a noise or a Shakespeare haystack,
            trained at train_len (random depths) and scored at several lengths x depths up to 16x train_len.
            Training loss: the answer digits only (with every next character, the digits are ~2% of the loss).

accuracy = exact match per sample (every query / every digit right); token_accuracy = per answer token.
Scoring is one teacher-forced forward pass over the whole sequence (argmax at the answer positions; equal to
greedy decoding for exact match). The Transformer's forward has no length limit (RoPE angles are computed
for the positions present; block_size is the training length, metadata only), so it is scored at every length
with full causal attention over the whole context, like the Miras models with their recurrent memory.

Learning rates: every (model, setting) is trained once per peak lr of the setting's lr_grid at seed 0; the
extra seeds (--extra_seeds) are trained at every lr tied for seed 0's best validation exact match (a held-out
set at the training length, never an evaluation set), and the reported lr is the one among those with the best
mean validation exact match over its seeds (ties: lower mean final training loss, then lower lr). So when
several lrs solve seed 0, the seeds decide which one solves the task reliably; when none scores above 0, the
lowest final training loss picks the one lr. results.json keeps every run with `selected` true/false.

The `cpu` preset (2 layers, width 64 = 2 heads of 32, AdamW + warmup/cosine, one thread per process; models
moneta, yaad, memora, transformer, and transformer_nope and transformer_rope500k on passkey):
  mqar_d64             4 kv pairs, vocabulary 64, trained at 32 tokens (2000 steps of 32 sequences), scored at
                       32, 64, 128, 256 on 256 held-out samples per length: the anchor (attention solves it)
  mqar_d64_p8          8 kv pairs, vocabulary 128, trained at 64 tokens on 4- and 8-pair sequences in equal parts
                       (4000 steps of 16 + 16; trained on 8 pairs alone the Transformer stayed on the plateau),
                       scored with 8 pairs at 64 ... 512
  passkey              noise haystack, trained at 256 characters (2000 steps of 8), scored at 256 ... 4096 x depths
                       0, .25, .5, .75, 1 on 8 samples per cell
  passkey_shakespeare  the same in a Shakespeare haystack
  lr grid 1e-3, 3e-3, 5e-3 for every model; the MQAR settings add 1e-2.

Training is train.train (AdamW with decay on matrices only, warmup + cosine, gradient clipping, atomic
checkpoints, resume) on TaskBatches: (inputs, targets) batches from the generators, seeded by (run seed, step), so
a resumed run sees the same batches as an uninterrupted one.

Outputs in --out (default results/recall):
  runs/<model>__<task>.json   one atomic JSON per finished (model, task setting): the cache; a later invocation
                              with the same settings skips it (--force reruns); a run interrupted mid-training
                              resumes from ckpt/<run>/ckpt.pt (train.py's out_dir of the run)
  results.json                every record: model, task, train_len, eval_len, depth, num_kv_pairs, accuracy,
                              token_accuracy, n_params, settings ...
  *.png                       accuracy vs context length per task (one line per model); passkey heatmaps
                              (depth x length), one per model
  summary.md                  the accuracy tables
"""
import argparse
import dataclasses
import json
import math
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

import models
import train
from data import recall_tasks
from train import ConfigError, save_json

REPO = pathlib.Path(__file__).resolve().parent
# the Transformer++ with other positions, beside the RoPE one on passkey: may they extrapolate past training?
TRANSFORMER_VARIANTS = ("transformer_nope", "transformer_rope500k")
ALL_MODELS = ("moneta", "yaad", "memora", "transformer") + TRANSFORMER_VARIANTS + ("moneta_linear",)
# config fields that make a study model out of a registry model (beside model_spec's variant preset)
STUDY_MODEL_ARGS = {"transformer_nope": {"attention_rope": False}, "transformer_rope500k": {"rope_theta": 5e5}}
ALL_TASKS = ("mqar", "passkey")
# generator seeds: training batches, the validation set (picks the lr), the evaluation sets, and the batches of
# the loss train.py logs at each checkpoint
TRAIN_SEED_BASE, VAL_SEED_BASE, EVAL_SEED_BASE, LOSS_SEED_BASE = 1_000_003, 5_000_011, 7_000_003, 3_000_017


def model_spec(model):
    """(registry name, variant preset or None) of a study model name."""
    if model == "moneta_linear":
        return "moneta", "linear_ablation"
    if model in TRANSFORMER_VARIANTS:
        return "transformer", None
    if model in models.MODELS:
        return model, None
    raise ConfigError(f"unknown model {model!r}; valid: {', '.join(ALL_MODELS)}")


# ----------------------------------------------------------------------------------------------
# Presets. A task setting = one trained model per study model.

@dataclasses.dataclass
class Setting:
    task: str                    # mqar | passkey
    name: str                    # unique within the preset, e.g. "mqar_d64"
    n_layer: int
    n_embd: int
    n_head: int
    train_len: int
    eval_lens: tuple
    steps: int
    batch_size: int
    learning_rate: float         # this run's peak lr (one of lr_grid; main() makes one run per value)
    warmup_iters: int
    eval_samples: int            # per eval length (mqar) or per (length, depth) (passkey)
    num_kv_pairs: int = 0        # mqar
    # mqar: training batches mix these pair counts in equal parts (Zoology trains on such a mix, its easiest
    # config most); empty: num_kv_pairs alone. Validation and evaluation use num_kv_pairs.
    train_kv_pairs: tuple = ()
    vocab_size: int = 0          # mqar (passkey: the fixed 96-character vocabulary)
    depths: tuple = ()           # passkey
    haystack: str = "noise"      # passkey
    num_digits: int = 5          # passkey
    mlp_hidden: dict = dataclasses.field(default_factory=dict)  # per study model; missing: Llama's rule
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    ckpt_interval: int = 100
    seed: int = 0
    lr_grid: tuple = ()          # peak lrs swept per model; the best by validation accuracy is reported
    models: tuple = ()           # the study models run on this setting by default (empty: ALL_MODELS)
    model_overrides: dict = dataclasses.field(default_factory=dict)  # per study model: config fields to set
    passkey_loss: str = "answer"   # passkey training loss: "answer" (the digits) or "text" (every next char)

    def __post_init__(self):
        if self.passkey_loss not in ("answer", "text"):
            raise ConfigError(f"passkey_loss={self.passkey_loss!r}: use 'answer' or 'text'")
        if self.train_kv_pairs and (self.task != "mqar" or self.batch_size % len(self.train_kv_pairs)):
            raise ConfigError(f"train_kv_pairs={self.train_kv_pairs}: an mqar setting only, with a batch_size "
                              f"({self.batch_size}) that splits into equal parts, one per pair count")

    def to_dict(self):
        """What identifies one run: every field but lr_grid and models (widening either must not redo finished
        runs)."""
        d = dataclasses.asdict(self)
        del d["lr_grid"], d["models"]
        d["eval_lens"], d["depths"] = list(self.eval_lens), list(self.depths)
        if self.train_kv_pairs:
            d["train_kv_pairs"] = list(self.train_kv_pairs)
        else:  # absent unless set: the runs cached before the field existed keep their identity
            del d["train_kv_pairs"]
        return d

    def runs(self):
        """This setting once per learning rate of its grid."""
        return [dataclasses.replace(self, learning_rate=lr) for lr in (self.lr_grid or (self.learning_rate,))]


# The peak lrs swept for every model. MQAR adds 1e-2: Moneta solved it only at 5e-3, the top of the first grid.
LR_GRID = (1e-3, 3e-3, 5e-3)
MQAR_LR_GRID = LR_GRID + (1e-2,)


def _setting(**kw):
    kw = dict(dict(lr_grid=LR_GRID, learning_rate=LR_GRID[0]), **kw)
    return Setting(warmup_iters=max(1, kw["steps"] // 10), **kw)


def _mqar(name, C, steps, **kw):
    return _setting(**dict(dict(task="mqar", name=name, n_layer=2, n_embd=C, n_head=C // 32, num_kv_pairs=4,
                                vocab_size=64, train_len=32, eval_lens=(32, 64, 128, 256), steps=steps,
                                batch_size=32, eval_samples=256, lr_grid=MQAR_LR_GRID), **kw))


def _passkey(name, C, steps, **kw):
    return _setting(**dict(dict(task="passkey", name=name, n_layer=2, n_embd=C, n_head=C // 32, train_len=256,
                                eval_lens=(256, 512, 1024, 2048, 4096), depths=(0.0, 0.25, 0.5, 0.75, 1.0),
                                steps=steps, batch_size=8, eval_samples=8), **kw))


# SwiGLU widths that match non-embedding parameters to the full-memory Miras models (see the module doc). A
# Miras layer (head_dim 32) has ~15k / 40k / 140k parameters at n_embd 32 / 64 / 128 (the MLP memory's
# initial weights included), attention 4 n_embd^2, the linear memory 7/8 of the initial weights less; the
# default SwiGLU (8/3 n_embd rounded up to 256) is widened for the Transformer and the linear ablation.
# (transformer_nope's explicit entry predates the fallback to the model's width; it stays so that its cached runs
# keep their identity)
MATCH_HIDDEN = {w: dict(h, transformer_nope=h["transformer"]) for w, h in {
    32: dict(transformer=384, moneta_linear=320),
    64: dict(transformer=384, moneta_linear=320),
    128: dict(transformer=512, moneta_linear=448)}.items()}
MIRAS_AND_TRANSFORMER = ("moneta", "yaad", "memora", "transformer")

PRESETS = {
    "cpu": [
        # the anchor: attention solves 4-pair MQAR at width 64 (Zoology) -- 3 of 3 seeds with this recipe
        _mqar("mqar_d64", 64, 2000, mlp_hidden=MATCH_HIDDEN[64], models=MIRAS_AND_TRANSFORMER),
        # harder: twice the pairs over twice the length (Zoology sweeps pairs and length), trained on 4- and
        # 8-pair sequences in equal parts (on 8 alone the Transformer stayed on the guess-a-value plateau)
        _mqar("mqar_d64_p8", 64, 4000, num_kv_pairs=8, train_kv_pairs=(4, 8), vocab_size=128, train_len=64,
              eval_lens=(64, 128, 256, 512), mlp_hidden=MATCH_HIDDEN[64], models=MIRAS_AND_TRANSFORMER),
        # passkey in two haystacks, with a NoPE and a RoPE-base-5e5 Transformer beside the RoPE one (is
        # "attention fails beyond its training length" RoPE's failure or attention's?)
        _passkey("passkey", 64, 2000, mlp_hidden=MATCH_HIDDEN[64],
                 models=MIRAS_AND_TRANSFORMER + TRANSFORMER_VARIANTS),
        _passkey("passkey_shakespeare", 64, 2000, haystack="shakespeare", mlp_hidden=MATCH_HIDDEN[64],
                 models=MIRAS_AND_TRANSFORMER + TRANSFORMER_VARIANTS),
    ],
    "micro": [
        _mqar("mqar_d32", 32, 3, n_layer=1, vocab_size=32, train_len=16, eval_lens=(16, 32),
              batch_size=4, eval_samples=8, ckpt_interval=2, mlp_hidden=MATCH_HIDDEN[32]),
        _mqar("mqar_d64", 64, 3, n_layer=1, vocab_size=32, train_len=16, eval_lens=(16, 32),
              batch_size=4, eval_samples=8, ckpt_interval=2, mlp_hidden=MATCH_HIDDEN[64]),
        _passkey("passkey", 32, 3, n_layer=1, train_len=80, eval_lens=(80, 160), depths=(0.0, 1.0), batch_size=2,
                 eval_samples=2, ckpt_interval=2, mlp_hidden=MATCH_HIDDEN[32]),
    ],
}


# ----------------------------------------------------------------------------------------------
# Data

def task_batch(s, n, seed, seq_len=None, depth=None):
    seq_len = seq_len or s.train_len
    if s.task == "mqar":
        return recall_tasks.mqar(n, seq_len=seq_len, num_kv_pairs=s.num_kv_pairs, vocab_size=s.vocab_size, seed=seed)
    return recall_tasks.passkey(n, context_len=seq_len, depth=depth, seed=seed, haystack=s.haystack,
                                num_digits=s.num_digits)


def vocab_size(s):
    return s.vocab_size if s.task == "mqar" else len(recall_tasks.PASSKEY_VOCAB)


def loss_batch(s, b):
    """(x, y) tensors of a TaskBatch with the training loss's targets (passkey_loss="text": every next char,
    the last target being the last digit; else the answer positions only)."""
    x = torch.from_numpy(b.inputs)
    if s.task == "passkey" and s.passkey_loss == "text":
        y = torch.from_numpy(np.concatenate([b.inputs[:, 1:], b.targets[:, -1:]], axis=1))
    else:
        y = torch.from_numpy(b.targets)
    return x, y


def train_batch(s, step):
    """(x, y) of training step `step`: a pure function of (seed, step). With train_kv_pairs, equal parts of
    the batch at each pair count (part i drawn with its own generator seed)."""
    seed = TRAIN_SEED_BASE + 1009 * s.seed + step
    if not s.train_kv_pairs:
        return loss_batch(s, task_batch(s, s.batch_size, seed=seed))
    n = s.batch_size // len(s.train_kv_pairs)
    parts = [loss_batch(s, recall_tasks.mqar(n, seq_len=s.train_len, num_kv_pairs=P, vocab_size=s.vocab_size,
                                             seed=[seed, i]))
             for i, P in enumerate(s.train_kv_pairs)]
    return tuple(torch.cat(xs) for xs in zip(*parts))


class TaskBatches:
    """train.train's batches for setting `s` (the members train.WindowBatches describes): optimizer step `step`
    is train_batch(s, step), one micro-batch in one process; the loss train.py evaluates at each checkpoint is
    taken on fresh task samples ("val") and on the first training batches ("train")."""

    def __init__(self, s):
        self.s, self.vocab_size = s, vocab_size(s)
        meta = {"vocab_size": self.vocab_size, "recall_setting": s.to_dict()}
        if s.task == "passkey":  # text: sample.py and eval.py read the checkpoint with this tokenizer
            meta.update(tokenizer="char", itos=list(recall_tasks.PASSKEY_VOCAB))
        self.info = {"dir": None, "meta": meta}

    def describe(self):
        return f"data: {self.s.task} samples generated per step (data/recall_tasks.py, setting {self.s.name})"

    def train_batch(self, step, micro, first, end):
        x, y = train_batch(self.s, step)
        return x[first:end], y[first:end]

    def eval_batch(self, split, k):
        if split == "train":
            return train_batch(self.s, k)
        return loss_batch(self.s, task_batch(self.s, self.s.batch_size, seed=LOSS_SEED_BASE + 1009 * self.s.seed + k))


# ----------------------------------------------------------------------------------------------
# One run

def _model_args(model, s):
    """The model config of `model` in setting `s` beyond its size keys: vocabulary, SwiGLU width, overrides."""
    over = dict(vocab_size=vocab_size(s), **STUDY_MODEL_ARGS.get(model, {}))
    hidden = s.mlp_hidden.get(model) or s.mlp_hidden.get(model_spec(model)[0])  # a variant: its model's width
    if hidden:
        over["mlp_hidden"] = hidden
    over.update(s.model_overrides.get(model, {}))
    return over


def model_config(model, s):
    name, variant = model_spec(model)
    return models.make_config(name, variant, n_layer=s.n_layer, n_embd=s.n_embd, n_head=s.n_head,
                              block_size=s.train_len, **_model_args(model, s))


def build(model, s):
    return models.build_model(model_config(model, s))


def train_config(model, s, run_dir, init_from="scratch", **over):
    """The train.TrainConfig of one run: model_config(model, s), trained on CPU in float32 for s.steps steps of
    s.batch_size sequences, AdamW at s.learning_rate (warmup, cosine to a tenth), a checkpoint (and train.py's
    loss evaluation) every s.ckpt_interval steps."""
    name, variant = model_spec(model)
    cfg = train.TrainConfig(
        model=name, preset=variant or "", n_layer=s.n_layer, n_embd=s.n_embd, n_head=s.n_head, block_size=s.train_len,
        model_args=json.dumps(_model_args(model, s)), dataset=f"recall:{s.name}", out_dir=str(run_dir),
        init_from=init_from, always_save_checkpoint=True, max_iters=s.steps, batch_size=s.batch_size,
        gradient_accumulation_steps=None, eval_interval=s.ckpt_interval, eval_iters=2,
        log_interval=max(1, s.steps // 10), seed=s.seed, learning_rate=s.learning_rate, min_lr=s.learning_rate / 10,
        warmup_iters=s.warmup_iters, lr_decay_iters=s.steps, weight_decay=s.weight_decay, beta1=0.9, beta2=0.95,
        grad_clip=s.grad_clip, device="cpu", dtype="float32", compile=False)
    return dataclasses.replace(cfg, **over)


def train_run(model, s, run_dir, log=print):
    """Train `model` on setting `s` with train.train in run_dir, resuming from its ckpt.pt when run.json says it
    is this run's. Returns (model, stats); a run whose loss turns non-finite keeps its last checkpoint's weights
    (the initial ones without one) and says so in stats["diverged"]."""
    run_dir = pathlib.Path(run_dir)
    signature = {"model": model, "setting": s.to_dict()}
    sig_path, ckpt_path = run_dir / "run.json", run_dir / "ckpt.pt"
    resume = ckpt_path.is_file() and sig_path.is_file() and json.loads(sig_path.read_text()) == signature
    start = train.load_checkpoint(ckpt_path)["iter_num"] if resume else 0
    if resume:
        log(f"  resuming {model} / {s.name} at step {start}")
    else:  # another run's (or a forced rerun's) checkpoint must never be resumed or read back below
        shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_json(signature, sig_path)
    cfg = train_config(model, s, run_dir, "resume" if resume else "scratch")
    diverged = None
    t0 = time.time()
    try:
        result = train.train(cfg, batches=TaskBatches(s))
    except train.TrainingDiverged as e:
        diverged, result = str(e), {}
        log(f"  {model} / {s.name}: {diverged}")
    elapsed = time.time() - t0  # this call's training time (a resumed run: since the resume)
    torch.manual_seed(s.seed)  # the initial weights train.train started from
    net = build(model, s)
    steps = 0
    if ckpt_path.is_file():
        ck = train.load_checkpoint(ckpt_path)
        if models.config_from_dict(cfg.model, ck["model_config"]) != net.config:
            raise RuntimeError(f"{ckpt_path} holds another model than model_config({model!r}, {s.name!r}); "
                               "rerun with --force")
        net.load_state_dict(ck["model"])
        steps = int(ck["iter_num"])
    tokens = steps * s.batch_size * s.train_len
    stats = dict(train_steps=steps, train_tokens=tokens, train_time_s=elapsed,
                 train_tokens_per_s=(tokens - start * s.batch_size * s.train_len) / max(elapsed, 1e-9),
                 final_train_loss=result.get("recent_train_loss"), diverged=diverged)
    return net, stats


@torch.no_grad()
def score(net, b, max_tokens=8192):
    """(exact-match accuracy, token accuracy) of `net` on TaskBatch `b`, in batches of <= max_tokens tokens."""
    was_training = net.training
    net.eval()
    L = b.inputs.shape[1]
    bs = max(1, max_tokens // L)
    right, tok_right, tok_n = [], 0, 0
    for i in range(0, len(b), bs):
        y = b.targets[i:i + bs]
        pred = net(torch.from_numpy(b.inputs[i:i + bs]))[0].argmax(-1).numpy()
        right.append(recall_tasks.exact_match(pred, y, per_sample=True))
        mask = y != recall_tasks.IGNORE
        tok_right += int((pred[mask] == y[mask]).sum())
        tok_n += int(mask.sum())
    net.train(was_training)
    return float(np.concatenate(right).mean()), tok_right / tok_n


def validate(net, s):
    """Accuracy at the training length on a held-out validation set (random depths for passkey): what picks
    the learning rate, so that the reported evaluation sets play no part in the choice."""
    n = s.eval_samples * max(1, len(s.depths))
    acc, tok = score(net, task_batch(s, n, seed=VAL_SEED_BASE + 7919 * s.seed))
    return dict(val_accuracy=acc, val_token_accuracy=tok, num_val_samples=n)


def evaluate(net, s):
    """Records (without the model fields) of accuracy at every eval length (x depth)."""
    out = []
    cells = [(L, d) for L in s.eval_lens for d in (s.depths if s.task == "passkey" else (None,))]
    for ci, (L, depth) in enumerate(cells):
        seed = EVAL_SEED_BASE + 7919 * s.seed + 31 * ci
        b = task_batch(s, s.eval_samples, seed=seed, seq_len=L, depth=depth)
        acc, tok = score(net, b)
        rec = dict(eval_len=L, depth=depth, accuracy=acc, token_accuracy=tok, num_eval_samples=len(b),
                   eval_seed=seed)
        if s.task == "passkey":
            rec["mean_actual_depth"] = float(np.mean(b.info["depths"]))
        out.append(rec)
    return out


def is_current(cached, model, s):
    """Whether a cached run is run `model` of setting `s` at today's code defaults: a change of a model's
    defaults must neither reuse nor report a stale run (runs cached before learning_rate left the model config
    have it there: not a change)."""
    try:  # a saved config that today's checks reject is another config too
        saved = models.function_dict(models.config_from_dict(model_spec(model)[0], cached["model_config"]))
    except (ValueError, TypeError):
        return False
    return (cached.get("settings") == s.to_dict() and cached.get("model") == model
            and saved == models.function_dict(model_config(model, s)))


def run_one(model, s, out, preset, force=False, keep_ckpt=False, log=print):
    """Train + evaluate one (model, setting), or read it from the cache. Returns (records, cached)."""
    run_id = f"{model}__{s.name}__lr{s.learning_rate:g}" + (f"__seed{s.seed}" if s.seed else "")
    run_path = out / "runs" / f"{run_id}.json"
    if run_path.exists() and not force:
        try:
            cached = json.loads(run_path.read_text())
            if is_current(cached, model, s):
                return cached["records"], True
            log(f"  {run_path.name}: settings or model config changed, rerunning")
        except (json.JSONDecodeError, KeyError, ValueError, TypeError):
            log(f"  {run_path.name}: unreadable, rerunning")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    run_dir = out / "ckpt" / run_id
    if force:
        shutil.rmtree(run_dir, ignore_errors=True)  # no resume: train.py starts it over
    net, stats = train_run(model, s, run_dir, log)
    t0 = time.time()
    stats.update(validate(net, s))
    evals = evaluate(net, s)
    eval_time = time.time() - t0
    name, variant = model_spec(model)
    base = dict(model=model, registry_model=name, variant=variant, task=s.task, setting=s.name,
                learning_rate=s.learning_rate, seed=s.seed, train_len=s.train_len,
                num_kv_pairs=s.num_kv_pairs if s.task == "mqar" else None,
                n_params=net.num_params(), n_params_total=net.num_params(False), n_embd=s.n_embd,
                n_layer=s.n_layer, n_head=s.n_head, mlp_hidden=net.config.hidden, preset=preset, **stats,
                eval_time_s=eval_time)
    records = [{**base, **e} for e in evals]
    save_json({"model": model, "settings": s.to_dict(), "model_config": net.config.to_dict(), "records": records},
                 run_path)
    if not keep_ckpt:
        shutil.rmtree(run_dir)
    return records, False


# ----------------------------------------------------------------------------------------------
# Learning-rate selection, plots and tables

def _loss_key(loss):
    return math.inf if loss is None or not math.isfinite(loss) else loss


def candidate_lrs(records):
    """{(model, setting): [lr, ...]}: the lrs tied for the best seed-0 validation accuracy. The extra seeds are
    trained at each of them, so that a tie is broken by how reliably an lr solves the task, not by one seed.
    Where no lr scores above 0 there is nothing to compare: the one with the lowest final training loss."""
    groups = {}
    for r in records:
        if r["seed"] == 0:
            groups.setdefault((r["model"], r["setting"]), {})[r["learning_rate"]] = r
    out = {}
    for key, runs in groups.items():
        best = max(r["val_accuracy"] for r in runs.values())
        if best > 0:
            out[key] = sorted(lr for lr, r in runs.items() if r["val_accuracy"] == best)
        else:
            out[key] = [min(runs, key=lambda lr: (_loss_key(runs[lr]["final_train_loss"]), lr))]
    return out


def selected_lrs(records):
    """{(model, setting): lr}: among candidate_lrs, the best mean validation accuracy over the seeds trained at
    it; ties: the lower mean final training loss, then the lower lr."""
    runs = {}  # (model, setting, lr) -> {seed: record}; one record per run
    for r in records:
        runs.setdefault((r["model"], r["setting"], r["learning_rate"]), {})[r["seed"]] = r

    def rank(key, lr):
        rs = list(runs[(*key, lr)].values())
        return (-np.mean([r["val_accuracy"] for r in rs]), np.mean([_loss_key(r["final_train_loss"]) for r in rs]), lr)
    return {key: min(lrs, key=lambda lr: rank(key, lr)) for key, lrs in candidate_lrs(records).items()}


def mark_selected(records):
    """selected=True on the records (every seed) of each (model, setting)'s selected lr, False elsewhere. In place."""
    best = selected_lrs(records)
    for r in records:
        r["selected"] = best.get((r["model"], r["setting"])) == r["learning_rate"]


def plot(records, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    settings = sorted({r["setting"] for r in records})
    model_order = [m for m in ALL_MODELS if any(r["model"] == m for r in records)]
    for st in settings:
        rs = [r for r in records if r["setting"] == st]
        r0 = rs[0]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, key, label in ((axes[0], "accuracy", "exact-match accuracy"),
                               (axes[1], "token_accuracy", "token accuracy (per query / digit)")):
            for m in model_order:
                mr = [r for r in rs if r["model"] == m]
                if not mr:
                    continue
                lens = sorted({r["eval_len"] for r in mr})
                acc = [np.mean([r[key] for r in mr if r["eval_len"] == L]) for L in lens]
                ax.plot(lens, acc, marker="o", label=f"{m} ({mr[0]['n_params'] / 1e3:.0f}k)")
            ax.axvline(r0["train_len"], color="gray", ls="--", lw=0.8)
            if key == "token_accuracy":
                chance = 1 / r0["num_kv_pairs"] if r0["task"] == "mqar" else 0.1
                ax.axhline(chance, color="black", ls=":", lw=0.8)
                ax.text(0.98, chance, "guess: " + ("a value of the context" if r0["task"] == "mqar"
                                                    else "a random digit"), fontsize=7, va="bottom", ha="right",
                        transform=ax.get_yaxis_transform())
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.03, 1.03)
            ax.set_xlabel("context length (dashed: training length)")
            ax.set_ylabel(label + (", mean over depths" if r0["task"] == "passkey" else ""))
            ax.legend(fontsize=7)
        title = (f"MQAR, {r0['num_kv_pairs']} kv pairs, width {r0['n_embd']}" if r0["task"] == "mqar"
                 else f"passkey retrieval, width {r0['n_embd']}")
        n_seeds = len({r["seed"] for r in rs})
        fig.suptitle(f"{title} (selected lr per model; mean over {n_seeds} seed{'s' * (n_seeds > 1)})", fontsize=10)
        fig.tight_layout()
        p = out / f"{st}_accuracy_vs_length.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
        if r0["task"] != "passkey":
            continue
        for m in model_order:
            mr = [r for r in rs if r["model"] == m]
            if not mr:
                continue
            lens = sorted({r["eval_len"] for r in mr})
            depths = sorted({r["depth"] for r in mr})
            grid = np.full((len(depths), len(lens)), np.nan)
            tok = np.full_like(grid, np.nan)
            for r in mr:
                grid[depths.index(r["depth"]), lens.index(r["eval_len"])] = r["accuracy"]
                tok[depths.index(r["depth"]), lens.index(r["eval_len"])] = r["token_accuracy"]
            fig, ax = plt.subplots(figsize=(5, 3.6))
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper")
            ax.set_xticks(range(len(lens)), [str(L) for L in lens])
            ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
            for i in range(len(depths)):
                for j in range(len(lens)):
                    ax.text(j, i, f"{grid[i, j]:.2f}\n({tok[i, j]:.2f})", ha="center", va="center", fontsize=7,
                            color="white" if grid[i, j] < 0.5 else "black")
            ax.set_xlabel(f"context length (trained at {mr[0]['train_len']})")
            ax.set_ylabel("needle depth")
            ax.set_title(f"passkey: {m} (cells: exact match (digit accuracy))", fontsize=9)
            fig.colorbar(im, ax=ax, label="exact match")
            fig.tight_layout()
            p = out / f"{st}_heatmap_{m}.png"
            fig.savefig(p, dpi=120)
            plt.close(fig)
            written.append(p)
    return written


def summary_tables(records):
    """Markdown: per setting, the selected lr's accuracies, then every lr's validation accuracy."""
    lines = []
    model_order = [m for m in ALL_MODELS if any(r["model"] == m for r in records)]
    for st in sorted({r["setting"] for r in records}):
        rs = [r for r in records if r["setting"] == st and r["selected"]]
        lens = sorted({r["eval_len"] for r in rs})
        r0 = rs[0]
        desc = (f"MQAR, {r0['num_kv_pairs']} kv pairs, width {r0['n_embd']}, trained at {r0['train_len']}"
                if r0["task"] == "mqar" else f"passkey, trained at {r0['train_len']} (mean over depths)")
        lines += [f"### {st}: {desc}", "",
                  "| model | non-emb params | lr | seeds | train s | final loss | val | "
                  + " | ".join(f"L={L}" for L in lens) + " |",
                  "|---|---|---|---|---|---|---|" + "---|" * len(lens)]
        for m in model_order:
            mr = [r for r in rs if r["model"] == m]
            if not mr:
                continue
            seeds = sorted({r["seed"] for r in mr})
            cells = []
            for L in lens:
                acc = [np.mean([r["accuracy"] for r in mr if r["eval_len"] == L and r["seed"] == sd]) for sd in seeds]
                tok = np.mean([r["token_accuracy"] for r in mr if r["eval_len"] == L])
                spread = f" [{min(acc):.2f}-{max(acc):.2f}]" if len(seeds) > 1 else ""
                cells.append(f"{np.mean(acc):.3f} ({tok:.2f}){spread}")
            first = {sd: next(r for r in mr if r["seed"] == sd) for sd in seeds}  # one record per run
            losses = [r["final_train_loss"] for r in first.values()]
            loss = "nan" if None in losses else f"{np.mean(losses):.3f}"
            lines.append(f"| {m} | {mr[0]['n_params']:,} | {mr[0]['learning_rate']:g} | {len(seeds)} | "
                         f"{np.mean([r['train_time_s'] for r in first.values()]):.0f} | {loss} | "
                         f"{np.mean([r['val_accuracy'] for r in first.values()]):.3f} | " + " | ".join(cells) + " |")
        lines += ["", "lr: among the lrs tied for seed 0's best validation exact match (val: at the training length "
                  "on a held-out set), the best mean over the seeds trained at it (see the module doc). cells: "
                  "exact-match accuracy (token accuracy), mean over seeds [min-max over seeds]; train s, final loss, "
                  "val: means over seeds", ""]
        sweep = {}
        for r in records:
            if r["setting"] == st and r["seed"] == 0:
                sweep.setdefault(r["model"], {})[r["learning_rate"]] = (r["val_accuracy"], r["final_train_loss"])
        lrs = sorted({lr for v in sweep.values() for lr in v})
        if len(lrs) > 1:
            lines += [f"lr sweep ({st}, seed 0): validation exact match (final training loss)", "",
                      "| model | " + " | ".join(f"lr={lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
            for m in model_order:
                if m in sweep:
                    lines.append(f"| {m} | " + " | ".join(
                        "" if lr not in sweep[m] else
                        f"{sweep[m][lr][0]:.3f} ({'nan' if sweep[m][lr][1] is None else f'{sweep[m][lr][1]:.3f}'})"
                        for lr in lrs) + " |")
            lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI

def calibrate(model_names, settings, steps=4, log=print):
    """Training tokens/s of every model and setting: steps + 1 steps of train.train (the first, which warms
    up, untimed), in a temporary directory."""
    for s in settings:
        for m in model_names:
            with tempfile.TemporaryDirectory() as tmp:
                run = dataclasses.replace(s, steps=steps + 1, ckpt_interval=steps + 1)
                train.train(train_config(m, run, tmp, log_interval=1), batches=TaskBatches(run))
                log_lines = (pathlib.Path(tmp) / "log.jsonl").read_text().splitlines()
                ms = [r["ms_per_iter"] for r in map(json.loads, log_lines) if "loss" in r]
            dt = sum(ms[1:]) / steps / 1000
            log(f"{s.name:10s} {m:14s} n_params {build(m, s).num_params():>8,} | "
                f"{s.batch_size * s.train_len / dt:8,.0f} tok/s | {dt:.3f} s/step -> {s.steps} steps ~ "
                f"{dt * s.steps:.0f} s", flush=True)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--models", default="", help=f"comma-separated, from {', '.join(ALL_MODELS)} (default: each "
                    "setting's own list)")
    ap.add_argument("--tasks", default=",".join(ALL_TASKS), help="comma-separated: mqar, passkey")
    ap.add_argument("--settings", default="", help="comma-separated setting names of the preset (default: every "
                    "setting of --tasks)")
    ap.add_argument("--out", default=str(REPO / "results" / "recall"))
    ap.add_argument("--extra_seeds", default="", help="more seeds, e.g. 1,2: each model and setting is trained again "
                    "at every lr tied for seed 0's best validation accuracy")
    ap.add_argument("--lrs", default="", help="only these peak lrs, e.g. 5e-3,1e-2, to split work over processes: "
                    "of the seed-0 sweep, and with --extra_seeds (once the sweep is complete) of the tied lrs; tables "
                    "and selection use every cached run")
    ap.add_argument("--force", action="store_true", help="rerun even if cached")
    ap.add_argument("--tables_only", action="store_true",
                    help="train nothing: results.json, summary.md and plots from the cached runs")
    ap.add_argument("--keep_ckpt", action="store_true", help="keep each run's final checkpoint in OUT/ckpt")
    ap.add_argument("--calibrate", action="store_true", help="measure training tokens/s only (writes nothing)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return ap.parse_args(argv)


def collect(out):
    """Every finished run's records in OUT (also runs of earlier invocations with other --models / --tasks),
    except runs made at another model config than today's defaults give (stale: they are named, to rerun)."""
    records = []
    for p in sorted((out / "runs").glob("*.json")):
        try:
            cached = json.loads(p.read_text())
            settings = {k: tuple(v) if isinstance(v, list) else v for k, v in cached["settings"].items()}
            current = is_current(cached, cached["model"], Setting(**settings))
        except (json.JSONDecodeError, KeyError, ValueError, TypeError):
            print(f"warning: skipping unreadable {p}", file=sys.stderr)
            continue
        if current:
            records += cached["records"]
        else:
            print(f"warning: skipping {p.name}: made at another config of {cached['model']} than its defaults "
                  f"give today; rerun it (or delete it)", file=sys.stderr)
    return records


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(args.threads)
    model_names = [m.strip() for m in (args.models or "").split(",") if m.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for m in model_names:
        model_spec(m)
    bad = sorted(set(tasks) - set(ALL_TASKS))
    if bad:
        raise ConfigError(f"unknown task(s) {bad}; valid: {', '.join(ALL_TASKS)}")
    settings = [s for s in PRESETS[args.preset] if s.task in tasks]
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = sorted(set(names) - {s.name for s in settings})
    if unknown:
        raise ConfigError(f"--settings: no setting {', '.join(unknown)} in preset {args.preset} and tasks "
                          f"{', '.join(tasks)}; valid: {', '.join(s.name for s in settings)}")
    settings = [s for s in settings if not names or s.name in names]
    try:
        extra_seeds = sorted({int(x) for x in args.extra_seeds.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--extra_seeds={args.extra_seeds!r}: give comma-separated integers, e.g. 1,2") from None
    if 0 in extra_seeds or any(x < 0 for x in extra_seeds):
        raise ConfigError("--extra_seeds: seed 0 is the lr sweep itself; give seeds >= 1")
    try:
        only_lrs = {float(x) for x in args.lrs.split(",") if x.strip()}
    except ValueError:
        raise ConfigError(f"--lrs={args.lrs!r}: give comma-separated learning rates, e.g. 5e-3,1e-2") from None
    for s in settings:
        if only_lrs - set(s.lr_grid):
            raise ConfigError(f"--lrs: {', '.join(f'{x:g}' for x in sorted(only_lrs - set(s.lr_grid)))} not in the "
                              f"lr grid of {s.name} ({', '.join(f'{x:g}' for x in s.lr_grid)})")
    if args.calibrate:
        calibrate(model_names or ALL_MODELS, settings)
        return {"calibrated": True}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    counts = [0, 0]  # runs trained, runs read from the cache

    def run(m, sr):
        t0 = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {m} / {sr.name} / lr {sr.learning_rate:g} / seed {sr.seed}", flush=True)
        _, cached = run_one(m, sr, out, args.preset, force=args.force, keep_ckpt=args.keep_ckpt)
        counts[cached] += 1
        print(f"  {'cached' if cached else f'done in {time.time() - t0:.0f}s'}", flush=True)

    def models_of(s):  # --models, or the setting's own list
        return model_names or list(s.models or ALL_MODELS)

    if only_lrs and extra_seeds:  # the tie at seed 0 must be known before the extra seeds are split by lr
        done = {(r["model"], r["setting"], r["learning_rate"]) for r in collect(out) if r["seed"] == 0}
        for s in settings:
            for m in models_of(s):
                missing = [lr for lr in s.lr_grid if (m, s.name, lr) not in done]
                if missing:
                    raise ConfigError(f"--lrs with --extra_seeds: {m}'s seed-0 sweep on {s.name} lacks lr "
                                      f"{', '.join(f'{x:g}' for x in missing)}; finish it first (--lrs without "
                                      f"--extra_seeds)")

    for s in settings if not args.tables_only else ():
        for m in models_of(s):
            for sr in s.runs():
                if not only_lrs or sr.learning_rate in only_lrs:
                    run(m, sr)
    if extra_seeds and not args.tables_only:  # at every lr tied for seed 0's best validation accuracy
        candidates = candidate_lrs(collect(out))
        for seed in extra_seeds:
            for s in settings:
                for m in models_of(s):
                    for lr in candidates[(m, s.name)]:
                        if not only_lrs or lr in only_lrs:
                            run(m, dataclasses.replace(s, learning_rate=lr, seed=seed))
    n_run, n_cached = counts
    records = collect(out)
    mark_selected(records)
    save_json({"preset": args.preset, "records": records}, out / "results.json")
    plots = plot([r for r in records if r["selected"]], out)
    table = summary_tables(records)
    (out / "summary.md").write_text(table + "\n")
    print(table)
    print(f"{n_run} run(s), {n_cached} cached, {time.time() - t_start:.0f}s; wrote {out / 'results.json'} and "
          f"{len(plots)} plot(s)")
    return {"runs": n_run, "cached": n_cached, "records": records, "plots": [str(p) for p in plots]}


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:
        print(f"recall.py: error: {e}", file=sys.stderr)
        sys.exit(2)
