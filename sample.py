"""Sample from a model trained with train.py, streaming the text as it is generated.

    python sample.py                                          # the main job's checkpoint (out/), 3 samples
    python sample.py --out_dir=out --start="ROMEO:" --num_samples=1 --max_new_tokens=2000
    python sample.py --start=FILE:prompt.txt --temperature=0 # greedy
    python sample.py --device=cuda --compile=True            # a compiled decode step with static shapes

Configuration: the SampleConfig defaults below, then `--key=value` overrides (cli.parse, as train.py and
bench.py: an unknown key or a value of the wrong type is a one-line error listing the valid keys; --help).

How it generates: the prompt is encoded with the dataset's tokenizer (tokenizer.get_tokenizer on the
checkpoint's dataset meta: GPT-2 BPE or characters), run through the model's parallel chunked path once
(model.prefill), then decoded one token at a time with the recurrent state (model.forward_step): an O(1)
state per Miras layer (short-conv tail + fast weights), a KV cache per attention layer (a ring buffer of
`window` slots for sliding-window layers). Miras models therefore decode far past their training context at
constant memory and constant time per token. A model with full-attention layers (the Transformer baseline)
keeps attending to every earlier token: its KV cache is preallocated for prompt + max_new_tokens, so memory
and time per token grow with the length, and positions past block_size were never trained (RoPE extrapolates;
quality usually degrades). sample.py prints one line saying so for such models.

Sampling: logits / temperature, then top-k, then top-p (nucleus) filtering, then a draw from a torch
Generator seeded with --seed (the same seed, checkpoint, device and dtype give the same text). Greedy
decoding is the argmax of the logits (the lowest id on ties), without the RNG: --temperature=0 or --top_k=1.
Ids of the model's padded vocabulary beyond the tokenizer's (GPT-2: 50257..50303) are never produced.
Tokens stream to stdout as they come, decoded incrementally (a BPE token holding part of a multi-byte
character is printed once the character is complete); everything else (checkpoint, notes, speed) goes to
stderr, so `python sample.py > samples.txt` keeps only the samples.

Library use (tests, notebooks): load_model(out_dir, ckpt, device, dtype) -> Loaded; encode_prompt(tok, start);
generate_stream(model, prompt_ids, max_new_tokens, ...) yields token ids; state_bytes(cache).
"""
import codecs
import contextlib
import pathlib
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list  # a compiled step's graphs

import cli
import memory_core
import models
import train
from model_common import AttnCache, MirasCache, Sampling, call_block, is_greedy, iter_tensors, state_bytes
from tokenizer import TokenizerError, get_tokenizer

# ----------------------------------------------------------------------------------------------
# Configuration

# `python train.py && python sample.py`: sample where the main job (train.py without a config file) writes
MAIN_OUT_DIR = cli.load_config_file(train.MAIN_JOB).get("out_dir", train.TrainConfig.out_dir)


@dataclass
class SampleConfig:
    out_dir: str = MAIN_OUT_DIR    # where train.py wrote ckpt.pt / ckpt_best.pt (default: the main job's, "out")
    ckpt: str = "auto"             # auto (best if present, else latest) | best (ckpt_best.pt) | latest (ckpt.pt)
    start: str = "\n"              # the prompt, or FILE:path; "" starts from <|endoftext|> (GPT-2 datasets only)
    num_samples: int = 3
    max_new_tokens: int = 500
    temperature: float = 0.8       # 0: greedy (argmax)
    top_k: int = 200               # keep the k most likely tokens; 0: off; 1: greedy
    top_p: float = 1.0             # nucleus: the smallest set of tokens with probability >= top_p; 1.0: off
    seed: int = 1337
    device: str = "auto"           # auto (cuda if available, else cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"            # auto (bfloat16 on CUDA if supported, else float32) | float32 | bfloat16 | float16 | float64
    compile: Optional[bool] = None  # torch.compile the decode step (static shapes: graphs for every position);
                                   # None: on CUDA when the run generates enough tokens to pay (resolve_compile)
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead | max-autotune |
                                   # max-autotune-no-cudagraphs (the middle two capture CUDA graphs: CUDA only)
    compile_regions: Optional[bool] = None  # the compiled step traces and compiles a Miras block once and calls it
                                   # for every layer, so its compile time does not grow with the depth (make_step);
                                   # None: on CUDA (on a CPU the step's C++ wrapper, faster per token, cannot)


class SampleError(cli.ConfigError):
    """A user-facing problem (missing checkpoint, unknown model, bad prompt, bad option): main() prints it as
    one line and exits non-zero."""


DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


def parse_args(argv=None):
    """A SampleConfig from `--key=value` arguments (cli.parse; later ones win)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, _ = cli.parse(SampleConfig, argv, "sample.py", error=SampleError)
    validate(cfg)
    return cfg


def validate(cfg):
    checks = [
        (cfg.ckpt in ("auto", "best", "latest"), f"ckpt must be auto, best or latest, got {cfg.ckpt!r}"),
        (cfg.num_samples >= 1, "num_samples must be >= 1"),
        (cfg.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
        (cfg.temperature >= 0, "temperature must be >= 0 (0: greedy)"),
        (cfg.top_k >= 0, "top_k must be >= 0 (0: off)"),
        (0 < cfg.top_p <= 1, "top_p must lie in (0, 1] (1: off)"),
        (cfg.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}"),
        cli.known_compile_mode(cfg.compile_mode),
    ]
    for ok, msg in checks:
        if not ok:
            raise SampleError(msg)


# ----------------------------------------------------------------------------------------------
# Checkpoint, device, prompt


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    model_name: str
    config: object      # the model config (models.make_config)
    path: pathlib.Path  # the checkpoint file
    iter_num: int
    meta: dict          # the dataset's meta.json as saved in the checkpoint


def find_checkpoint(out_dir, ckpt="auto"):
    out = pathlib.Path(out_dir)
    best, latest = out / "ckpt_best.pt", out / "ckpt.pt"
    order = {"auto": [best, latest], "best": [best], "latest": [latest]}[ckpt]
    for path in order:
        if path.is_file():
            return path
    names = " or ".join(p.name for p in order)
    raise SampleError(f"no checkpoint in {out}: {names} not found (train one first: "
                      f"python train.py --out_dir={out_dir})")


def load_model(out_dir=SampleConfig.out_dir, ckpt="auto", device="cpu", dtype="float32"):
    """The model of a train.py checkpoint, rebuilt from its saved config, in eval mode on `device`
    (float64 weights for dtype float64, else float32 weights; half precisions run under cli.autocast_for)."""
    path = find_checkpoint(out_dir, ckpt)
    device = cli.resolve_device(device, SampleError) if isinstance(device, str) else device
    dtype = cli.resolve_dtype(dtype, device, SampleError)
    try:
        obj = train.load_checkpoint(path, map_location="cpu")
    except train.ConfigError as e:
        raise SampleError(str(e)) from None
    except Exception as e:  # a truncated or foreign file
        raise SampleError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict) or not {"model", "model_name", "model_config"} <= set(obj):
        raise SampleError(f"{path} is not a train.py checkpoint (needs model, model_name, model_config)")
    name = obj["model_name"]
    if name not in models.MODELS:
        raise SampleError(f"checkpoint {path} holds an unknown model {name!r}; known models: "
                          f"{', '.join(models.MODELS)}")
    try:
        config = models.config_from_dict(name, obj["model_config"])
        model = models.MODELS[name][1](config)
        model.load_state_dict(obj["model"])
    except (ValueError, TypeError, RuntimeError) as e:
        raise SampleError(f"checkpoint {path}: cannot rebuild the {name!r} model from its saved config: "
                          f"{str(e).splitlines()[0]}") from None
    meta = (obj.get("dataset") or {}).get("meta")
    if not meta:
        raise SampleError(f"checkpoint {path} has no dataset meta: cannot tell its tokenizer")
    try:
        tok = get_tokenizer(meta)
    except (TokenizerError, ImportError, FileNotFoundError) as e:
        raise SampleError(f"checkpoint {path}: {e}") from None
    if tok.vocab_size > config.vocab_size:
        raise SampleError(f"checkpoint {path}: the tokenizer has {tok.vocab_size} tokens, the model only "
                          f"{config.vocab_size}")
    model = model.to(device=device, dtype=torch.float64 if dtype == "float64" else torch.float32).eval()
    return Loaded(model, tok, name, config, path, int(obj.get("iter_num", 0)), meta)


def read_start(start):
    """The prompt text of --start: the string itself, or a file's content for FILE:path."""
    if start.startswith("FILE:"):
        path = pathlib.Path(start[5:]).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SampleError(f"cannot read the prompt file {path}: {e}") from None
    return start


def encode_prompt(tok, text):
    """Prompt ids. An empty prompt starts from the end-of-text token; a character-level tokenizer has none,
    so it needs a non-empty prompt."""
    if text == "":
        if tok.eot is None:
            raise SampleError("empty prompt: a character-level dataset has no end-of-text token to start from; "
                              "pass --start=TEXT or --start=FILE:path")
        return [tok.eot]
    try:
        return tok.encode(text)
    except TokenizerError as e:
        raise SampleError(f"prompt: {e}") from None


# ----------------------------------------------------------------------------------------------
# Sampling and the decoding loop


def _state_slots(cache):
    """(owner, attribute) of every piece of decode state a step rebinds: the position and, per Miras layer, the
    short-conv tail and the MemoryState (attention layers write their preallocated KV caches in place)."""
    slots = [(cache, "pos")]
    for layer in cache.layers:
        if isinstance(layer, MirasCache):
            slots += [(layer, "conv"), (layer, "mem")]
    return slots


def _state_values(cache):
    return [getattr(owner, name) for owner, name in _state_slots(cache)]


def _state_tensors(cache):
    return [t for value in _state_values(cache) for t in iter_tensors(value)]


def _fresh(t):
    """A copy of t in its own row-major storage (the strides of its shape, size-1 dims included: torch.compile
    guards on every stride)."""
    return t.clone(memory_format=torch.contiguous_format)


def _own_buffers(cache):
    """Give the cache's decode state its own buffers, written in place by the compiled step from then on: every
    tensor copied once into storage that aliases nothing (not a parameter, which a memory state that never saw
    a token views; not another state tensor, as kl's lag step leaves weights and anchor one tensor; not the
    rest of a prefill output), and the chunk position a tensor so that one graph serves every position."""
    for layer in cache.layers:
        if isinstance(layer, MirasCache):
            mem = layer.mem
            layer.conv = _fresh(layer.conv)
            layer.mem = mem._replace(**{f: tuple(map(_fresh, getattr(mem, f)))
                                        for f in ("weights", "anchor", "norm", "momentum", "grad_sum")},
                                     pos=torch.tensor(int(mem.pos), dtype=torch.long, device=cache.pos.device))
    cache.pos = _fresh(cache.pos)
    return cache


def _chunk_pos(cache):
    """The position inside the chunk of the cache's Miras layers (all alike; 0 without any), read once."""
    for layer in cache.layers:
        if isinstance(layer, MirasCache):
            return int(layer.mem.pos)
    return 0


def _write_back(before):
    """After a step: copy the new state into the buffers it replaces and put the buffers back, so the cache
    holds the same tensors at every step (gpt-fast's static decode state: what a CUDA graph replays over).
    Every new tensor is taken (cloned; in a compiled graph a clone of an intermediate costs nothing) before any
    buffer is written: a new state may hold an old buffer itself (l2's anchor, refreshed at a chunk's first
    token to the weights the token started from). A tensor the step returned as it was (the buffer itself: an
    anchor inside its chunk) is neither cloned nor copied.
    Returns the copies of the new anchors, for a compiled step to return as outputs: Inductor drops a copy of a
    graph input that the graph overwrites later unless the copy is an output (pytorch/pytorch#198131, open in
    torch 2.11-2.14), and then wrote the new weights into a refreshed l2 anchor as well (tests/test_sample.py)."""
    new, anchors = [], []
    for owner, name, old in before:
        value = getattr(owner, name)
        fresh_anchor = getattr(value, "anchor", ())
        new.append([])
        for t, buf in zip(iter_tensors(value), iter_tensors(old)):
            new[-1].append(None if t is buf else t.clone())
            if new[-1][-1] is not None and any(t is a for a in fresh_anchor):
                anchors.append(new[-1][-1])
    for (owner, name, old), values in zip(before, new):
        for buf, value in zip(iter_tensors(old), values):
            if value is not None:
                buf.copy_(value)
        setattr(owner, name, old)
    return anchors


# Inductor's C++ wrapper makes every intermediate buffer of a graph a tensor (from one pooled allocation with
# memory planning) and frees it after the call: a CPU decode step of a Miras model holds ~200 (per-head norms, gates,
# step sizes), and making and freeing them was a large part of a small model's step (README, "Sampling"). Its
# ArrayRef variant, AOTInductor's, declares them as arrays on the wrapper's stack instead when they fit in
# STACK_ALLOCATION_BYTES (Inductor's own limit, 100 KB, is below one step of the tiny Memora); a graph over it
# allocates each buffer on the heap. Memory planning stays off: it would turn stack allocation off (and its pool
# tree recursed past Python's C limit from ~12 Miras layers).
STACK_ALLOCATION_BYTES = 1 << 20


def _stack_allocating_codegen():
    """(Inductor's CPU codegen registration, AOTInductor's stack-allocating C++ wrapper class, its module), or a
    one-line SampleError on a torch without them."""
    try:
        from torch._inductor.codegen import common, cpp_wrapper_cpu_array_ref
        common.init_backend_registration()
        return common.device_codegens["cpu"], cpp_wrapper_cpu_array_ref.CppWrapperCpuArrayRef, cpp_wrapper_cpu_array_ref
    except (ImportError, AttributeError, KeyError) as e:
        raise SampleError(f"torch {torch.__version__}'s Inductor has no stack-allocating C++ wrapper as 2.13's ({e}): "
                          "install requirements.txt's torch, or decode on a CPU without compiling") from e


@contextlib.contextmanager
def stack_allocating_wrapper():
    """Inductor's CPU C++ wrapper is the stack-allocating one, with STACK_ALLOCATION_BYTES as its limit, inside the
    block only: around the calls that may compile a decode step, so that other graphs the process compiles with
    cpp_wrapper (a user's own) keep Inductor's plain wrapper."""
    registration, array_ref_wrapper, module = _stack_allocating_codegen()
    before = registration.cpp_wrapper_codegen, module.MAX_STACK_ALLOCATION_SIZE
    registration.cpp_wrapper_codegen, module.MAX_STACK_ALLOCATION_SIZE = array_ref_wrapper, STACK_ALLOCATION_BYTES
    try:
        yield
    finally:
        registration.cpp_wrapper_codegen, module.MAX_STACK_ALLOCATION_SIZE = before


def decode_compile_options(model, backend="inductor", mode=None, regions=False):
    """Inductor's options for make_step's compiled step (None: torch.compile's defaults); regions: the step calls
    block regions, which Inductor's C++ wrapper cannot (torch 2.13), so it keeps the Python one."""
    # the inputs of a call whose guards are skipped are the buffers and shapes its guarded call checked, so
    # Inductor's assert of every input's size and stride on every call (~80 inputs for a Miras cache) is skipped
    # too (an Inductor option, not settable beside a mode)
    options = {"size_asserts": False} if backend == "inductor" and mode is None else None
    if options is not None and model.lm_head.weight.device.type == "cpu":
        # a batch-1 step's per-head products are matrix-vector products, which Inductor's CPU lowering turns into
        # a broadcast multiply and a sum that inlines its inputs: the memory MLP's hidden gelu (erf) was then
        # recomputed once per output row (32x at head dim 32). Realizing every multi-use pointwise result of more
        # than 8 ops stores such inputs once; the step time is not monotone in this threshold, and 8 was the
        # fastest of those measured for every Miras model (results/bench/HISTORY.md, decode)
        options["realize_opcount_threshold"] = 8
        # and the dense layers' one-row matmuls (x W^T of the projections, MLPs, gates and head) become reductions
        # fused with their neighbours instead of ~20 separate BLAS calls per token
        options["post_grad_fusion_options"] = {"decompose_mm_pass": {}}
        if regions:
            return options
        # the step is then a few fused kernels over ~80 state buffers, and the generated Python wrapper that
        # passes them (pointer by pointer, with its output allocations) cost about as much as the kernels: a C++
        # wrapper, compiled once per graph (results/bench/HISTORY.md, decode), which keeps the kernels'
        # intermediate buffers on its stack (stack_allocating_wrapper, around make_step's compiling calls)
        options["cpp_wrapper"] = True
        options["aot_inductor.allow_stack_allocation"] = True
        options["memory_planning"] = False
        # the limit is a module constant, not an option: as (otherwise unused) metadata it enters the key of
        # Inductor's cache, which would otherwise serve a graph compiled under another limit
        options["aot_inductor.metadata"] = {"stack_allocation_bytes": str(STACK_ALLOCATION_BYTES)}
    return options


def _miras_block_in_place(block, x, rope, pos, conv, mem, chunk_start):
    """One Miras block's decoding step that writes its new state (short-conv tail, MemoryState) into the buffers
    it was given, as the compiled step does for the whole cache (_write_back), on a cache of its own: the block
    region of make_step's step (torch.compiler.nested_compile_region), which must not rebind the caller's
    objects. Returns (x, the copies of the new anchors: outputs, see _write_back)."""
    layer = MirasCache()
    layer.conv, layer.mem, layer.chunk_start = conv, mem, chunk_start
    before = [(layer, "conv", conv), (layer, "mem", mem)]
    x = call_block(block, x, rope, layer, pos)
    return x, _write_back(before)


def _block_runner(region, anchors):
    """forward_step's run_block inside a compiled step that compiles by regions: a Miras block runs as `region`
    (_miras_block_in_place as a nested compile region: Dynamo traces it once per kind of step and Inductor
    compiles it once; every layer calls it), an attention block inline (it writes its KV cache in place itself).
    The regions' anchor copies go to `anchors`."""
    def run(block, x, rope, layer, pos):
        if not isinstance(layer, MirasCache):
            return call_block(block, x, rope, layer, pos)
        x, fresh = region(block, x, rope, pos, layer.conv, layer.mem, layer.chunk_start)
        anchors.extend(fresh)
        return x
    return run


def make_step(model, autocast=None, compile=False, compile_mode="default", sampling=Sampling(temperature=0.0),
              backend="inductor", regions=None):
    """step(idx [B, 1], cache, noise=None) -> (next ids [B, 1], last logits [B, V] float32): one decoding step and
    the draw of the token after it (sampling.pick; noise from sampling.noise, None when greedy), the cache
    updated in place. Compiled on request as static-shape graphs, the draw included (gpt-fast style), which
    serve every position: one, and for a Miras model a second for a chunk's first token, per cache geometry
    (the shapes of its state and KV caches: any number of them); the first calls compile. The compiled step
    owns the cache's state buffers (copied once per cache) and writes every new state into them, so the
    CUDA-graph modes can replay it; it evaluates torch.compile's guards once per cache and graph: the next
    steps on the same cache, with the same input shapes and buffers, skip them.
    regions (compiled steps): trace and compile a Miras block once as a region of the step's graph
    (torch.compiler.nested_compile_region) and call it for every layer, so that the compile time does not grow with
    the depth, as that of a graph unrolling every block does; None: on CUDA (on a CPU the step's C++ wrapper, which
    cannot call regions in torch 2.13, is faster per token). The step's attributes `sampling` and `regions` say
    how it draws and how it was compiled."""
    device = model.lm_head.weight.device
    cli.check_compile_mode(compile_mode, compile, device, SampleError)
    autocast = autocast or contextlib.nullcontext()
    regions = (compile and device.type == "cuda") if regions is None else regions
    if regions and not compile:
        raise SampleError("regions=True compiles the step by block regions: it needs compile=True")
    if regions and not hasattr(torch.compiler, "nested_compile_region"):
        raise SampleError(f"torch {torch.__version__} has no torch.compiler.nested_compile_region: install "
                          "requirements.txt's torch, or compile the step whole (regions=False)")
    # made here: Dynamo does not trace the wrapping itself
    region = torch.compiler.nested_compile_region(_miras_block_in_place) if regions else None

    def step(idx, cache, noise=None, run_block=None):
        with autocast:
            logits = model.forward_step(idx, cache, run_block)[0][:, -1].float()
        return sampling.pick(logits, noise), logits

    if not compile:
        step.sampling, step.regions = sampling, False
        return step
    graphs = compile_mode in cli.CUDA_GRAPH_MODES

    def step_in_place(idx, cache, noise=None):
        before = [(owner, name, getattr(owner, name)) for owner, name in _state_slots(cache)]
        anchors = []  # the regions' (they write their layers' state in place, so _write_back copies none of it)
        out = step(idx, cache, noise, _block_runner(region, anchors) if regions else None)
        return out, _write_back(before) + anchors  # the anchors' copies: outputs, so that Inductor keeps them

    mode = cli.torch_compile_mode(compile_mode)
    # one compiled copy of step_in_place, with its own code object, per (chunk start or not, decode-state
    # geometry): a Miras chunk's first token (anchor refresh, kl's exact step) and its other tokens, which skip
    # that work (MirasCache.chunk_start, set on the host around the call), each hold one graph; and
    # torch.compile's recompile limit (8 graphs per code object) would otherwise make the ninth cache of a new
    # shape (a KV cache of another length, another batch size) a hard error in a process that decodes many prompts
    compiled = {}

    options = decode_compile_options(model, backend, mode, regions)
    on_stack = options is not None and options.get("aot_inductor.allow_stack_allocation", False)
    if on_stack:
        _stack_allocating_codegen()  # a torch without it fails here, not at the first token

    def compiled_for(start, geometry):
        """(the compiled step, its code object: dynamo's cache of its graphs is keyed by it)"""
        if (start, geometry) not in compiled:
            fn = memory_core.with_own_code(step_in_place, f"{'start' if start else 'rest'}_{len(compiled)}")
            compiled[start, geometry] = (torch.compile(fn, fullgraph=True, dynamic=False, backend=backend, mode=mode,
                                                       options=options), fn.__code__)
        return compiled[start, geometry]
    chunk_size = model.config.chunk_size if "M" in model.config.layers else None  # Miras layers' chunk
    checked = {}  # a weak reference to the cache, its chunk position and geometry, the signatures guarded
    mark = object()  # this step's mark on the caches whose state it owns (Cache.decode_owner)

    def compiled_step(idx, cache, noise=None):
        state = _state_values(cache)
        if any(s is None for s in state):
            # an empty cache (no prefill) has no state to write in place yet: its first token runs eagerly and
            # creates it (the same operations; a graph traced for an empty cache would be wrong at every later step)
            return step(idx, cache, noise)
        # the state objects (MemoryStates, immutable, and tensors) are the ones this step wrote last: an eager
        # step, a prefill or another step's ownership rebinds them
        ref, owned = checked.get("cache"), cache.decode_owner
        same_buffers = (ref is not None and ref() is cache and owned is not None and owned[0] is mark
                        and all(a is b for a, b in zip(owned[1], state, strict=True)))
        if not same_buffers:  # a new cache, or one rebound since
            checked.clear()
            buffers = _state_tensors(_own_buffers(cache))
            cache.decode_owner = (mark, _state_values(cache))
            kv = [t for layer in cache.layers if isinstance(layer, AttnCache) for t in (layer.k, layer.v)]
            checked.update(cache=weakref.ref(cache), guarded=set(), chunk_pos=_chunk_pos(cache),  # one host read
                           geometry=tuple((t.shape, t.dtype, t.device) for t in buffers + kv))
            if graphs:  # the replay reads and writes these addresses (a new cache re-records the graph)
                for t in buffers + kv:
                    torch._dynamo.mark_static_address(t, guard=False)
        idx, noise = memory_core.row_major(idx), None if noise is None else memory_core.row_major(noise)
        start = checked["chunk_pos"] == 0 if chunk_size else False
        fn, code = compiled_for(start, checked["geometry"])
        if not _debug_get_cache_entry_list(code):  # no graph (yet, or torch._dynamo.reset() dropped them): the
            checked["guarded"].clear()             # next calls compile, under guards, not a stance that forbids it
        # guards are most of a small model's compiled decode overhead (a Miras cache is ~80 tensors and ~500
        # guards: ~0.6 ms per token on a CPU). After one guarded call, the same cache with the same buffers and
        # shapes selects the same graph (static shapes, the position a tensor), so the next calls skip them
        sig = (start, tuple(idx.shape), idx.dtype, idx.device, noise is None, model.training, torch.is_grad_enabled())
        cli.cuda_graph_step_begin(compile_mode)
        layers = [layer for layer in cache.layers if isinstance(layer, MirasCache)]
        for layer in layers:
            layer.chunk_start = start
        try:
            if sig in checked["guarded"]:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    out, _ = fn(idx, cache, noise)
            else:  # a call that may compile
                with stack_allocating_wrapper() if on_stack else contextlib.nullcontext():
                    out, _ = fn(idx, cache, noise)
                checked["guarded"].add(sig)
        finally:  # an eager step reads the position from the state
            for layer in layers:
                layer.chunk_start = None
        if chunk_size:
            checked["chunk_pos"] = (checked["chunk_pos"] + 1) % chunk_size
        # a CUDA graph's outputs live in its memory pool, overwritten by the next replay
        return tuple(t.clone() for t in out) if graphs else out

    compiled_step.compiled, compiled_step.sampling, compiled_step.regions = True, sampling, regions
    return compiled_step


@dataclass
class Stats:
    """Live numbers of one generate_stream run (read them while iterating, or after)."""
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    new_tokens: int = 0
    decode_steps: int = 0   # forward_step calls (one less than new_tokens: the last token needs none)
    decode_s: float = 0.0
    cache: object = None    # the live cache (state_bytes(stats.cache) at any point)

    @property
    def prefill_tokens_per_s(self):
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self):
        return self.new_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_stream(model, prompt_ids, max_new_tokens, temperature=0.8, top_k=200, top_p=1.0, generator=None,
                    step=None, autocast=None, vocab_limit=None, stats=None, cache_len=None):
    """Yield max_new_tokens token ids (ints), one at a time as they are generated, for one sequence: the
    prompt (a list of ids) is prefilled with model.prefill, then every token is decoded and drawn by `step`
    (make_step's, made with the same sampling settings; by default an eager one). `stats` (a Stats) is filled in
    as it goes. The cache holds cache_len tokens (default: prompt + max_new_tokens; it sizes full-attention KV
    caches, so a compiled step sees one shape)."""
    stats = stats if stats is not None else Stats()
    autocast = autocast or contextlib.nullcontext()
    sampling = Sampling(temperature, top_k, top_p, vocab_limit)
    step = step or make_step(model, autocast, sampling=sampling)
    if not step.sampling.draws_like(sampling):
        raise SampleError(f"the decode step draws with {step.sampling}, not {sampling}: make it with "
                          "make_step(..., sampling=) of the same settings")
    device = model.lm_head.weight.device
    if not prompt_ids:
        raise SampleError("the prompt has no tokens")
    idx = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    cache = model.init_cache(1, cache_len or idx.shape[1] + max(max_new_tokens, 1), device,
                             cli.kv_cache_dtype(autocast))
    stats.cache, stats.prompt_tokens = cache, idx.shape[1]
    _sync(device)
    t0 = time.perf_counter()
    with autocast:
        logits = model.prefill(idx, cache)[0][:, -1].float()
    nxt = sampling.pick(logits, sampling.noise(logits.shape, device, generator))
    _sync(device)
    stats.prefill_s = time.perf_counter() - t0
    for i in range(max_new_tokens):
        t0 = time.perf_counter()
        token = int(nxt.item())  # syncs
        if i < max_new_tokens - 1:
            nxt, _ = step(nxt, cache, sampling.noise(logits.shape, device, generator))
            stats.decode_steps += 1
        _sync(device)
        stats.decode_s += time.perf_counter() - t0
        stats.new_tokens += 1
        yield token


class TextStream:
    """Incremental detokenizer: push(token) -> the text that is complete so far. GPT-2 tokens are byte
    strings that may split a UTF-8 character; their bytes go through an incremental UTF-8 decoder."""

    def __init__(self, tok):
        enc = getattr(tok, "enc", None)
        self._bytes = getattr(enc, "decode_single_token_bytes", None)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.tok = tok

    def push(self, token):
        if self._bytes is None:
            return self.tok.decode([token])
        return self._utf8.decode(self._bytes(token))

    def flush(self):
        return self._utf8.decode(b"", final=True) if self._bytes is not None else ""


def length_note(loaded, total_len):
    """The one line printed about what the model does past its training context (block_size)."""
    cfg = loaded.config
    layers = cfg.layers
    T = cfg.block_size
    if "A" in layers:
        past = (f"this run reaches {total_len} tokens, past it" if total_len > T
                else f"this run stays within it ({total_len} tokens)")
        return (f"note: {loaded.model_name} has full-attention layers and was trained at context {T} ({past}): it "
                f"does not crop or slide the context but attends to every earlier token through a KV cache "
                f"preallocated for {total_len} tokens, so memory and time per token grow with the length, and "
                f"positions past {T} are untrained RoPE extrapolation (quality usually degrades there)")
    if "M" in layers:
        extra = f" and sliding-window attention over the last {cfg.window} tokens" if "S" in layers else ""
        return (f"note: {loaded.model_name} decodes with a constant-size recurrent state{extra}: it may generate "
                f"far past its training context ({T}) at constant memory and time per token")
    return (f"note: {loaded.model_name} uses only sliding-window attention (window {cfg.window}): constant memory "
            f"past its training context ({T})")


def _fmt_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _fmt_rate(r):
    """A rate for the summary line: whole numbers, but a slow one (a first call that compiles or warms up the
    device) keeps two significant digits instead of printing as 0."""
    return f"{r:,.0f}" if r >= 10 else f"{r:.2g}"


# ----------------------------------------------------------------------------------------------
# CLI


# Compiling a decode step costs as much time as thousands of eager steps, whatever the depth (both grow with the
# layers; README, "Training on GPUs"), and a Miras model compiles two graphs: --compile's default compiles only a
# run that generates at least this many tokens in all
AUTO_COMPILE_MIN_TOKENS = 4096


def resolve_compile(cfg, device):
    """--compile: (compile, why). None compiles on CUDA a run of at least AUTO_COMPILE_MIN_TOKENS new tokens (all
    samples together) or one given a --compile_mode; elsewhere cli.resolve_compile's rule (not on a CPU). why: ""
    unless None decided on CUDA."""
    if cfg.compile is not None or torch.device(device).type != "cuda":
        return cli.resolve_compile(cfg.compile, device), ""
    if cfg.compile_mode != "default":
        return True, f"auto: --compile_mode={cfg.compile_mode}"
    total = cfg.num_samples * cfg.max_new_tokens
    on = total >= AUTO_COMPILE_MIN_TOKENS
    return on, (f"auto: {total:,} new tokens {'>=' if on else '<'} {AUTO_COMPILE_MIN_TOKENS:,}"
                f"{'' if on else ', where compiling costs more than it saves; --compile=true compiles'}")


def steps_to_chunk_start(config, pos):
    """How many decode steps from position pos come before the first at a Miras chunk's first token (0: pos is
    one), whose compiled step is a graph of its own (make_step); None for a model without Miras layers."""
    return -pos % config.chunk_size if "M" in config.layers else None


def warmup_tokens(config, prompt_len, max_new_tokens):
    """Tokens of the scratch run that compiles a decode step before the timed samples: at least 4, and enough to
    reach a chunk's first token where the samples reach one (max_new_tokens tokens make max_new_tokens - 1
    steps, the first at position prompt_len); else its compile would stall the first sample and count in its
    decode rate."""
    k = steps_to_chunk_start(config, prompt_len)
    return min(max_new_tokens, 4 if k is None else max(4, k + 2))


def run(cfg, out=None, err=None):
    """Sample as configured: samples to `out` (stdout), everything else to `err` (stderr)."""
    out = out or sys.stdout
    err = err or sys.stderr
    device = cli.resolve_device(cfg.device, SampleError)
    dtype = cli.resolve_dtype(cfg.dtype, device, SampleError)
    compile, compile_why = resolve_compile(cfg, device)
    cli.check_compile_mode(cfg.compile_mode, compile, device, SampleError)
    if cfg.compile_regions and not compile:
        raise SampleError("--compile_regions=True compiles the decode step by block regions: add --compile=True")
    loaded = load_model(cfg.out_dir, cfg.ckpt, device, dtype)
    model, tok = loaded.model, loaded.tokenizer
    cli.fast_float32(device)
    text = read_start(cfg.start)
    prompt = encode_prompt(tok, text)
    autocast = cli.autocast_for(device, dtype)
    greedy = is_greedy(cfg.temperature, cfg.top_k)
    how = "greedy (argmax)" if greedy else (f"temperature {cfg.temperature:g}, top_k {cfg.top_k or 'off'}, "
                                             f"top_p {cfg.top_p:g}, seed {cfg.seed}")
    print(f"{loaded.path} ({loaded.model_name}, iteration {loaded.iter_num}, {model.num_params(False) / 1e6:.2f}M "
          f"parameters, context {loaded.config.block_size}, {tok.kind} tokenizer) on {device}, "
          f"{dtype}: {cfg.num_samples} x {cfg.max_new_tokens} tokens after "
          f"a {len(prompt)}-token prompt, {how}", file=err, flush=True)
    note = length_note(loaded, len(prompt) + cfg.max_new_tokens)
    if note:
        print(note, file=err, flush=True)
    if compile_why:
        print(f"decode step: {'compiled' if compile else 'eager'} ({compile_why})", file=err, flush=True)

    step = make_step(model, autocast, compile, cfg.compile_mode,
                     Sampling(cfg.temperature, cfg.top_k, cfg.top_p, tok.vocab_size),
                     regions=cfg.compile_regions)  # None: make_step's default; True without --compile was refused above
    if compile and cfg.max_new_tokens > 1:  # compile outside the timings: the same positions on a scratch run
        t0 = time.perf_counter()
        for _ in generate_stream(model, prompt, warmup_tokens(model.config, len(prompt), cfg.max_new_tokens),
                                 cfg.temperature, cfg.top_k, cfg.top_p, torch.Generator(device=device), step,
                                 autocast, tok.vocab_size, cache_len=len(prompt) + cfg.max_new_tokens):
            pass
        print(f"compiled the decode step ({'by block regions' if step.regions else 'whole'}) in "
              f"{time.perf_counter() - t0:.1f}s", file=err, flush=True)

    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    totals = Stats()
    for k in range(cfg.num_samples):
        stats = Stats()
        stream = TextStream(tok)
        out.write(text)
        out.flush()
        for token in generate_stream(model, prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                                     gen, step, autocast, tok.vocab_size, stats):
            piece = stream.push(token)
            if piece:
                out.write(piece)
                out.flush()
        out.write(stream.flush() + "\n")
        out.flush()
        if k < cfg.num_samples - 1:
            out.write("---------------\n")
        for f in ("prompt_tokens", "prefill_s", "new_tokens", "decode_steps", "decode_s"):
            setattr(totals, f, getattr(totals, f) + getattr(stats, f))
        totals.cache = stats.cache
    sb = state_bytes(totals.cache)
    parts = []
    if sb["miras"]:
        parts.append(f"Miras layers: {_fmt_bytes(sb['miras'])}, constant in the length")
    if sb["attention"]:
        kinds = set(loaded.config.layers) - {"M"}
        what = "KV caches" + (f" (full attention: {len(prompt) + cfg.max_new_tokens} slots)" if "A" in kinds else
                              f" (sliding window: {loaded.config.window} slots)")
        parts.append(f"attention {what}: {_fmt_bytes(sb['attention'])}")
    print(f"prefill: {_fmt_rate(totals.prefill_tokens_per_s)} tokens/s ({totals.prompt_tokens} tokens) | decode: "
          f"{_fmt_rate(totals.decode_tokens_per_s)} tokens/s ({totals.new_tokens} tokens"
          f"{', compiled' if compile else ''}) | state per sequence: {sb['total']:,} bytes ({_fmt_bytes(sb['total'])}"
          f"{'; ' + ', '.join(parts) if parts else ''})", file=err, flush=True)
    return totals


def main(argv=None):
    return cli.main("sample.py", __doc__, SampleConfig(), lambda a: run(parse_args(a)), argv, SampleError)


if __name__ == "__main__":
    sys.exit(main())
