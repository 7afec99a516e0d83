"""Throughput versus context length, every model in one harness; and the memory op alone (--op).

    python bench.py                                  # CPU preset: all four models, short lengths
    python bench.py --preset=gpu                     # GPU preset: up to 32K tokens (8K is the paper's point), compiled
    python bench.py --op                             # miras_memory alone vs reference, GEMM peak, titans-pytorch
    python bench.py --models=moneta,transformer --seq_lens=256,1024 --json=out/bench.json

Each (model, length, mode) runs in its own worker process so its peak memory is its own: CUDA allocator
peak on GPU (spawned workers: CUDA cannot be used in a forked child); on CPU the worker's peak resident set
size above its size at its start (ru_maxrss delta; workers forked from a fork server), and beside it, where glibc
can say (Linux), peak_heap_bytes: the heap bytes in use at the peak of one more round, sampled, above the worker's
start (heap_in_use: what the step holds, without the pages the allocator keeps after frees). Timings are medians
over --repeats rounds after --warmup untimed runs (at least one: the first call, timed on its own as
first_call_s, which includes compiling under --compile); a round is one training step or prefill, or
--decode_tokens decode steps after a fresh prefill of seq_len tokens (the decode median is over every step; decode
warms up with as many untimed steps as it takes to run every graph that the timed and profiled steps run).
The batch is tokens_per_step // seq_len so every length does the same work per step. Every row has
minor_faults_per_round: the host's minor page faults in a timed round, the rounds' median (the worker's, every
thread's; interleaved, the round's own): pages the allocator gave back to the system and touched again, each paid
in system time.
--interleave runs every model of one (length, mode) in one worker instead, the rounds taken in turns, so that
the models compare on a machine whose speed drifts over minutes (a shared CPU); peak memory is then null.
--interleave_lengths (with --interleave) puts every length of a mode in that worker too, so that the lengths
compare as well (a decode sweep's flatness: ms per token from 128 to 8,192 tokens, timed in turns).
--compile (default None: on CUDA only) compiles the models for train and prefill, and sample.py's decode step.
A run that runs out of memory is reported as OOM and the sweep goes on. --profile adds each cell's `profile`:
one warm call under torch.profiler (profile_call: on CUDA whether the GPU is busy or waits on the host; on a CPU
its self time split into matmuls, attention, compiled kernels and the rest); with --op also per chunk
(host_ops_per_chunk, and kernels_per_chunk on CUDA: what a GPU launches or replays per chunk).

The keys that the --preset sets take its values unless given. A bad key or value (unknown name,
non-integer, a length < 1, --repeats < 1, ...) is a one-line error on stderr (`bench.py: error: ...`, exit
status 2). --op times titans-pytorch's NeuralMemory (if installed) at the op's shape: same heads, head
width, chunk and memory MLP (titans_memory).
"""
import contextlib
import ctypes
import functools
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

import cli
import memory_core
import memory_reference
import model_common
import sample
from train import save_json

PRESETS = {
    # cpu: a byte-sized vocabulary, so that the tiny model's time goes to the sequence mixers being compared
    # rather than to a 50K-way LM head (which would be 90% of a 128-wide model's FLOPs)
    "cpu": dict(models="moneta,yaad,memora,transformer", seq_lens="128,512,2048,8192", model_preset="tiny",
                vocab_size=256, tokens_per_step=8192, decode_tokens=16, repeats=2, warmup=1),
    "gpu": dict(models="moneta,yaad,memora,transformer", seq_lens="2048,4096,8192,16384,32768",
                model_preset="340m", vocab_size=50304, tokens_per_step=65536, decode_tokens=64, repeats=5,
                warmup=2),
}


MODES = ("train", "prefill", "decode")
OP_IMPLS = ("eager", "compiled_chunks", "compiled", "reference")


class BenchError(cli.ConfigError):
    """A bad command line: main() prints it as one line (`bench.py: error: ...`) and exits with status 2."""


@dataclass
class BenchConfig:
    preset: str = "cpu"
    op: bool = False              # benchmark memory_core.miras_memory alone instead of the models
    op_impls: str = "eager,compiled_chunks,reference"  # also: compiled (whole call; slow to compile on CPU)
    op_shape: str = "1,4,64,4"    # --op: B,H,d,E (chunk 64); e.g. 1,1,4,2, where compute is nil: the host's cost
    # a key that the preset sets (PRESETS) and the command line does not give takes the preset's value
    models: str = ""              # comma-separated
    seq_lens: str = ""            # comma-separated; --op: 512,2048,8192
    modes: str = "train,prefill,decode"
    model_preset: str = ""        # preset of every model, so sizes match
    model_args: str = ""          # config overrides of the Miras models ("k=v,k=v" or JSON, as train.py's), e.g.
                                  # recompute_inputs=false; the Transformer++ stays the baseline as it is
    vocab_size: int = 0
    tokens_per_step: int = 0      # >= the longest seq_len: the batch is tokens_per_step // seq_len
    decode_tokens: int = 0        # decode steps timed after a prefill of seq_len tokens
    repeats: int = 0
    warmup: int = -1
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    dtype: str = "auto"           # float32 | bfloat16 (autocast) | auto: bfloat16 on CUDA, float32 on CPU
    compile: Optional[bool] = None  # torch.compile the models (train, prefill) and the decode step; None: on CUDA only
    compile_mode: str = "default"   # torch.compile mode (cli.COMPILE_MODES); reduce-overhead: CUDA graphs (CUDA only)
    interleave: bool = False      # every model in one worker per (length, mode), timed in turns: comparable
                                  # on a machine whose speed drifts; no per-model peak memory (null)
    interleave_lengths: bool = False  # with --interleave: every length of a mode in that one worker too
    profile: bool = False         # also profile one warm call of each cell (profile_call): where its time goes;
                                  # --op: also per chunk (host ops; CUDA kernels)
    mem_limit_gb: float = 0.0     # >0: cap each worker's memory (exercises the OOM path)
    json: str = "bench.json"
    plot: str = ""                # PNG path (needs matplotlib); "" = next to the JSON
    extra: dict = field(default_factory=dict)


def parse_args(argv) -> BenchConfig:
    """A validated BenchConfig from `--key=value` arguments (`--op` alone is --op=true); raises BenchError."""
    cfg, given = cli.parse(BenchConfig, argv, "bench.py", error=BenchError)
    if cfg.preset not in PRESETS:
        raise BenchError(f"unknown --preset {cfg.preset!r}; use one of {', '.join(PRESETS)}")
    for key, val in PRESETS[cfg.preset].items():
        if key not in given:
            setattr(cfg, key, val)
    if cfg.op and "seq_lens" not in given:
        cfg.seq_lens = "512,2048,8192"  # the memory_core issue's lengths
    validate(cfg)
    return cfg


def _names(cfg, key, valid):
    """Check the comma-separated list --key against `valid`; store it without blanks."""
    raw = getattr(cfg, key)
    names = [s.strip() for s in raw.split(",")]
    if "" in names:
        raise BenchError(f"--{key} needs a comma-separated list of names from {', '.join(valid)}, got {raw!r}")
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise BenchError(f"unknown --{key} {', '.join(unknown)}; use some of {', '.join(valid)}")
    if len(set(names)) < len(names):
        raise BenchError(f"--{key} names something twice: {raw!r}")
    setattr(cfg, key, ",".join(names))
    return names


def model_args(cfg, name):
    """--model_args as overrides of model `name`'s config: the Miras models' only (raises BenchError)."""
    from models import MODELS
    from model_common import MirasConfig
    config_cls = MODELS[name][0]
    if not issubclass(config_cls, MirasConfig):
        return {}
    return cli.parse_model_args(cfg.model_args, config_cls, name, error=BenchError)


def validate(cfg):
    """Reject what cannot be measured, naming the key and what to pass instead (BenchError)."""
    from models import MODELS, make_config
    models = _names(cfg, "models", list(MODELS))
    modes = _names(cfg, "modes", MODES)
    _names(cfg, "op_impls", OP_IMPLS)
    op_shape(cfg)
    try:
        seq_lens = [int(s) for s in cfg.seq_lens.split(",")]
    except ValueError:
        raise BenchError(f"--seq_lens needs comma-separated positive integers (e.g. --seq_lens=512,2048), "
                         f"got {cfg.seq_lens!r}") from None
    if min(seq_lens) < 1:
        raise BenchError(f"--seq_lens must all be >= 1 (e.g. --seq_lens=512,2048), got {cfg.seq_lens!r}")
    if len(set(seq_lens)) < len(seq_lens):
        raise BenchError(f"--seq_lens names a length twice: {cfg.seq_lens!r}")
    cfg.seq_lens = ",".join(map(str, seq_lens))
    for name in models:
        try:
            make_config(name, cfg.model_preset, **model_args(cfg, name))
        except ValueError as e:
            raise BenchError(f"--model_preset / --model_args: {e}") from None
    if cfg.repeats < 1:
        raise BenchError(f"--repeats must be >= 1 (timed runs per measurement), got {cfg.repeats}")
    if cfg.warmup < 0:
        raise BenchError(f"--warmup must be >= 0 (untimed runs before timing), got {cfg.warmup}")
    if cfg.vocab_size < 1:
        raise BenchError(f"--vocab_size must be >= 1, got {cfg.vocab_size}")
    if cfg.decode_tokens < (1 if "decode" in modes else 0):
        raise BenchError(f"--decode_tokens must be >= 1 when --modes includes decode (>= 0 otherwise), "
                         f"got {cfg.decode_tokens}")
    if cfg.tokens_per_step < 1:
        raise BenchError(f"--tokens_per_step must be >= 1, got {cfg.tokens_per_step}")
    if not cfg.op and {"train", "prefill"} & set(modes) and cfg.tokens_per_step < max(seq_lens):
        raise BenchError(f"--tokens_per_step={cfg.tokens_per_step} is less than the longest --seq_lens, "
                         f"{max(seq_lens)}: the batch (tokens_per_step // seq_len) would be 0; "
                         f"pass --tokens_per_step={max(seq_lens)} or more")
    if not (cfg.mem_limit_gb >= 0 and cfg.mem_limit_gb != float("inf")):
        raise BenchError(f"--mem_limit_gb must be a finite number >= 0 (0 = no limit), got {cfg.mem_limit_gb}")
    if cfg.op and cfg.interleave:
        raise BenchError("--interleave times the models in turns; --op has no models: drop one of the two")
    if cfg.interleave_lengths and not cfg.interleave:
        raise BenchError("--interleave_lengths puts every length in the worker that --interleave shares between "
                         "the models: pass --interleave=true with it")
    if cfg.op and cfg.compile_mode != "default":
        raise BenchError("--compile_mode compiles the models; --op times the implementations --op_impls names: "
                         "drop one of the two")
    if not cfg.json:
        raise BenchError("--json needs a file path (e.g. --json=out/bench.json)")
    device = cli.resolve_device(cfg.device, BenchError)
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    cfg.device = str(device)
    cfg.compile = cli.resolve_compile(cfg.compile, device)
    cli.check_compile_mode(cfg.compile_mode, cfg.compile, device, BenchError)
    cfg.dtype = cli.resolve_dtype(cfg.dtype, device, BenchError)
    if cfg.dtype not in ("float32", "bfloat16"):
        raise BenchError(f"--dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def seconds(fn, device):
    """Seconds of one call, device work included (a model's first call: compiling too under --compile)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def timed(fn, device, repeats, warmup):
    for _ in range(warmup):
        fn()
    return statistics.median(seconds(fn, device) for _ in range(repeats))


MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm", "aten::mv", "aten::addmv",
              "aten::dot")


def with_compiled_kernel_records(fn):
    """fn(cfg, ...) compiling, with --profile on a CPU, Inductor's C++ kernels with a profiler record each (else a
    kernel's time is its graph wrapper's self time, mixed with the host's), so that self_time_breakdown can tell
    them apart. A record costs a check per kernel call while no profiler runs. Only what compiles inside fn gets
    them: memory_core's chunk graphs compiled earlier in the process (same key) keep their kernels unrecorded."""
    @functools.wraps(fn)
    def wrapped(cfg, *args):
        records = cfg.profile and not cfg.device.startswith("cuda")
        with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}) if records else contextlib.nullcontext():
            return fn(cfg, *args)
    return wrapped


def self_time_breakdown(stats):
    """A CPU profile's self time in seconds by kind of work: matmul (the BLAS products, MATMUL_OPS), attention
    (SDPA's kernels), fused (Inductor's generated kernels: with_compiled_kernel_records), other (the rest: eager
    elementwise ops, copies and concatenations, the host's Python and dispatch, the compiled graphs' wrappers, and
    the matmuls that a graph's C++ wrapper calls past the profiler's records: a compiled decode step's, the scanned
    compiled chunks' on a CPU, memory_core.SCAN_DEVICES)."""
    parts = dict(matmul_s=0.0, attention_s=0.0, fused_s=0.0, other_s=0.0)
    for a in stats:
        kind = ("matmul_s" if a.key in MATMUL_OPS else "attention_s" if "scaled_dot_product" in a.key
                else "fused_s" if "cpp_fused" in a.key else "other_s")
        parts[kind] += a.self_cpu_time_total / 1e6
    return parts


def profile_call(fn, device, top=12):
    """One warm call under torch.profiler: its wall time; the host's op count and the CUDA kernels launched
    (host `*LaunchKernel*` calls) and run, with their summed device time: busy_fraction = kernel time / wall far
    below 1 means the GPU waits on the host (launch- or Python-bound, not kernel-bound); memory_op: the time of
    the Miras memory operator and its backward (miras::chunk_loop*, children included); top: the ops of most
    self time (device time on CUDA, CPU time on a CPU) as [name, calls, seconds]; on a CPU, breakdown: the self
    time by kind of work (self_time_breakdown)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.startswith("cuda")
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        t0 = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - t0
    events, stats = prof.events(), prof.key_averages()
    self_time = "self_device_time_total" if cuda else "self_cpu_time_total"
    memory = [a for a in stats if a.key.startswith("miras::chunk_loop")]
    out = dict(wall_s=wall, host_ops=sum(e.device_type == DeviceType.CPU for e in events),
               memory_op=dict(calls=sum(a.count for a in memory), cpu_s=sum(a.cpu_time_total for a in memory) / 1e6),
               top=[[a.key, a.count, getattr(a, self_time) / 1e6]
                    for a in sorted(stats, key=lambda a: getattr(a, self_time), reverse=True)[:top]])
    if not cuda:
        out["breakdown"] = self_time_breakdown(stats)
    else:
        kernel_s = sum(a.self_device_time_total for a in stats) / 1e6
        out["memory_op"]["device_s"] = sum(a.device_time_total for a in memory) / 1e6
        out.update(launches=sum("LaunchKernel" in e.name for e in events if e.device_type == DeviceType.CPU),
                   kernels=sum(e.device_type == DeviceType.CUDA for e in events), kernel_s=kernel_s,
                   busy_fraction=kernel_s / wall)
    return out


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                        "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc_mallinfo2():
    """glibc's mallinfo2 (2.33+), or None on another C library."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _glibc_mallinfo2()
_HEAP_AT_START = None  # heap_in_use() when this CPU worker started (_worker); None on CUDA or without glibc


def heap_in_use():
    """Bytes the C heap has handed out and not taken back (glibc: chunks in use plus mapped chunks), None where
    the C library cannot say. The RSS also holds what glibc keeps after frees (an arena is not given back while a
    block near its top is in use), so two models that hold the same bytes can differ in peak RSS (README,
    Benchmarks); this count does not."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


class HeapPeak:
    """The largest heap_in_use() seen while the block runs: a thread samples it every `period` seconds (ops
    release the GIL, so it samples inside them; one op's peak between two samples can be missed). The sampling
    costs the block a few percent of its time: measure in a round that is not timed."""

    def __init__(self, period=5e-4):
        self.period, self.peak = period, None
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, heap_in_use())

    def __enter__(self):
        self.peak = heap_in_use()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, heap_in_use())


def worker_start_method(device):
    """How in_worker starts its process: "spawn" when CUDA is in use or already initialized here, else
    "forkserver".

    CUDA cannot be used in a forked child once the parent has initialized it (header() does, naming the GPU),
    so CUDA runs spawn a fresh interpreter per worker; their peak is the CUDA allocator's, which a fresh
    process measures the same way. A plain fork of this process is not safe either once it has run a
    multi-threaded CPU op: the child inherits OpenMP's thread pool in whatever state the fork caught it, and
    its first parallel op can wait forever (a bench call after any torch work in the same process, such as a
    test session, hung in the worker's first rms_norm). CPU workers are forked from a fork server instead, a
    fresh interpreter that imports bench (and torch) once and runs no op. The CPU peak is ru_maxrss above the
    worker's RSS at its start: a forked child's high-water mark starts at its current RSS, so the difference
    is what the job itself allocated. (A spawned child, fork + exec, keeps its parent's pre-exec high-water
    mark in ru_maxrss while its own RSS starts small, so a job using less than the parent would be reported at
    the parent's size.)"""
    if str(device).startswith("cuda") or torch.cuda.is_initialized():
        return "spawn"
    return "forkserver"


def _worker(job, cfg, conn):
    """Body of the worker process (module level, so that spawn can pickle it): run job(), send the result."""
    cuda = cfg.device.startswith("cuda")
    try:
        if cuda:  # a fresh (spawned) process: make cfg.device current and initialize CUDA before any cuda call
            torch.cuda.set_device(torch.device(cfg.device).index or 0)  # set_device refuses a bare "cuda"
            torch.cuda.init()
        cli.fast_float32(cfg.device)  # as train.py and sample.py run
        if cfg.mem_limit_gb > 0:
            if cuda:
                total = torch.cuda.get_device_properties(cfg.device).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.mem_limit_gb * 2**30 / total), cfg.device)
            else:  # RLIMIT_DATA bounds heap and anonymous mmaps: a big tensor then fails to allocate
                soft = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 + int(cfg.mem_limit_gb * 2**30)
                resource.setrlimit(resource.RLIMIT_DATA, (soft, resource.RLIM_INFINITY))
        if cuda:
            torch.cuda.reset_peak_memory_stats(cfg.device)
        global _HEAP_AT_START
        base, _HEAP_AT_START = rss_bytes(), None if cuda else heap_in_use()  # None: no heap peak (bench_model)
        out = job()
        if cuda:
            peak = torch.cuda.max_memory_allocated(cfg.device)
        else:
            peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
        conn.send((out, peak))
    except (torch.OutOfMemoryError, MemoryError) as e:
        conn.send(({"oom": str(e).splitlines()[0][:120]}, None))
    except RuntimeError as e:
        msg = str(e)
        if "memory" in msg.lower() or "alloc" in msg.lower():
            conn.send(({"oom": msg.splitlines()[0][:120]}, None))
        else:
            conn.send(({"error": msg.splitlines()[0][:200]}, None))
    except Exception as e:  # reported in the table; the sweep goes on
        conn.send(({"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}, None))
    finally:
        conn.close()


def in_worker(job, cfg, method=None):
    """Run job() in a worker process; return (result dict, peak memory bytes) or ({"oom": msg}, None).

    job must be picklable when the worker is spawned (a functools.partial of a module-level function);
    method: "forkserver", "spawn" or "fork", by default worker_start_method(cfg.device)."""
    ctx = mp.get_context(method or worker_start_method(cfg.device))
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["bench"])  # imported once in the server, not per worker
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(job, cfg, child))
    proc.start()
    child.close()
    try:
        result = parent.recv()
    except EOFError:  # killed (e.g. by the kernel's OOM killer)
        result = None
    proc.join()
    return result or ({"oom": f"worker died with exit code {proc.exitcode}"}, None)


# ----------------------------------------------------------------------------------------------
# Model-level benchmark

def achieved_flops(model, seq_len, tokens_per_s, training):
    """The model's FLOPs per token (model.flops_per_token: the PaLM convention, which counts neither the Miras
    backward's recompute nor the input stage's checkpointing) and the rate they were done at: a model that does
    little work per token slowly is told apart from one that does much work."""
    per_token = model.flops_per_token(seq_len, training=training)
    return dict(model_flops_per_token=per_token, model_gflops_per_s=per_token * tokens_per_s / 1e9)


def decode_warm_steps(config, seq_len, cfg):
    """Untimed decode steps from position seq_len: --warmup (at least one), and more until they have run every graph
    of the compiled step that a later step runs: a Miras chunk's first token has a graph of its own (sample.make_step),
    and a round steps through positions seq_len to seq_len + decode_tokens, the profiled step (--profile) through the
    one after the warm-up. A prefill that ends at a chunk's end (every default length) makes the first step a chunk
    start and the second one of the other graph."""
    steps = max(cfg.warmup, 1)

    def graphs(positions):  # which graphs the steps at these positions run: a chunk start's, the other one
        return {sample.steps_to_chunk_start(config, pos) == 0 for pos in positions}  # None == 0: no Miras layer
    rounds = graphs(range(seq_len, seq_len + cfg.decode_tokens + 1))
    while not rounds | graphs([seq_len + steps] if cfg.profile else []) <= graphs(range(seq_len, seq_len + steps)):
        steps += 1
    return steps


@with_compiled_kernel_records
def prepare_cell(cfg, name, seq_len, mode):
    """Build one (model, length, mode) cell and make its first call (compiling under --compile) and its warm-up.

    Returns (run, result): run() times one round (a training step or a prefill: [seconds]; decode:
    decode_tokens single-token steps after a fresh prefill, [seconds per step]); result(times) gives the cell's
    fields from every round's times (their median)."""
    from models import build_model, make_config  # the registry: every model at the same preset size
    device = cfg.device
    batch = max(1, cfg.tokens_per_step // seq_len)
    max_len = seq_len
    if mode == "decode":
        # untimed steps from position seq_len on, through every graph a timed or profiled step runs: a graph's
        # compile would otherwise land in that step
        warm_steps = decode_warm_steps(make_config(name, cfg.model_preset, **model_args(cfg, name)), seq_len, cfg)
        # the cache holds a round's steps, or the warm-up's and the profiled one
        max_len += max(cfg.decode_tokens + 1, warm_steps + (1 if cfg.profile else 0))
    model = build_model(name, cfg.model_preset, block_size=max_len, vocab_size=cfg.vocab_size,
                        **model_args(cfg, name)).to(device)
    autocast = cli.autocast_for(device, cfg.dtype)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(model.config.vocab_size, (batch, seq_len), generator=gen).to(device)
    if mode in ("train", "prefill"):
        training = mode == "train"
        model.train(training)
        if cfg.compile:  # as train.py compiles it: block by block
            model.compile_regions(mode=cli.torch_compile_mode(cfg.compile_mode))
        graphs = cfg.compile and cfg.compile_mode in cli.CUDA_GRAPH_MODES
        if training:
            optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device.split(":")[0])
            if graphs:
                cli.keep_grad_buffers(model.parameters())

            def call():
                cli.cuda_graph_step_begin(cfg.compile_mode)
                with autocast:
                    _, loss = model(idx, targets=idx)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=not graphs)
        else:
            def call():
                cli.cuda_graph_step_begin(cfg.compile_mode)
                with torch.no_grad(), autocast:
                    model(idx)
        first = seconds(call, device)  # one of the warm-up calls
        for _ in range(max(0, cfg.warmup - 1)):
            call()
        profiled = dict(profile=profile_call(call, device)) if cfg.profile else {}

        def result(times):
            sec = statistics.median(times)
            return dict(batch_size=batch, tokens_per_s=batch * seq_len / sec, ms_per_step=1e3 * sec,
                        first_call_s=first, **achieved_flops(model, seq_len, batch * seq_len / sec, training),
                        **profiled)
        return lambda: [seconds(call, device)], result
    # decode: one sequence, prefilled to seq_len, then single-token steps of sample.py's step; every round
    # starts from a fresh prefill, so that each times positions seq_len to seq_len + decode_tokens and the
    # KV cache holds only those (a full-attention step reads its whole preallocated cache)
    model.eval()
    prompt = idx[:1]
    step_fn = sample.make_step(model, autocast, cfg.compile, cfg.compile_mode)
    at = {}  # the cache in use and the next input token

    def prefill():
        with torch.no_grad():
            cache = model.init_cache(1, max_len, device, cli.kv_cache_dtype(autocast))  # as sample.py
            with autocast:
                model.prefill(prompt, cache)
        at.update(cache=cache, tok=prompt[:, -1:])

    def one_step():
        at["tok"], _ = step_fn(at["tok"], at["cache"])  # greedy, drawn inside the step

    prefill()
    with torch.no_grad():
        first = seconds(one_step, device)  # compiles the step under --compile
        for _ in range(warm_steps - 1):
            one_step()
        profiled = dict(profile=profile_call(one_step, device)) if cfg.profile else {}

    def run():
        prefill()
        with torch.no_grad():
            one_step()  # untimed: a compiled step takes a new cache's buffers and checks its guards
            return [seconds(one_step, device) for _ in range(cfg.decode_tokens)]

    def result(times):
        sec = statistics.median(times)
        return dict(batch_size=1, tokens_per_s=1.0 / sec, ms_per_token=1e3 * sec, first_call_s=first,
                    state_bytes=model_common.state_bytes(at["cache"])["total"],
                    compiled_by_regions=step_fn.regions, **profiled)
    return run, result


def counting_faults(cell):
    """A cell's (run, result) with the process's minor page faults counted in each round: result's fields gain
    minor_faults_per_round, the median over the rounds run so far (None before any). A step whose allocator
    returns memory to the system when it frees it and faults it back in at the next allocation pays that in
    system time, a cost the step's own code does not show (README, "Another CPU")."""
    run, result = cell
    faults = []

    def counted_run():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        out = run()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return out

    def counted_result(times):
        return dict(result(times), minor_faults_per_round=int(statistics.median(faults)) if faults else None)
    return counted_run, counted_result


def bench_model(cfg, name, seq_len, mode):
    """One cell in its own worker: --repeats rounds, timed after the warm-up; on a CPU whose C library can say,
    one more round under HeapPeak for peak_heap_bytes (above the worker's start)."""
    run, result = counting_faults(prepare_cell(cfg, name, seq_len, mode))
    out = result([t for _ in range(cfg.repeats) for t in run()])
    if _HEAP_AT_START is not None:
        with HeapPeak() as heap:
            run()
        out["peak_heap_bytes"] = heap.peak - _HEAP_AT_START
    return out


def bench_interleaved(cfg, names, seq_lens, mode):
    """Every model's cell at the given lengths (one, or all of them under --interleave_lengths) and one mode in one
    worker (--interleave): all are prepared first, then timed in turns, one round each per turn, the order
    reversed every other turn. On a machine whose speed drifts over minutes (a shared CPU), cells timed minutes
    apart in their own workers do not compare; cells timed in turns see the same drift. Returns
    {(name, seq_len): fields}."""
    keys = [(name, n) for n in seq_lens for name in names]
    cells = {key: counting_faults(prepare_cell(cfg, *key, mode)) for key in keys}
    times = {key: [] for key in keys}
    for turn in range(cfg.repeats):
        for key in (keys if turn % 2 == 0 else keys[::-1]):
            times[key] += cells[key][0]()
    return {key: dict(cells[key][1](times[key]), interleaved=True) for key in keys}


# ----------------------------------------------------------------------------------------------
# Op-level benchmark: miras_memory at B=1, H=4, d=64, E=4, chunk 64 by default (--op_shape)

OP_SHAPE = dict(B=1, H=4, d=64, E=4, chunk=64)  # the default --op_shape
OP_MODELS = {"l2": ("huber", "yaad"), "lq": ("lp", "moneta"), "kl": ("l2", "memora")}  # retention -> objective


def op_shape(cfg):
    """--op_shape as OP_SHAPE's dict (chunk 64), or a one-line BenchError."""
    try:
        B, H, d, E = (int(x) for x in cfg.op_shape.split(","))
    except ValueError:
        B = 0
    if B < 1 or min(H, d, E) < 1:
        raise BenchError(f"--op_shape must be four positive integers B,H,d,E (e.g. 1,4,64,4), got {cfg.op_shape!r}")
    return dict(B=B, H=H, d=d, E=E, chunk=OP_SHAPE["chunk"])


def op_flops_per_token(H, d, E, b):
    """Forward FLOPs per token and head of the chunked MLP memory (model_common.memory_flops; backward ~2x)."""
    return model_common.memory_flops(model_common.MirasConfig(n_embd=H * d, n_head=H, expansion=E, memory="mlp",
                                                              momentum=False), b)


def op_inputs(T, retention, requires_grad, device="cpu", shape=OP_SHAPE):
    B, H, d, E = shape["B"], shape["H"], shape["d"], shape["E"]
    g = torch.Generator().manual_seed(0)
    nrm = torch.nn.functional.normalize
    q = nrm(torch.randn(B, H, T, d, generator=g), dim=-1)
    k = nrm(torch.randn(B, H, T, d, generator=g), dim=-1)
    v = torch.randn(B, H, T, d, generator=g)
    eta = 0.1 + 0.4 * torch.rand(B, H, T, generator=g)
    alpha = 0.9 + 0.1 * torch.rand(B, H, T, generator=g)
    delta = 0.5 + torch.rand(B, H, T, generator=g)
    w = [0.05 * torch.randn(B, H, E * d, d, generator=g), 0.05 * torch.randn(B, H, d, E * d, generator=g)]
    if retention == "kl":
        w = [x.shape[-1] * torch.softmax(x, -1) for x in w]
    # leaves on the device: a leaf moved there after requires_grad_ would send every gradient back to the host
    tensors = [t.to(device).requires_grad_(requires_grad)
               for t in (q, k, v, eta, alpha, w[0], w[1], torch.ones(H, d), torch.zeros(H, d), delta)]
    q, k, v, eta, alpha, w0, w1, lnw, lnb, delta = tensors
    return (q, k, v, eta, alpha, (w0, w1), lnw, lnb), dict(delta=delta)


def gemm_gflops(device, n=2048, repeats=5):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sec = timed(lambda: a @ b, device, repeats, 2)
    return 2 * n**3 / sec / 1e9


@with_compiled_kernel_records
def run_op(cfg):
    device, records = cfg.device, []
    seq_lens = [int(s) for s in cfg.seq_lens.split(",")]
    if device.startswith("cuda"):  # as the model workers run: the op and the GEMM peak both in TF32
        cli.fast_float32(device)
    peak = gemm_gflops(device)
    print(f"float32 GEMM (2048^3; TF32 on CUDA) on {device}: {peak:.1f} GFLOP/s")
    shape = op_shape(cfg)
    b = shape["chunk"]
    flops_tok = shape["H"] * op_flops_per_token(shape["H"], shape["d"], shape["E"], b)
    op = functools.partial(memory_core.miras_memory, check_values=False)  # as the models call it: no host syncs

    def compiled_op(retention):
        """The whole call traced: the chunk loop is one operator (miras::chunk_loop), so only what surrounds it
        compiles and compile time does not grow with T (first_call_s). A copy of the op's code per rule: dynamo's
        recompile limit (8 graphs per code object; with fullgraph, an error past it) then counts each rule's graphs
        (without and with grad, then T dynamic) on their own."""
        own_code = memory_core.with_own_code(memory_core.miras_memory, f"op_{retention}")
        return functools.partial(torch.compile(own_code, fullgraph=True), check_values=False)
    available = {
        "eager": op,
        "compiled_chunks": functools.partial(op, compile_chunks=True),
        "compiled": compiled_op,  # per rule
        "reference": memory_reference.miras_memory_reference,
    }
    assert set(available) == set(OP_IMPLS)
    titans = titans_baseline(cfg)
    for retention, (objective, model) in OP_MODELS.items():
        impls = [(n, available[n](retention) if n == "compiled" else available[n]) for n in cfg.op_impls.split(",")]
        for T in seq_lens:
            if retention == "l2" and titans and T <= 2048:  # the comparison is at T = 2048
                records += titans(T)  # beside our l2 rows, so that both see the same load on a shared machine
            for impl, fn in impls:
                if impl == "reference" and T > min(seq_lens):
                    continue  # the token-by-token oracle: one length is enough to show the gap
                for mode in ("fwd", "fwd+bwd"):
                    args, kw = op_inputs(T, retention, mode == "fwd+bwd", device, shape)
                    kw = kw if objective == "huber" else {}
                    call = dict(objective=objective, retention=retention, chunk_size=b, **kw)

                    def run():
                        y, _ = fn(*args, **call)
                        if mode == "fwd+bwd":
                            y.square().sum().backward()
                    sync(device)
                    t0 = time.perf_counter()
                    run()  # the first call (compiles, for "compiled") is timed on its own
                    sync(device)
                    first_s = time.perf_counter() - t0
                    sec = first_s if impl == "reference" else timed(run, device, cfg.repeats, max(0, cfg.warmup - 1))
                    fl = flops_tok * shape["B"] * T * (3 if mode == "fwd+bwd" else 1)
                    rec = dict(kind="op", impl=impl, model=model, objective=objective, retention=retention,
                               seq_len=T, mode=mode, tokens_per_s=shape["B"] * T / sec,
                               gflops=fl / sec / 1e9, pct_of_gemm=100 * fl / sec / 1e9 / peak, first_call_s=first_s,
                               device=device,
                               compile=impl == "compiled", dtype="float32", **shape)
                    if cfg.profile and impl != "reference":  # per chunk: what a GPU launches (or replays) per chunk
                        p = rec["profile"] = profile_call(run, device)
                        chunks = -(-T // b)
                        p["host_ops_per_chunk"] = p["host_ops"] / chunks
                        if "kernels" in p:
                            p["kernels_per_chunk"] = p["kernels"] / chunks
                    records.append(rec)
                    per_chunk = "".join(f", {rec['profile'][k]:.0f} {what} per chunk" for k, what in
                                        (("host_ops_per_chunk", "host ops"), ("kernels_per_chunk", "kernels"))
                                        if k in rec.get("profile", {}))
                    print(f"{impl:>9} {retention:>2}/{objective:<5} T={T:<6} {mode:<8} {rec['tokens_per_s']:>10.0f} tok/s "
                          f"{rec['gflops']:>7.1f} GFLOP/s ({rec['pct_of_gemm']:.0f}% of GEMM{per_chunk})")
    return records, dict(gemm_gflops=peak)


def titans_memory(device="cpu", shape=OP_SHAPE):
    """titans-pytorch's NeuralMemory at our op's shape: H heads of width d (dim_head=d; its default is the full
    model width, H*d per head), chunk b, and the same memory model: a 2-layer MLP d -> E*d -> d per head
    (its default MemoryMLP, depth 2, expansion_factor 4.0, passed explicitly) inside a LayerNorm + residual
    (its default ResidualNorm; gamma [H, d]), as ours. Checked on the memory weights' shapes."""
    from titans_pytorch import NeuralMemory
    H, d, E, b = shape["H"], shape["d"], shape["E"], shape["chunk"]
    mem = NeuralMemory(dim=H * d, dim_head=d, heads=H, chunk_size=b,
                       default_model_kwargs=dict(depth=2, expansion_factor=float(E)))
    shapes = [tuple(s) for s in mem.init_weight_shape]
    if shapes != [(H, d), (H, d, E * d), (H, E * d, d)]:  # norm gamma, W1, W2
        raise RuntimeError(f"titans-pytorch memory weights {shapes} do not match our op's (H={H}, d={d}, E={E})")
    return mem.to(device)


def titans_baseline(cfg):
    """A function T -> records timing titans_memory at length T (fwd, fwd+bwd); None without titans-pytorch."""
    shape = op_shape(cfg)
    try:
        from importlib.metadata import version
        mem = titans_memory(cfg.device, shape)
    except ImportError:
        print("titans-pytorch not installed (pip install titans-pytorch): comparison skipped")
        return None
    B, H, d, E, b = (shape[k] for k in ("B", "H", "d", "E", "chunk"))
    desc = f"NeuralMemory(dim={H * d}, dim_head={d}, heads={H}, chunk_size={b}, depth=2, expansion_factor={E})"

    def measure(T):
        records = []
        for mode in ("fwd", "fwd+bwd"):
            x = torch.randn(B, T, H * d, device=cfg.device, requires_grad=mode == "fwd+bwd")

            def run():
                y, _ = mem(x)
                if mode == "fwd+bwd":
                    y.square().sum().backward()
            sec = timed(run, cfg.device, cfg.repeats, cfg.warmup)
            records.append(dict(kind="op", impl="titans-pytorch", model="titans-NeuralMemory", seq_len=T, mode=mode,
                                tokens_per_s=B * T / sec, device=cfg.device, compile=False, dtype="float32",
                                titans_pytorch=version("titans-pytorch"), titans_module=desc,
                                memory_weight_shapes=[list(s) for s in mem.init_weight_shape]))
            print(f"titans-pytorch {desc} T={T:<6} {mode:<8} {B * T / sec:>10.0f} tok/s")
        return records
    return measure


# ----------------------------------------------------------------------------------------------

def cpu_name(cpuinfo="/proc/cpuinfo"):
    """The CPU's model name where the OS says it (Linux's cpuinfo), else what platform knows (on Linux only the
    architecture, "x86_64"): the ratios between models move with the machine (README, "Another CPU: an Intel Xeon
    with AVX-512"; results/bench/HISTORY.md, "On a second CPU")."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(cfg):
    cuda = cfg.device.startswith("cuda")
    dev = torch.cuda.get_device_name(cfg.device) if cuda else cpu_name()
    # cpu_capability: the vector instructions ATen's CPU kernels and Inductor's generated C++ use (AVX2, AVX512,
    # ...), which set this CPU's GEMM and elementwise rates; on CUDA, the host's
    info = dict(device_name=dev, cpu_capability=torch.backends.cpu.get_cpu_capability(), torch=torch.__version__,
                threads=torch.get_num_threads(), compile=cfg.compile,
                compile_mode=cfg.compile_mode, dtype=cfg.dtype, python=platform.python_version(),
                peak_mem_measure="cuda max_memory_allocated" if cuda
                else "worker peak RSS above its size at its start (ru_maxrss delta)",
                peak_heap_measure=None if cuda else "glibc heap bytes in use, sampled over one more round, above the "
                "worker's start (peak_heap_bytes)" if _MALLINFO2 is not None else "none (no glibc mallinfo2 here)",
                workers=worker_start_method(cfg.device))
    print(" | ".join(f"{k}={v}" for k, v in info.items()))
    return info


def _cells(cfg):
    """(names, seq_lens, mode) per worker: one model and length each, every model at once under --interleave,
    and every length too under --interleave_lengths."""
    names, lens, modes = cfg.models.split(","), [int(s) for s in cfg.seq_lens.split(",")], cfg.modes.split(",")
    name_groups = [names] if cfg.interleave else [[name] for name in names]
    len_groups = [lens] if cfg.interleave_lengths else [[n] for n in lens]
    return [(group, ns, mode) for group in name_groups for ns in len_groups for mode in modes]


def run_models(cfg):
    records = []
    for names, seq_lens, mode in _cells(cfg):
        if cfg.interleave:  # one worker for all: its peak belongs to no single model
            outs, _ = in_worker(functools.partial(bench_interleaved, cfg, names, seq_lens, mode), cfg)
            failed = "oom" in outs or "error" in outs
            cells = [(name, n, outs if failed else outs[name, n], None) for n in seq_lens for name in names]
        else:
            out, peak = in_worker(functools.partial(bench_model, cfg, names[0], seq_lens[0], mode), cfg)
            cells = [(names[0], seq_lens[0], out, peak)]
        for name, seq_len, out, peak in cells:
            rec = dict(kind="model", model=name, seq_len=seq_len, mode=mode, device=cfg.device,
                       compile=cfg.compile, compile_mode=cfg.compile_mode, dtype=cfg.dtype,
                       model_preset=cfg.model_preset, model_args=model_args(cfg, name), vocab_size=cfg.vocab_size,
                       tokens_per_s=None, peak_mem_bytes=peak)
            rec.update(out)
            records.append(rec)
            if "oom" in out or "error" in out:
                print(f"{name:>12} {seq_len:>6} {mode:<8} {'OOM' if 'oom' in out else 'ERROR'}: "
                      f"{out.get('oom') or out.get('error')}")
            else:
                extra = f" {out['ms_per_token']:.2f} ms/token" if mode == "decode" else f" batch {out['batch_size']}"
                mem = "   (shared)" if cfg.interleave else f"{(peak or 0) / 2**20:>8.1f} MiB"
                if out.get("peak_heap_bytes") is not None:
                    mem += f" (heap {out['peak_heap_bytes'] / 2**20:.1f} MiB)"
                parts = out.get("profile", {}).get("breakdown")
                if parts:  # the profiled call's self time by kind of work (a CPU run with --profile), in ms
                    extra += " | profiled: " + ", ".join(f"{k[:-2]} {1e3 * v:.3f} ms" for k, v in parts.items())
                print(f"{name:>12} {seq_len:>6} {mode:<8} {out['tokens_per_s']:>10.0f} tok/s {mem}{extra}")
    return records


def plot(records, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install matplotlib): no plot, the JSON is written")
        return
    modes = sorted({r["mode"] for r in records})
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for name in sorted({r["model"] for r in records}):
            pts = sorted((r["seq_len"], r["tokens_per_s"]) for r in records
                         if r["mode"] == mode and r["model"] == name and r.get("tokens_per_s"))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="tokens/s", title=mode)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def crossover(records):
    """Shortest length at which each Miras model trains faster than the Transformer."""
    out = {}
    tr = {r["seq_len"]: r["tokens_per_s"] for r in records if r["model"] == "transformer" and r["mode"] == "train"
          and r.get("tokens_per_s")}
    for name in {r["model"] for r in records} - {"transformer"}:
        faster = sorted(r["seq_len"] for r in records if r["model"] == name and r["mode"] == "train"
                        and r.get("tokens_per_s") and r["seq_len"] in tr and r["tokens_per_s"] > tr[r["seq_len"]])
        out[name] = faster[0] if faster else None
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if cli.wants_help(argv):
        print(cli.help_text(__doc__, BenchConfig(**PRESETS["cpu"]),
                            "Keys and their defaults (the cpu preset's where it sets them):"))
        return 0
    try:
        cfg = parse_args(argv)
    except BenchError as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        return 2
    info = header(cfg)
    if cfg.op:
        records, extra = run_op(cfg)
        info.update(extra)
    else:
        records = run_models(cfg)
        info["train_crossover_vs_transformer"] = crossover(records)
        print(f"train crossover vs transformer (shortest length where faster): {info['train_crossover_vs_transformer']}")
    os.makedirs(os.path.dirname(os.path.abspath(cfg.json)), exist_ok=True)
    save_json(dict(info=info, config=asdict(cfg), records=records), cfg.json)
    print(f"json: {cfg.json}")
    if not cfg.op:
        plot(records, cfg.plot or os.path.splitext(cfg.json)[0] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
