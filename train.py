"""Train a Miras language model (Moneta, Yaad, Memora) or the Transformer++ baseline.

    python train.py                                   # the main job: a tiny Moneta on Shakespeare, CPU, minutes
    python train.py config/train_yaad_tiny.py         # a config file (a Python dict `config` or JSON) ...
    python train.py config/train_moneta_tiny.py --max_iters=100 --model_args="objective=l2,chunk_size=32"
    torchrun --standalone --nproc_per_node=8 train.py config/train_moneta_340m.py     # one GPU node
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 --nproc_per_node=8 train.py ...

Configuration: the TrainConfig defaults below, then the config files named on the command line (left to
right), then `--key=value` overrides. Every key is type-checked against TrainConfig; an unknown key or a
value of the wrong type is a one-line error listing the valid keys. The defaults are the main job, which
config/train_moneta_tiny.py spells out; model-size keys set to None take the model preset's values
(models.py), e.g. `--block_size=None --learning_rate=None`. Other sizes: name a config file (config/).

Data: `--dataset` is a directory holding train.bin / val.bin (uint16) and meta.json (data/common.py), or the
name of one under data/. The default corpus (shakespeare_char, shakespeare) is prepared when missing.
Batches are random windows; the windows of optimizer step `it` are drawn from a generator seeded with
(seed, it) alone, and rank r of a DDP run takes its share of them, so that the global batch does not depend
on the number of processes and the sampler needs no state beyond the step. The global batch of a step is
batch_size x gradient_accumulation_steps sequences. With gradient_accumulation_steps=None (the default; any
number of processes up to batch_size) it is one micro-batch of batch_size sequences, split over the
processes as evenly as possible (e.g. 6+5+5 on 3), each rank's loss weighted by its share so that the
averaged gradient is the single-process one; an explicit gradient_accumulation_steps counts micro-batches
over all processes and must be divisible by their number. The log's "global batch:" line says what a step
holds and how it is split.

Outputs in out_dir: ckpt.pt (latest), ckpt_best.pt (best val loss), log.jsonl (one JSON object per log line
and per evaluation), config.json (the resolved train and model configs). Checkpoints are written atomically
and hold everything a resume needs to continue the same loss curve (model, optimizer, configs, iteration,
best val loss, RNG states of every rank, sampler state).

Library use (scaling.py, recall.py): `train(TrainConfig(...)) -> dict` runs in-process and returns the
final losses; `parse_args([...])` builds a TrainConfig from command-line style arguments; `train(cfg,
batches=...)` trains on batches of the caller's (WindowBatches says what they provide; recall.py's tasks).
"""
import collections
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import random
import sys
import time
import typing
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

import cli
import models
from cli import ConfigError
from data.common import fsync_dir

REPO = pathlib.Path(__file__).resolve().parent
# prepared on demand (data/<name>/prepare.py)
DEFAULT_CORPORA = ("shakespeare_char", "shakespeare", "shakespeare_compact", "torch_code")
MAIN_JOB = REPO / "config" / "train_moneta_tiny.py"    # spells out the TrainConfig defaults: the main job


# ----------------------------------------------------------------------------------------------
# Configuration

@dataclass
class TrainConfig:
    # model
    model: str = "moneta"                       # moneta | yaad | memora | transformer
    preset: str = "tiny"                        # models.py presets, "+"-joined: "tiny", "340m", "340m+hybrid"
    n_layer: Optional[int] = None               # None: the preset's value
    n_embd: Optional[int] = None
    n_head: Optional[int] = None
    block_size: Optional[int] = 128             # training context; None: the preset's block_size
    model_args: str = ""                        # more model config overrides: "objective=l2,chunk_size=32" or JSON
    # data and I/O
    dataset: str = "shakespeare_char"           # a name under data/ or a directory (train.bin, val.bin, meta.json)
    out_dir: str = "out"
    init_from: str = "scratch"                  # scratch | resume (from out_dir/ckpt.pt)
    always_save_checkpoint: bool = True         # write ckpt.pt at every evaluation (else only at the end)
    # run
    max_iters: int = 500                        # optimizer steps
    batch_size: int = 16                        # sequences per micro-batch
    gradient_accumulation_steps: Optional[int] = None  # micro-batches per step, in total over all processes
                                                # (divisible by their number); None: one micro-batch, its
                                                # batch_size sequences split over the processes
    eval_interval: int = 100
    eval_iters: int = 10                        # batches per split and evaluation
    log_interval: int = 20
    seed: int = 1337
    # optimizer: AdamW, linear warmup then cosine decay to min_lr
    learning_rate: Optional[float] = 3e-3       # peak; None: the preset's (models.preset_learning_rate: paper
                                                # Table 5; tiny: 1e-3)
    min_lr: Optional[float] = None              # None: learning_rate / 10
    warmup_iters: int = 50
    lr_decay_iters: Optional[int] = None        # None: max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0                      # 0: no clipping (the norm is still logged and checked)
    # system
    device: str = "auto"                        # auto (cuda if available, else cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"                         # auto (bfloat16 on CUDA if supported, else float32) | float32 | bfloat16 | float16
    compile: Optional[bool] = None              # torch.compile block by block; None: CUDA, or a CPU that can (cli)
    compile_mode: str = "default"               # torch.compile mode (cli.COMPILE_MODES); reduce-overhead: the
                                                # steps replayed as CUDA graphs (CUDA only)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became non-finite; training stopped before taking that step."""


def parse_args(argv=None):
    """A TrainConfig from `[config files...] [--key=value ...]` (later ones win) over the defaults (cli.parse)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, _ = cli.parse(TrainConfig, argv, "train.py", files=True, noun="config key")
    validate(cfg)
    return cfg


def validate(cfg):
    checks = [
        (cfg.model in models.MODELS, f"model must be one of {', '.join(models.MODELS)}, got {cfg.model!r}"),
        (cfg.init_from in ("scratch", "resume"), f"init_from must be scratch or resume, got {cfg.init_from!r}"),
        (cfg.dtype in ("auto", "float32", "bfloat16", "float16"),
         f"dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}"),
        (cfg.max_iters >= 0 and cfg.seed >= 0, "max_iters and seed must be >= 0"),
        (cfg.batch_size >= 1, "batch_size must be >= 1"),
        (cfg.gradient_accumulation_steps is None or cfg.gradient_accumulation_steps >= 1,
         "gradient_accumulation_steps must be >= 1 (or None: one micro-batch split over the processes)"),
        (cfg.eval_interval >= 1 and cfg.eval_iters >= 1 and cfg.log_interval >= 1,
         "eval_interval, eval_iters and log_interval must be >= 1"),
        (cfg.block_size is None or cfg.block_size >= 1, "block_size must be >= 1"),
        (cfg.warmup_iters >= 0 and cfg.grad_clip >= 0 and cfg.weight_decay >= 0,
         "warmup_iters, grad_clip and weight_decay must be >= 0"),
        (cfg.learning_rate is None or cfg.learning_rate > 0, "learning_rate must be > 0"),
        cli.known_compile_mode(cfg.compile_mode),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def model_overrides(cfg, vocab_size):
    """Model config overrides from the train config: model_args, then the explicit size keys, then the
    dataset's vocabulary (rounded up to a multiple of 64 when it is large, as nanoGPT pads GPT-2's)."""
    over = cli.parse_model_args(cfg.model_args, models.MODELS[cfg.model][0], cfg.model)
    for key in ("n_layer", "n_embd", "n_head", "block_size"):
        if getattr(cfg, key) is not None:
            over[key] = getattr(cfg, key)
    padded = vocab_size if vocab_size <= 256 else 64 * math.ceil(vocab_size / 64)
    if over.get("vocab_size", padded) < vocab_size:
        raise ConfigError(f"model_args vocab_size={over['vocab_size']} is smaller than the dataset's {vocab_size}")
    over.setdefault("vocab_size", padded)
    return over


# ----------------------------------------------------------------------------------------------
# Data

def resolve_dataset(name, rank=0, world=1):
    """Directory of a prepared dataset; prepares the default corpus if it is missing (rank 0 only)."""
    from data.common import dataset_ready

    named = "/" not in name and os.sep not in name
    path = REPO / "data" / name if named else pathlib.Path(name)
    if dataset_ready(path):
        return path
    if named and name in DEFAULT_CORPORA:
        if rank == 0:
            import importlib
            print(f"dataset {name} is not prepared yet: preparing it (data/{name}/prepare.py) ...", flush=True)
            importlib.import_module(f"data.{name}.prepare").prepare()
        if world > 1:
            torch.distributed.barrier()
        if dataset_ready(path):
            return path
    script = REPO / "data" / name / "prepare.py"
    how = (f"run `python {script.relative_to(REPO)}`" if named and script.is_file() else
           "prepare it with `python data/prepare_text.py --input=FILES --out=DIR` (or --hf_dataset=...)")
    raise ConfigError(f"dataset {name!r} not found: {path} has no complete train.bin / val.bin / meta.json; {how}")


def step_offsets(seed, stream, index, n_micro, batch_size, n_tokens, block_size):
    """Start offsets [n_micro, batch_size] of the windows of one step (stream 0: training, index = step) or
    one evaluation batch (stream 1: val, 2: train; index = batch). A pure function of its arguments."""
    rng = np.random.default_rng([seed, stream, index])
    return rng.integers(0, n_tokens - block_size, size=(n_micro, batch_size))


def batch_split(batch_size, accumulation, world):
    """How the windows of one optimizer step are shared out over `world` processes: (n_micro, shares, how).

    step_offsets draws n_micro x batch_size windows per step (n_micro = accumulation; 1 for None), whatever
    `world` is. shares[r] lists rank r's micro-batches as (micro-batch, first, end, divisor): windows
    [first:end] of that micro-batch, whose mean loss is divided by `divisor` before backward, so that DDP's
    mean over the ranks of their summed gradients is the gradient of the mean loss of the whole step.
    accumulation=None splits the one micro-batch as evenly as possible (the first batch_size % world ranks
    take one window more); an explicit accumulation gives each rank accumulation / world whole micro-batches.
    `how` says it in words for the log. ConfigError if the step cannot be split that way."""
    if accumulation is not None:
        if accumulation % world:
            raise ConfigError(f"gradient_accumulation_steps={accumulation} must be divisible by the number of "
                              f"processes ({world}); or pass --gradient_accumulation_steps=None to split one "
                              f"micro-batch of batch_size sequences over the processes")
        per = accumulation // world
        shares = [[(m, 0, batch_size, per) for m in range(r * per, (r + 1) * per)] for r in range(world)]
        how = (f"batch_size {batch_size} x {accumulation} accumulation step{'s' if accumulation > 1 else ''}, "
               + ("1 process" if world == 1 else f"{per} per process on {world} processes"))
        return accumulation, shares, how
    if batch_size < world:
        raise ConfigError(f"batch_size={batch_size} sequences cannot be split over {world} processes "
                          f"(gradient_accumulation_steps=None): set batch_size >= {world}, or a "
                          f"gradient_accumulation_steps divisible by {world}")
    q, extra = divmod(batch_size, world)
    sizes = [q + (r < extra) for r in range(world)]
    first = [sum(sizes[:r]) for r in range(world)]
    shares = [[(0, first[r], first[r] + sizes[r], batch_size / (sizes[r] * world))] for r in range(world)]
    if world == 1:
        split = "1 process"
    elif world <= 8 or extra == 0:
        split = f"split over {world} processes as " + ("+".join(map(str, sizes)) if world <= 8 else f"{q} each")
    else:
        split = f"split over {world} processes as {q + 1} on {extra} and {q} on {world - extra}"
    return 1, shares, f"batch_size {batch_size} x 1 accumulation step (gradient_accumulation_steps=None), {split}"


class TokenFile:
    """One split of a dataset (a uint16 memmap); batch(offsets) -> (x, y) int64 tensors on `device`."""

    def __init__(self, data_dir, split, block_size, device):
        from data.common import load_split

        self.data = load_split(data_dir, split)
        if len(self.data) <= block_size + 1:
            raise ConfigError(f"{data_dir}/{split}.bin holds {len(self.data)} tokens, fewer than block_size + 2 = "
                              f"{block_size + 2}")
        self.block_size, self.device = block_size, torch.device(device)
        self.window = np.arange(block_size + 1)

    def __len__(self):
        return len(self.data)

    def batch(self, offsets):
        w = torch.from_numpy(self.data[offsets[:, None] + self.window].astype(np.int64))
        if self.device.type == "cuda":
            w = w.pin_memory().to(self.device, non_blocking=True)
        else:
            w = w.to(self.device)
        return w[:, :-1], w[:, 1:]


class WindowBatches:
    """Where a run's batches come from: by default random windows of a prepared dataset's train.bin / val.bin
    (step_offsets, read as TokenFile batches). A library caller may pass train(cfg, batches=...) any object
    with the same members instead (recall.py: synthetic tasks generated per step):
        vocab_size                         the model's vocabulary comes from it (model_overrides)
        info                               the checkpoint's "dataset": {"dir": ..., "meta": {...}}
        describe()                         the log's data line
        train_batch(step, micro, first, end) -> (x, y)
                                           windows [first:end] of micro-batch `micro` of optimizer step `step`
                                           (a pure function of its arguments: resume and DDP rely on it)
        eval_batch(split, k) -> (x, y)     evaluation batch k of split "val" or "train", the same every time
    x, y: [rows, T] int64 (targets -1 are ignored); train moves them to its device."""

    def __init__(self, data_dir, meta, block_size, device, seed, batch_size, n_micro):
        self.train = TokenFile(data_dir, "train", block_size, device)
        self.val = TokenFile(data_dir, "val", block_size, device)
        self.vocab_size = int(meta["vocab_size"])
        self.info = {"dir": str(data_dir), "meta": meta}
        self.block_size, self.seed, self.batch_size, self.n_micro = block_size, seed, batch_size, n_micro

    def describe(self):
        return (f"data {self.info['dir']} ({self.info['meta'].get('tokenizer')}, {len(self.train):,} train / "
                f"{len(self.val):,} val tokens)")

    def train_batch(self, step, micro, first, end):
        offsets = step_offsets(self.seed, 0, step, self.n_micro, self.batch_size, len(self.train), self.block_size)
        return self.train.batch(offsets[micro, first:end])

    def eval_batch(self, split, k):
        stream, data = (1, self.val) if split == "val" else (2, self.train)
        return data.batch(step_offsets(self.seed, stream, k, 1, self.batch_size, len(data), self.block_size)[0])


# ----------------------------------------------------------------------------------------------
# Schedule, devices, checkpoints

def get_lr(it, learning_rate, min_lr, warmup_iters, lr_decay_iters):
    """Learning rate of step `it` (0-based): linear warmup, cosine decay to min_lr, then min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


# Dense peak FLOP/s per GPU for bf16/fp16 tensor-core math (vendor data sheets). MFU is reported only for
# these; for any other device it is left out rather than guessed.
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
              ("A100", 312e12), ("A800", 312e12))


def peak_flops(device, ptdtype):
    if device.type != "cuda" or ptdtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


def _atomic_write(path, write):
    """write(f) to a temporary file in the same directory, fsync, os.replace: a crash at any point leaves the
    previous file at `path` intact."""
    path = pathlib.Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def save_checkpoint(obj, path):
    """torch.save, atomically (see _atomic_write)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def save_json(obj, path):
    """JSON (indent 1, trailing newline), atomically: what the studies' caches and results files use."""
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def copy_checkpoint(src, dst):
    """dst becomes a copy of the (complete) file src, atomically: a hard link when possible."""
    dst = pathlib.Path(dst)
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            import shutil
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(dst.parent)


def load_checkpoint(path, model=None, map_location="cpu"):
    """A checkpoint dict written by train.py; with `model`, it must hold that model."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path} (train with --init_from=scratch first)")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if model is not None and ckpt.get("model_name") != model:
        raise ConfigError(f"checkpoint {path} holds a {ckpt.get('model_name')!r} model, not {model!r}: "
                          f"pass --model={ckpt.get('model_name')} or use another out_dir")
    return ckpt


def load_resume_checkpoint(path, best_path, model, map_location):
    """load_checkpoint for --init_from=resume: a file torch.load cannot read (truncated, damaged, not a
    checkpoint) is a one-line ConfigError naming it and what to do; it names best_path (and its iteration)
    when that one loads. Neither file is changed."""
    try:
        ckpt = load_checkpoint(path, model, map_location=map_location)
        if not isinstance(ckpt, dict) or not {"model", "optimizer", "model_config", "iter_num"} <= set(ckpt):
            raise ValueError("not a complete train.py checkpoint")
        return ckpt
    except (ConfigError, MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - torch.load raises many kinds on a damaged file
        first = (str(e).splitlines() or [""])[0].split(". ")[0]  # torch's messages run on for sentences
        why = f"{type(e).__name__}: {first[:160]}"
    try:
        best = torch.load(best_path, map_location="cpu", weights_only=True)
        best_iter = int(best["iter_num"])
        if best.get("model_name") != model or "optimizer" not in best:
            raise ValueError(best_path)
        del best
        what = (f"{best_path.name} (iteration {best_iter}) loads: copy it over {path.name} (cp {best_path} {path}) "
                f"and resume from there, or start over with --init_from=scratch (which overwrites {path.name})")
    except Exception:  # noqa: BLE001 - no usable best checkpoint either
        what = (f"{best_path.name} is missing or unreadable too: start over with --init_from=scratch (which "
                f"overwrites {path.name}; use another --out_dir to keep it)")
    raise ConfigError(f"resume: checkpoint {path} is damaged or unreadable ({why}) and was left untouched; {what}")


def rng_state(device):
    """This process's RNG states in plain types (the checkpoint loads with weights_only=True)."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"] = {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"])}
    state = {"torch": torch.get_rng_state(), "numpy": np_state, "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"].cpu())  # .cpu(): the checkpoint may have been loaded onto the GPU
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np.array(np_state["state"]["key"], dtype=np.uint32), "pos": np_state["state"]["pos"]}
    np.random.set_state(np_state)
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


# ----------------------------------------------------------------------------------------------
# Training

def _fmt_time(s):
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def train(cfg: TrainConfig, batches=None) -> dict:
    """Train as configured (in-process; under torchrun, one call per rank). Returns a summary on every rank:
    iter, train_loss (last step), recent_train_loss (mean of the last 20 steps of this call), val_loss /
    train_eval_loss (last evaluation), best_val_loss, ckpt, and more. Raises ConfigError for a bad
    configuration and TrainingDiverged for a non-finite loss/gradient. `batches`: the data instead of
    cfg.dataset's windows (see WindowBatches; cfg.dataset then only labels the run)."""
    validate(cfg)
    t_start = time.time()
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = cli.resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if ddp else (device.index or 0))
        torch.cuda.set_device(device)
    if ddp and not torch.distributed.is_initialized():
        if device.type == "cuda":  # bound to this rank's GPU: NCCL then knows the device of every collective
            torch.distributed.init_process_group(backend="nccl", device_id=device)
        else:
            torch.distributed.init_process_group(backend="gloo")
    try:
        result = _train(cfg, device, ddp, rank, world, t_start, batches)
        if ddp:  # a rank that tears gloo down while a peer still runs can abort it (seen once in CI: SIGABRT)
            torch.distributed.barrier()
        return result
    finally:
        if ddp and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@dataclass
class Run:
    """What one training process holds (built by setup): read by step, evaluate and save, which advance it."""
    cfg: TrainConfig
    resolved: TrainConfig       # cfg with its None keys resolved (lr schedule, model size): what is saved
    device: torch.device
    ddp: bool
    rank: int
    world: int
    log: typing.Callable        # print on rank 0, nothing elsewhere
    dtype: str
    autocast: typing.Any        # the context of every forward (cli.autocast_for)
    n_micro: int                # micro-batches per optimizer step, over all processes
    share: list                 # this rank's micro-steps of a step: (micro-batch, first, end, loss divisor)
    split_how: str
    batches: WindowBatches      # or a library caller's object with its members
    out_dir: pathlib.Path
    mcfg: models.LMConfig
    raw_model: torch.nn.Module  # the model itself, compiled in place or not (state dicts, FLOPs, evaluation)
    optimizer: torch.optim.Optimizer
    model: torch.nn.Module = None      # raw_model, DDP-wrapped under torchrun: training steps run it
    scaler: typing.Any = None          # a GradScaler for float16
    compile: bool = False              # cfg.compile resolved for the device
    compile_why: str = ""              # how it was resolved, for the log ("auto", or why not compiled)
    iter_num: int = 0                  # optimizer steps taken
    best_val: float = float("inf")
    saved_iter: Optional[int] = None   # the iteration of ckpt.pt

    @property
    def master(self):
        return self.rank == 0

    @property
    def ckpt_path(self):
        return self.out_dir / "ckpt.pt"

    @property
    def best_path(self):
        return self.out_dir / "ckpt_best.pt"

    @property
    def log_path(self):
        return self.out_dir / "log.jsonl"

    @property
    def tokens_per_iter(self):
        return self.n_micro * self.cfg.batch_size * self.mcfg.block_size

    @property
    def flops_per_iter(self):
        return self.raw_model.flops_per_token(self.mcfg.block_size) * self.tokens_per_iter


def model_config(cfg, vocab_size, ckpt=None, ckpt_path=None):
    """The model config of a run: the registry's (models.py) preset with the train config's overrides; on
    resume the checkpoint's, which must be the same."""
    try:
        mcfg = models.make_config(cfg.model, cfg.preset, **model_overrides(cfg, vocab_size))
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    if ckpt is None:
        return mcfg
    saved = models.config_from_dict(cfg.model, ckpt["model_config"])
    asked, had = models.function_dict(mcfg), models.function_dict(saved)
    diff = [f"{k}={asked.get(k)!r} asked, {had.get(k)!r} saved" for k in dict.fromkeys([*asked, *had])
            if asked.get(k) != had.get(k)]
    if diff:
        raise ConfigError(f"resume: the model config of {ckpt_path} differs from this run's: {'; '.join(diff)}")
    if hasattr(saved, "compile_memory"):  # how the chunks run and what the backward keeps are this run's choice
        saved = dataclasses.replace(saved, compile_memory=mcfg.compile_memory, recompute_inputs=mcfg.recompute_inputs)
    return saved


def setup(cfg, device, ddp, rank, world, batches=None):
    """The Run of this process: dtype, data, model (resumed from ckpt.pt for init_from=resume), optimizer."""
    from data.common import read_meta

    n_micro, shares, split_how = batch_split(cfg.batch_size, cfg.gradient_accumulation_steps, world)
    dtype = cli.resolve_dtype(cfg.dtype, device)
    cli.fast_float32(device)
    if batches is None:
        data_dir = resolve_dataset(cfg.dataset, rank, world)
        meta = read_meta(data_dir)
    out_dir = pathlib.Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    ckpt = (load_resume_checkpoint(ckpt_path, out_dir / "ckpt_best.pt", cfg.model, device)
            if cfg.init_from == "resume" else None)
    mcfg = model_config(cfg, int(meta["vocab_size"]) if batches is None else batches.vocab_size, ckpt, ckpt_path)
    T = mcfg.block_size
    learning_rate = cfg.learning_rate if cfg.learning_rate is not None else models.preset_learning_rate(cfg.preset)
    resolved = dataclasses.replace(
        cfg, learning_rate=learning_rate, min_lr=cfg.min_lr if cfg.min_lr is not None else learning_rate / 10,
        lr_decay_iters=cfg.lr_decay_iters if cfg.lr_decay_iters is not None else cfg.max_iters,
        block_size=T, n_layer=mcfg.n_layer, n_embd=mcfg.n_embd, n_head=mcfg.n_head)
    if batches is None:
        batches = WindowBatches(data_dir, meta, T, device, cfg.seed, cfg.batch_size, n_micro)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    raw_model = models.build_model(mcfg).to(device)
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, learning_rate, (cfg.beta1, cfg.beta2), device.type)
    torch.manual_seed(cfg.seed + rank)  # per-rank stream for dropout
    run = Run(cfg, resolved, device, ddp, rank, world, print if rank == 0 else (lambda *a, **k: None), dtype,
              cli.autocast_for(device, dtype), n_micro, shares[rank], split_how, batches, out_dir,
              mcfg, raw_model, optimizer)
    if ckpt is not None:
        resume(run, ckpt)
        del ckpt
    run.scaler = torch.amp.GradScaler("cuda") if dtype == "float16" else None
    run.compile, run.compile_why = cli.resolve_train_compile(cfg.compile, device)
    cli.check_compile_mode(cfg.compile_mode, run.compile, device)
    mode = cli.torch_compile_mode(cfg.compile_mode)
    if run.compile:  # block by block (LM.compile_regions): the compile time does not grow with the depth
        raw_model.compile_regions(mode=mode)
    run.model = raw_model
    if cfg.compile_mode in cli.CUDA_GRAPH_MODES:
        cli.keep_grad_buffers(raw_model.parameters())
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        run.model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    return run


def resume(run, ckpt):
    """Continue from a checkpoint: weights, optimizer, iteration, best val loss, every rank's RNG streams."""
    run.raw_model.load_state_dict(ckpt["model"])
    run.raw_model.load_optimizer_state(run.optimizer, ckpt["optimizer"])
    run.iter_num, run.best_val = int(ckpt["iter_num"]), float(ckpt["best_val_loss"])
    run.saved_iter = run.iter_num
    states = ckpt["rng_states"]
    if len(states) == run.world:
        set_rng_state(states[run.rank], run.device)
    else:
        run.log(f"note: the checkpoint was written by {len(states)} processes, this run has {run.world}: "
                f"RNG streams (dropout only) are reseeded")
        torch.manual_seed(run.cfg.seed + run.rank + 7919 * run.iter_num)


def start_outputs(run):
    """config.json and log.jsonl in out_dir (on resume, the log lines after the checkpoint are dropped), and
    the run's description at the top of the printed log."""
    cfg, mcfg, T = run.cfg, run.mcfg, run.mcfg.block_size
    if run.master:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        (run.out_dir / "config.json").write_text(json.dumps(
            {"model_name": cfg.model, "model_config": mcfg.to_dict(), "train_config": dataclasses.asdict(run.resolved),
             "dataset_dir": run.batches.info["dir"]}, indent=1) + "\n")
        if cfg.init_from == "scratch":
            run.log_path.write_text("")
        elif run.log_path.exists():  # drop lines logged after the checkpoint we resume from
            keep = [l for l in run.log_path.read_text().splitlines()
                    if l and json.loads(l).get("iter", 0) <= run.iter_num]
            run.log_path.write_text("".join(l + "\n" for l in keep))
    m = run.raw_model
    run.log(f"{cfg.model} ({cfg.preset}): {m.num_params(False) / 1e6:.2f}M parameters "
            f"({m.num_params() / 1e6:.2f}M without embeddings), {mcfg.n_layer} layers x {mcfg.n_embd}, "
            f"{mcfg.n_head} heads, vocab {mcfg.vocab_size}, context {T}")
    run.log(run.batches.describe())
    run.log(f"global batch: {run.n_micro * cfg.batch_size:,} sequences x {T:,} tokens = {run.tokens_per_iter:,} "
            f"tokens per step ({run.split_how})")
    run.log(f"device {run.device}, dtype {run.dtype}, compile {run.compile}"
            f"{f' ({run.compile_why})' if run.compile_why else ''}"
            f"{f', mode {cfg.compile_mode}' if cfg.compile_mode != 'default' else ''}, lr {run.resolved.learning_rate:g} -> "
            f"{run.resolved.min_lr:g}, {'resuming at' if run.iter_num else 'starting at'} iteration {run.iter_num} "
            f"of {cfg.max_iters}")


def write_log(run, record):
    if run.master:
        with open(run.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")


def step(run, lr):
    """One optimizer step at learning rate lr over this rank's share of the step's windows: (loss, grad norm),
    averaged over the processes. Raises TrainingDiverged, before stepping, on a non-finite loss or norm."""
    cfg, model, scaler = run.cfg, run.model, run.scaler
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=run.device)
    for i, (micro, first, end, divisor) in enumerate(run.share):
        x, y = (t.to(run.device) for t in run.batches.train_batch(run.iter_num, micro, first, end))
        sync = not run.ddp or i == len(run.share) - 1  # DDP all-reduces gradients on the last micro-step only
        with (contextlib.nullcontext() if sync else model.no_sync()):
            cli.cuda_graph_step_begin(cfg.compile_mode)  # the loss is read right after its backward
            with run.autocast:
                _, loss = model(x, y)
            loss = loss / divisor
            (scaler.scale(loss) if scaler else loss).backward()
        loss_sum += loss.detach().float()
    if scaler:
        scaler.unscale_(run.optimizer)
    params = [p for p in run.raw_model.parameters() if p.requires_grad]
    if cfg.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if run.ddp:
        torch.distributed.all_reduce(loss_sum)
        loss_sum /= run.world
    loss_val, gn_val = torch.stack([loss_sum, grad_norm.float()]).tolist()
    if not math.isfinite(loss_val) or (not math.isfinite(gn_val) and scaler is None):
        where = (f"the last good checkpoint is {run.ckpt_path} (iteration {run.saved_iter})"
                 if run.saved_iter is not None else "no checkpoint was written yet")
        raise TrainingDiverged(f"non-finite {'loss' if not math.isfinite(loss_val) else 'gradient norm'} at "
                               f"iteration {run.iter_num + 1} (loss {loss_val}, grad norm {gn_val}); stopped "
                               f"before taking that step; {where}")
    if scaler:
        scaler.step(run.optimizer)
        scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=cfg.compile_mode not in cli.CUDA_GRAPH_MODES)  # cli.keep_grad_buffers
    run.iter_num += 1
    return loss_val, gn_val


@torch.no_grad()
def evaluate(run):
    """Mean loss of eval_iters fixed batches per split (the same batches at every evaluation; the batches are
    shared out over the ranks)."""
    run.model.eval()
    out = {}
    for split in ("val", "train"):
        total = torch.zeros(2, device=run.device, dtype=torch.float64)
        for k in range(run.rank, run.cfg.eval_iters, run.world):
            x, y = (t.to(run.device) for t in run.batches.eval_batch(split, k))
            cli.cuda_graph_step_begin(run.cfg.compile_mode)
            with run.autocast:
                _, loss = run.raw_model(x, y)
            total += torch.stack([loss.double(), torch.ones((), device=run.device, dtype=torch.float64)])
        if run.ddp:
            torch.distributed.all_reduce(total)
        out[split] = (total[0] / total[1]).item()
    run.model.train()
    return out


def save(run, is_best, final):
    """Write ckpt.pt (always_save_checkpoint or final) and ckpt_best.pt (is_best) from rank 0, with every
    rank's RNG state; returns the names written."""
    cfg = run.cfg
    # every rank takes the same decision (val loss is all-reduced), so skipping the gather is safe
    if not (cfg.always_save_checkpoint or final or is_best):
        return []
    states = [None] * run.world
    if run.ddp:
        torch.distributed.all_gather_object(states, rng_state(run.device))
    else:
        states = [rng_state(run.device)]
    if not run.master:
        return []
    obj = {"model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(), "model_name": cfg.model,
           "model_config": run.mcfg.to_dict(), "train_config": dataclasses.asdict(run.resolved),
           "iter_num": run.iter_num, "best_val_loss": run.best_val, "rng_states": states,
           "sampler": {"seed": cfg.seed, "next_step": run.iter_num},
           "dataset": run.batches.info}
    written = []
    if cfg.always_save_checkpoint or final:
        save_checkpoint(obj, run.ckpt_path)
        written.append(run.ckpt_path.name)
    if is_best and written:
        copy_checkpoint(run.ckpt_path, run.best_path)
    elif is_best:
        save_checkpoint(obj, run.best_path)
    if is_best:
        written.append(run.best_path.name)
    return written


def _train(cfg, device, ddp, rank, world, t_start, batches=None):
    run = setup(cfg, device, ddp, rank, world, batches)
    start_outputs(run)
    r = run.resolved
    peak = peak_flops(device, getattr(torch, run.dtype))
    peak = peak * world if peak else None
    last_loss, recent, last_eval, n_logged, t_log = None, collections.deque(maxlen=20), {}, 0, time.time()
    run.model.train()
    while run.iter_num < cfg.max_iters:
        lr = get_lr(run.iter_num, r.learning_rate, r.min_lr, cfg.warmup_iters, r.lr_decay_iters)
        last_loss, grad_norm = step(run, lr)
        recent.append(last_loss)
        it = run.iter_num
        n_logged += 1

        if it % cfg.log_interval == 0 or it == cfg.max_iters:
            dt = (time.time() - t_log) / n_logged
            t_log, n_logged = time.time(), 0
            mfu = run.flops_per_iter / dt / peak if peak else None
            write_log(run, {"iter": it, "loss": last_loss, "lr": lr, "grad_norm": grad_norm,
                            "tokens_per_s": run.tokens_per_iter / dt, "ms_per_iter": 1000 * dt, "mfu": mfu})
            run.log(f"iter {it:>{len(str(cfg.max_iters))}}/{cfg.max_iters} | loss {last_loss:.4f} | lr {lr:.2e} | "
                    f"grad norm {grad_norm:.2f} | {run.tokens_per_iter / dt:,.0f} tok/s | {1000 * dt:.0f} ms/iter"
                    + (f" | mfu {100 * mfu:.1f}%" if mfu is not None else "")
                    + f" | eta {_fmt_time(dt * (cfg.max_iters - it))}", flush=True)

        final = it == cfg.max_iters
        if it % cfg.eval_interval == 0 or final:
            t_eval = time.time()
            last_eval = evaluate(run)
            is_best = last_eval["val"] < run.best_val
            run.best_val = min(run.best_val, last_eval["val"])
            written = save(run, is_best, final)
            if cfg.always_save_checkpoint or final:
                run.saved_iter = it
            ppl = math.exp(min(last_eval["val"], 700))
            write_log(run, {"iter": it, "val_loss": last_eval["val"], "val_ppl": ppl,
                            "train_eval_loss": last_eval["train"], "best_val_loss": run.best_val})
            run.log(f"eval iter {it}: val loss {last_eval['val']:.4f} (ppl {ppl:.2f}), train loss "
                    f"{last_eval['train']:.4f}" + (f" | saved {', '.join(written)}" if written else ""), flush=True)
            t_log += time.time() - t_eval  # evaluation time does not count as training time

    return {"iter": run.iter_num, "train_loss": last_loss,
            "recent_train_loss": sum(recent) / len(recent) if recent else None, "val_loss": last_eval.get("val"),
            "train_eval_loss": last_eval.get("train"), "best_val_loss": run.best_val, "out_dir": str(run.out_dir),
            "ckpt": str(run.ckpt_path), "ckpt_best": str(run.best_path), "tokens": run.iter_num * run.tokens_per_iter,
            "flops": run.iter_num * run.flops_per_iter, "params": run.raw_model.num_params(),
            "elapsed_s": time.time() - t_start}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if cli.wants_help(argv):
        print(cli.help_text(__doc__, TrainConfig(), "Keys and their defaults (the main job):"))
        return 0
    try:
        cfg = parse_args(argv)
        result = train(cfg)
    except (ConfigError, TrainingDiverged) as e:
        if int(os.environ.get("RANK", 0)) == 0:  # every rank raises the same error: say it once
            print(f"train.py: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    if int(os.environ.get("RANK", 0)) == 0:
        val = result["val_loss"]
        print(f"done: {result['iter']} iterations in {_fmt_time(result['elapsed_s'])}"
              + (f"; val loss {val:.4f} (ppl {math.exp(val):.2f}), best {result['best_val_loss']:.4f}"
                 if val is not None else ""))
        print(f"checkpoint: {result['ckpt']} (best val: {result['ckpt_best']})")
        print(f"sample:     python sample.py --out_dir={cfg.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
