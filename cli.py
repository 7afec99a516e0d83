"""The command-line plumbing shared by train.py, sample.py and bench.py: one typed `--key=value` parser over a
config dataclass (and one for `--model_args`, overrides of a model's config), and what "auto" means for the
device and the dtype (and the autocast context of a dtype).

    cfg, given = cli.parse(TrainConfig, sys.argv[1:], prog="train.py", files=True)

Every key is a field of the dataclass, typed bool / int / float / str or Optional of one of them ("None" sets an
Optional key to None); a bare `--key` sets a bool key to true. An unknown key, a malformed argument or a value
of the wrong type raises one line (ConfigError, or the script's own kind of it) naming the valid keys and their
types; `--help` is help_text().
"""
import contextlib
import dataclasses
import json
import pathlib
import runpy
import sys
import typing

import torch


class ConfigError(ValueError):
    """A bad configuration: unknown key, wrong type or invalid value (each script's main() prints it as one
    line). sample.py's SampleError and bench.py's BenchError are kinds of it."""


# ----------------------------------------------------------------------------------------------
# The --key=value parser

def _base_type(hint):
    """(type, optional) of a field annotation such as int or Optional[int]."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def field_types(cls):
    """{key: type hint} of the command-line keys of a config dataclass: its bool / int / float / str fields,
    Optional ones included (any other field, e.g. a dict, is not settable from the command line)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)
            if _base_type(hints[f.name])[0] in (bool, int, float, str)}


def _type_name(hint):
    base, optional = _base_type(hint)
    return f"{base.__name__}|None" if optional else base.__name__


def valid_keys(hints):
    return ", ".join(f"{k}:{_type_name(t)}" for k, t in hints.items())


def coerce(key, value, hint, hints, what="key", from_string=False, source="", error=ConfigError):
    """value checked against the type hint of `key`; a command-line string (from_string) is converted."""
    base, optional = _base_type(hint)
    out = _bad = object()
    if from_string and base is not str:
        s = value.strip()
        if optional and s.lower() in ("none", "null"):
            out = None
        elif base is bool:
            out = {"true": True, "false": False}.get(s.lower(), _bad)
        elif base is int:
            with contextlib.suppress(ValueError):
                out = int(s)
        elif base is float:
            with contextlib.suppress(ValueError):
                out = float(s)
    elif value is None:
        out = None if optional else _bad
    elif base is bool:
        out = value if isinstance(value, bool) else _bad
    elif base is int:
        out = value if isinstance(value, int) and not isinstance(value, bool) else _bad
    elif base is float:
        out = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _bad
    elif base is str:
        out = value if isinstance(value, str) else _bad
    if out is _bad:
        raise error(f"{what} {key!r} must be {_type_name(hint)}, got {value!r}{source}; "
                    f"valid {what}s: {valid_keys(hints)}")
    return out


def parse_model_args(model_args, config_cls, model, error=ConfigError):
    """--model_args ("k=v,k=v" or a JSON object) -> model config overrides, typed by the model's config dataclass
    (config_cls; `model` names it in errors)."""
    s = model_args.strip()
    if not s:
        return {}
    hints = typing.get_type_hints(config_cls)
    from_string = not s.startswith("{")
    if not from_string:
        try:
            raw = json.loads(s)
        except json.JSONDecodeError as e:
            raise error(f"--model_args is not valid JSON: {e}") from None
    else:
        raw = {}
        for item in s.split(","):
            key, eq, value = item.partition("=")
            if not eq:
                raise error(f"--model_args item {item!r} must look like key=value")
            raw[key.strip()] = value.strip()
    out = {}
    for key, value in raw.items():
        if key not in hints:
            raise error(f"unknown model_args key {key!r} for {model}; valid model_args keys: {valid_keys(hints)}")
        out[key] = coerce(key, value, hints[key], hints, what="model_args key", from_string=from_string, error=error)
    return out


def load_config_file(path, error=ConfigError):
    """The dict of a config file: a Python file defining `config = {...}` (run with runpy, not exec'd into
    the caller), or a JSON object."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise error(f"config file {path} not found (see config/ for the shipped ones)")
    if path.suffix == ".json":
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise error(f"config file {path} is not valid JSON: {e}") from None
    else:
        config = runpy.run_path(str(path)).get("config")
    if not isinstance(config, dict):
        raise error(f"config file {path} must define a dict `config = {{...}}` (or be a JSON object)")
    return config


def parse(cls, argv, prog, files=False, noun="key", error=ConfigError):
    """(cls instance, set of the keys given) from `--key=value` arguments over cls's defaults, later ones
    winning. With `files`, a positional argument is a config file (load_config_file) whose typed values apply
    in order with the overrides; otherwise it is an error. `noun` names a key in the messages ("config key")."""
    hints = field_types(cls)
    valid = valid_keys(hints)
    values, given = {}, set()

    def put(key, value, from_string, where, how=""):
        if key not in hints:
            raise error(f"unknown {noun} {key!r} {where}; {how}valid keys: {valid}")
        values[key] = coerce(key, value, hints[key], hints, noun, from_string, f" ({where})", error)
        given.add(key)

    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq and _base_type(hints.get(key))[0] is bool:
                eq, value = "=", "true"  # a bare --flag
            if not eq:
                raise error(f"argument {arg!r} must look like --key=value; valid keys: {valid}")
            put(key, value, True, f"in {arg!r}", "use --key=value with one of the ")
        elif files:
            for key, value in load_config_file(arg, error).items():
                put(key, value, False, f"in config file {arg}")
        else:
            raise error(f"argument {arg!r} must look like --key=value ({prog} takes no config files); "
                        f"valid keys: {valid}")
    return cls(**values), given


def wants_help(argv):
    return "-h" in argv or "--help" in argv


def main(prog, doc, defaults, run, argv=None, error=ConfigError):
    """A script's main(): --help (help_text of doc and the `defaults` config), else run(argv); an `error` is one
    line `prog: error: ...` on stderr and exit status 2, Ctrl-C is status 130."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if wants_help(argv):
        print(help_text(doc, defaults))
        return 0
    try:
        run(argv)
    except error as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def help_text(doc, config, heading="Keys and their defaults:"):
    """A script's --help: its docstring, then every key with its default (the values of `config`) and type."""
    def show(v):  # a string that would not survive the shell or the eye as it is: quoted
        return repr(v) if isinstance(v, str) and (not v or not v.isprintable() or " " in v) else v

    hints = field_types(type(config))
    return (doc.rstrip() + f"\n\n{heading}\n"
            + "\n".join(f"  --{k}={show(getattr(config, k))}  ({_type_name(t)})" for k, t in hints.items()))


# ----------------------------------------------------------------------------------------------
# Device and dtype

def resolve_device(name="auto", error=ConfigError):
    """The torch.device of --device: "auto" is cuda if available, else cpu. A device string torch does not
    parse, or a CUDA device this machine lacks, raises `error` (one line)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise error(f"--device={name!r} is not a device ({str(e).splitlines()[0]}); use auto, cpu, cuda, "
                    f"cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise error(f"--device={name} but CUDA is not available here; use --device=cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise error(f"--device={name} but there are {torch.cuda.device_count()} CUDA device(s); "
                        f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def resolve_dtype(name, device, error=ConfigError):
    """The dtype name of --dtype on `device`: "auto" is bfloat16 on a CUDA device that supports it, else
    float32. float16 needs CUDA (it trains with a GradScaler). Which names a script accepts is its own check."""
    device = torch.device(device)
    if name == "auto":
        return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if name == "float16" and device.type != "cuda":
        raise error("dtype float16 needs a CUDA device (use bfloat16 or float32)")
    return name


def autocast_for(device, dtype):
    """The context every forward runs in: autocast for the half precisions (the weights stay float32; the
    Miras memory computes in float32 inside it), nothing for float32 / float64."""
    if dtype in ("bfloat16", "float16"):
        return torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


def kv_cache_dtype(autocast):
    """The dtype of a decode KV cache read under `autocast` (autocast_for's context): autocast's own, so that
    attention reads the cache without casting all of it on every token; None (the weights' dtype) without
    autocast. A Miras state stays float32 whatever this is."""
    return getattr(autocast, "fast_dtype", None)


def resolve_compile(value, device):
    """--compile of sample.py and bench.py: None (the default) compiles on CUDA, where it pays, and not elsewhere
    (on a CPU, compiling a decode step takes longer than sampling a few hundred tokens eagerly)."""
    return torch.device(device).type == "cuda" if value is None else bool(value)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # these capture CUDA graphs: CUDA only


def known_compile_mode(mode):
    """(ok, message) for a --compile_mode's name, as the scripts' validate() checks lists take them."""
    return mode in COMPILE_MODES, f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}"


def check_compile_mode(mode, compile, device, error=ConfigError):
    """--compile_mode of train.py, sample.py and bench.py: a torch.compile mode, given only with compiling on, and
    a CUDA-graph mode only on CUDA (raises `error`)."""
    known, message = known_compile_mode(mode)
    if not known:
        raise error(message)
    if mode != "default" and not compile:
        raise error(f"compile_mode={mode} is a mode of torch.compile: add --compile=true")
    if mode in CUDA_GRAPH_MODES and torch.device(device).type != "cuda":
        raise error(f"compile_mode={mode} captures CUDA graphs: use it with --device=cuda, or "
                    f"compile_mode=default on {torch.device(device).type}")


def torch_compile_mode(mode):
    """torch.compile's mode argument for a --compile_mode (None: its default)."""
    return None if mode == "default" else mode


def cuda_graph_step_begin(mode):
    """Under a CUDA-graph compile mode, each call of the compiled model starts a new replay, which may overwrite
    the previous one's outputs (read them before)."""
    if mode in CUDA_GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()


def keep_grad_buffers(params):
    """CUDA-graph training: every trainable parameter gets a zeroed .grad of its own, which each backward adds
    into in place; a .grad that autograd took over from a graph's output would be overwritten by the next
    micro-step's replay (pytorch/pytorch#169545). The optimizer then zeroes them (set_to_none=False)."""
    for p in params:
        if p.requires_grad:
            p.grad = torch.zeros_like(p)


def cpu_compile_problem():
    """Why Inductor cannot build and run its C++ kernels in this process (no C++ compiler, no OpenMP, ...), as
    one line, or None if it can: compiles a one-op function (a few seconds on a cold cache)."""
    try:
        x = torch.arange(4.0)
        if not torch.equal(torch.compile(lambda t: t * 2 + 1, fullgraph=True)(x), x * 2 + 1):
            return "a compiled test function gave wrong results"
    except Exception as e:  # whatever fails here would fail the model's compile: say what and do not compile
        first = str(e).strip().splitlines()
        return f"{type(e).__name__}: {first[0] if first else ''}"[:200]
    return None


def resolve_train_compile(value, device):
    """train.py's --compile: (compile, why). None (the default) compiles on CUDA, and on a CPU where Inductor can
    build its kernels (cpu_compile_problem): there a compiled training step is ~1.7x eager and the main job,
    cold compile included, finishes sooner (README, Quickstart). Elsewhere (a CPU without a C++ compiler, MPS)
    it trains eagerly and `why` says so."""
    kind = torch.device(device).type
    if value is not None or kind != "cpu":  # explicit, or CUDA / another device: resolve_compile's rule
        on = resolve_compile(value, device)
        return on, "" if value is not None else "auto" if on else f"auto: not compiled on {kind}"
    problem = cpu_compile_problem()
    if problem:
        return False, (f"auto: Inductor cannot build CPU kernels here ({problem}); "
                       "pass --compile=false to skip this check")
    return True, "auto"


def fast_float32(device):
    """TF32 matmuls and convolutions on a CUDA device (float32 math on tensor cores); on a CPU, subnormal
    floats flushed to zero: x86 handles them in microcode, ~100x slower, and a memory whose decayed state drifts
    into them (Yaad at its small default step) trained several times slower per step."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif torch.device(device).type == "cpu":
        torch.set_flush_denormal(True)
