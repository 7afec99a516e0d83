"""Throughput versus context length, every model in one harness; and the memory op alone (--op).

    python bench.py                                  # CPU preset: all four models, short lengths
    python bench.py --preset=gpu --compile=true      # GPU preset: up to 32K tokens (8K is the paper's point)
    python bench.py --op                             # miras_memory alone vs reference, GEMM peak, titans-pytorch
    python bench.py --models=moneta,transformer --seq_lens=256,1024 --json=out/bench.json

Each (model, length, mode) runs in a forked worker so its peak memory is its own: CUDA allocator peak on
GPU; on CPU the worker's peak resident set size above its size at the fork (ru_maxrss delta). Timings are
medians over --repeats after --warmup untimed runs. The batch is tokens_per_step // seq_len so every length
does the same work per step. A run that runs out of memory is reported as OOM and the sweep goes on.
"""
import functools
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch

import memory_core
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


@dataclass
class BenchConfig:
    preset: str = "cpu"
    op: bool = False              # benchmark memory_core.miras_memory alone instead of the models
    op_impls: str = "eager,compiled_chunks,reference"  # also: compiled (whole call; slow to compile on CPU)
    models: str = ""              # comma-separated; "" = the preset's
    seq_lens: str = ""            # comma-separated; "" = the preset's
    modes: str = "train,prefill,decode"
    model_preset: str = ""        # preset of every model ("" = the bench preset's), so sizes match
    vocab_size: int = 0           # 0 = the bench preset's
    tokens_per_step: int = 0
    decode_tokens: int = 0        # decode steps timed after a prefill of seq_len tokens
    repeats: int = 0
    warmup: int = -1
    device: str = "auto"
    dtype: str = "auto"           # float32 | bfloat16 (autocast) | auto: bfloat16 on CUDA, float32 on CPU
    compile: bool = False
    mem_limit_gb: float = 0.0     # >0: cap each worker's memory (exercises the OOM path)
    json: str = "bench.json"
    plot: str = ""                # PNG path (needs matplotlib); "" = next to the JSON
    extra: dict = field(default_factory=dict)


def parse_args(argv) -> BenchConfig:
    cfg, valid = BenchConfig(), {f.name: f for f in fields(BenchConfig) if f.name != "extra"}
    for arg in argv:
        if arg == "--op":
            cfg.op = True
            continue
        key, sep, val = arg.lstrip("-").partition("=")
        if not arg.startswith("--") or key not in valid or not sep:
            sys.exit(f"bench.py: bad argument {arg!r}; use --key=value with key in {sorted(valid)}")
        typ = type(getattr(cfg, key))
        try:
            setattr(cfg, key, {"true": True, "false": False}[val.lower()] if typ is bool else typ(val))
        except (KeyError, ValueError):
            sys.exit(f"bench.py: --{key} needs a {typ.__name__}, got {val!r}")
    if cfg.op and not cfg.seq_lens:
        cfg.seq_lens = "512,2048,8192"  # the memory_core issue's lengths
    if cfg.preset not in PRESETS:
        sys.exit(f"bench.py: unknown --preset={cfg.preset}; use one of {sorted(PRESETS)}")
    for key, val in PRESETS[cfg.preset].items():
        if getattr(cfg, key) in ("", 0, -1):
            setattr(cfg, key, val)
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.dtype == "auto":
        cfg.dtype = "bfloat16" if cfg.device == "cuda" else "float32"
    if cfg.dtype not in ("float32", "bfloat16"):
        sys.exit(f"bench.py: --dtype must be float32 or bfloat16, got {cfg.dtype}")
    return cfg


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeats, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def in_worker(fn, cfg):
    """Run fn() in a forked process; return (result dict, peak memory bytes) or ({"oom": msg}, None)."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)

    def target():
        try:
            if cfg.mem_limit_gb > 0:
                if cfg.device.startswith("cuda"):
                    total = torch.cuda.get_device_properties(0).total_memory
                    torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.mem_limit_gb * 2**30 / total))
                else:  # RLIMIT_DATA bounds heap and anonymous mmaps: a big tensor then fails to allocate
                    soft = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 + int(cfg.mem_limit_gb * 2**30)
                    resource.setrlimit(resource.RLIMIT_DATA, (soft, resource.RLIM_INFINITY))
            if cfg.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            base = rss_bytes()
            out = fn()
            if cfg.device.startswith("cuda"):
                peak = torch.cuda.max_memory_allocated()
            else:
                peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
            child.send((out, peak))
        except (torch.OutOfMemoryError, MemoryError) as e:
            child.send(({"oom": str(e).splitlines()[0][:120]}, None))
        except RuntimeError as e:
            msg = str(e)
            if "memory" in msg.lower() or "alloc" in msg.lower():
                child.send(({"oom": msg.splitlines()[0][:120]}, None))
            else:
                child.send(({"error": msg.splitlines()[0][:200]}, None))
        except Exception as e:  # reported in the table; the sweep goes on
            child.send(({"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}, None))
        finally:
            child.close()

    proc = ctx.Process(target=target)
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

def bench_model(cfg, name, seq_len, mode):
    from models import build_model  # the registry: every model at the same preset size
    device = cfg.device
    batch = max(1, cfg.tokens_per_step // seq_len)
    max_len = seq_len + (cfg.decode_tokens + max(1, cfg.warmup) if mode == "decode" else 0)
    model = build_model(name, cfg.model_preset, block_size=max_len, vocab_size=cfg.vocab_size).to(device)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(model.config.vocab_size, (batch, seq_len), generator=gen).to(device)
    if mode == "train":
        model.train()
        optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device.split(":")[0])
        fwd = torch.compile(model) if cfg.compile else model

        def step():
            with autocast:
                _, loss = fwd(idx, targets=idx)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sec = timed(step, device, cfg.repeats, cfg.warmup)
        return dict(batch_size=batch, tokens_per_s=batch * seq_len / sec, ms_per_step=1e3 * sec)
    model.eval()
    if mode == "prefill":
        fwd = torch.compile(model) if cfg.compile else model

        def prefill():
            with torch.no_grad(), autocast:
                fwd(idx)
        sec = timed(prefill, device, cfg.repeats, cfg.warmup)
        return dict(batch_size=batch, tokens_per_s=batch * seq_len / sec, ms_per_step=1e3 * sec)
    # decode: one sequence, prefilled to seq_len, then decode_tokens single-token steps
    prompt = idx[:1]
    step_fn = torch.compile(model.forward_step, fullgraph=True) if cfg.compile else model.forward_step
    with torch.no_grad(), autocast:
        cache = model.init_cache(1, max_len, device, torch.float32)
        _, cache = model.prefill(prompt, cache)
        tok = prompt[:, -1:]
        for _ in range(max(1, cfg.warmup)):  # untimed steps at position seq_len (compiles the step)
            step_fn(tok, cache)
        lat = []
        for _ in range(cfg.decode_tokens):
            sync(device)
            t0 = time.perf_counter()
            logits, cache = step_fn(tok, cache)
            sync(device)
            lat.append(time.perf_counter() - t0)
            tok = logits[:, -1:].argmax(-1)
    sec = statistics.median(lat)
    state_bytes = cache_bytes(cache)
    return dict(batch_size=1, tokens_per_s=1.0 / sec, ms_per_token=1e3 * sec, state_bytes=state_bytes)


def cache_bytes(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(cache_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(cache_bytes(v) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(cache_bytes(v) for v in vars(obj).values())
    return 0


# ----------------------------------------------------------------------------------------------
# Op-level benchmark: miras_memory at B=1, H=4, d=64, E=4, chunk 64

OP_SHAPE = dict(B=1, H=4, d=64, E=4, chunk=64)
OP_MODELS = {"l2": ("huber", "yaad"), "lq": ("lp", "moneta"), "kl": ("l2", "memora")}  # retention -> objective


def op_flops_per_token(d, E, b):
    """Forward FLOPs per token and head of the chunked MLP memory (matmuls only; backward ~2x)."""
    h = E * d
    return 14 * d * h + 4 * b * (d + h)


def op_inputs(T, retention, requires_grad):
    B, H, d, E = OP_SHAPE["B"], OP_SHAPE["H"], OP_SHAPE["d"], OP_SHAPE["E"]
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
    tensors = [q, k, v, eta, alpha, w[0], w[1], torch.ones(H, d), torch.zeros(H, d), delta]
    for t in tensors:
        t.requires_grad_(requires_grad)
    q, k, v, eta, alpha, w0, w1, lnw, lnb, delta = tensors
    return (q, k, v, eta, alpha, (w0, w1), lnw, lnb), dict(delta=delta)


def gemm_gflops(device, n=2048, repeats=5):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sec = timed(lambda: a @ b, device, repeats, 2)
    return 2 * n**3 / sec / 1e9


def run_op(cfg):
    device, records = cfg.device, []
    seq_lens = [int(s) for s in cfg.seq_lens.split(",")]
    peak = gemm_gflops(device)
    print(f"fp32 GEMM (2048^3) on {device}: {peak:.1f} GFLOP/s")
    b = OP_SHAPE["chunk"]
    flops_tok = OP_SHAPE["H"] * op_flops_per_token(OP_SHAPE["d"], OP_SHAPE["E"], b)
    available = {
        "eager": memory_core.miras_memory,
        "compiled_chunks": functools.partial(memory_core.miras_memory, compile_chunks=True),
        # the whole call traced: the chunk loop is unrolled, so compile time grows with T / chunk (first_call_s)
        "compiled": torch.compile(memory_core.miras_memory, fullgraph=True),
        "reference": memory_core.miras_memory_reference,
    }
    names = cfg.op_impls.split(",")
    if set(names) - set(available):
        sys.exit(f"bench.py: unknown --op_impls {sorted(set(names) - set(available))}; use {sorted(available)}")
    impls = [(n, available[n]) for n in names]
    for retention, (objective, model) in OP_MODELS.items():
        for T in seq_lens:
            for impl, fn in impls:
                if impl == "reference" and T > min(seq_lens):
                    continue  # the token-by-token oracle: one length is enough to show the gap
                for mode in ("fwd", "fwd+bwd"):
                    args, kw = op_inputs(T, retention, mode == "fwd+bwd")
                    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else tuple(x.to(device) for x in a)
                                 for a in args)
                    kw = {k_: v_.to(device) for k_, v_ in kw.items()} if objective == "huber" else {}
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
                    fl = flops_tok * T * (3 if mode == "fwd+bwd" else 1)
                    rec = dict(kind="op", impl=impl, model=model, objective=objective, retention=retention,
                               seq_len=T, mode=mode, tokens_per_s=OP_SHAPE["B"] * T / sec,
                               gflops=fl / sec / 1e9, pct_of_gemm=100 * fl / sec / 1e9 / peak, first_call_s=first_s,
                               device=device,
                               compile=impl == "compiled", dtype="float32", **OP_SHAPE)
                    records.append(rec)
                    print(f"{impl:>9} {retention:>2}/{objective:<5} T={T:<6} {mode:<8} {rec['tokens_per_s']:>10.0f} tok/s "
                          f"{rec['gflops']:>7.1f} GFLOP/s ({rec['pct_of_gemm']:.0f}% of GEMM)")
    records += titans_baseline(cfg, seq_lens)
    return records, dict(gemm_gflops=peak)


def titans_baseline(cfg, seq_lens):
    try:
        from titans_pytorch import NeuralMemory
    except ImportError:
        print("titans-pytorch not installed (pip install titans-pytorch): comparison skipped")
        return []
    records = []
    H, d, b = OP_SHAPE["H"], OP_SHAPE["d"], OP_SHAPE["chunk"]
    mem = NeuralMemory(dim=H * d, chunk_size=b, heads=H).to(cfg.device)
    for T in [t for t in seq_lens if t <= 2048]:  # it needs ~16 GB at T = 8192 on CPU; the issue compares 2048
        for mode in ("fwd", "fwd+bwd"):
            x = torch.randn(1, T, H * d, device=cfg.device, requires_grad=mode == "fwd+bwd")

            def run():
                y, _ = mem(x)
                if mode == "fwd+bwd":
                    y.square().sum().backward()
            sec = timed(run, cfg.device, cfg.repeats, cfg.warmup)
            records.append(dict(kind="op", impl="titans-pytorch", model="titans-NeuralMemory", seq_len=T, mode=mode,
                                tokens_per_s=T / sec, device=cfg.device, compile=False, dtype="float32"))
            print(f"titans-pytorch NeuralMemory(dim={H * d}, heads={H}, chunk={b}) T={T:<6} {mode:<8} "
                  f"{T / sec:>10.0f} tok/s")
    return records


# ----------------------------------------------------------------------------------------------

def header(cfg):
    dev = torch.cuda.get_device_name(0) if cfg.device.startswith("cuda") else (platform.processor() or platform.machine())
    info = dict(device_name=dev, torch=torch.__version__, threads=torch.get_num_threads(), compile=cfg.compile,
                dtype=cfg.dtype, python=platform.python_version(),
                peak_mem_measure="cuda max_memory_allocated" if cfg.device.startswith("cuda")
                else "worker peak RSS above its size at fork (ru_maxrss delta)")
    print(" | ".join(f"{k}={v}" for k, v in info.items()))
    return info


def run_models(cfg):
    records = []
    for name in cfg.models.split(","):
        for seq_len in (int(s) for s in cfg.seq_lens.split(",")):
            for mode in cfg.modes.split(","):
                out, peak = in_worker(lambda: bench_model(cfg, name, seq_len, mode), cfg)
                rec = dict(kind="model", model=name, seq_len=seq_len, mode=mode, device=cfg.device,
                           compile=cfg.compile, dtype=cfg.dtype, model_preset=cfg.model_preset, vocab_size=cfg.vocab_size,
                           tokens_per_s=None, peak_mem_bytes=peak)
                rec.update(out)
                records.append(rec)
                if "oom" in out or "error" in out:
                    print(f"{name:>12} {seq_len:>6} {mode:<8} {'OOM' if 'oom' in out else 'ERROR'}: "
                          f"{out.get('oom') or out.get('error')}")
                else:
                    extra = f" {out['ms_per_token']:.2f} ms/token" if mode == "decode" else f" batch {out['batch_size']}"
                    print(f"{name:>12} {seq_len:>6} {mode:<8} {out['tokens_per_s']:>10.0f} tok/s "
                          f"{(peak or 0) / 2**20:>8.1f} MiB{extra}")
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
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
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
    return records


if __name__ == "__main__":
    main()
