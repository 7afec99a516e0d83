"""bench.py end to end on CPU at toy sizes: valid JSON with every field, the OOM path, one-line errors for
impossible arguments, the worker start method (spawn for CUDA) and the titans-pytorch baseline's shape."""
import functools
import json
import os
import platform
import subprocess
import sys

import pytest
import torch

import bench

MODEL_FIELDS = {"model", "seq_len", "mode", "tokens_per_s", "peak_mem_bytes", "device", "compile", "dtype",
                "first_call_s", "model_args", "minor_faults_per_round"}


def run_bench(tmp_path, *extra):
    out = tmp_path / "bench.json"
    assert bench.main([f"--json={out}", "--repeats=1", "--warmup=1", "--tokens_per_step=64", "--decode_tokens=2",
                       *extra]) == 0
    return json.loads(out.read_text())


def test_two_models_two_lengths_write_every_field(tmp_path):
    report = run_bench(tmp_path, "--models=moneta,transformer", "--seq_lens=16,32", "--model_preset=tiny")
    records = report["records"]
    assert {(r["model"], r["seq_len"], r["mode"]) for r in records} == {
        (m, n, mode) for m in ("moneta", "transformer") for n in (16, 32) for mode in ("train", "prefill", "decode")}
    for r in records:
        assert MODEL_FIELDS <= r.keys(), MODEL_FIELDS - r.keys()
        assert "oom" not in r and "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["peak_mem_bytes"] >= 0
        assert isinstance(r["minor_faults_per_round"], int) and r["minor_faults_per_round"] >= 0
        if bench._MALLINFO2 is not None:  # glibc: the heap's bytes in use at one more round's peak (the model's
            assert r["peak_heap_bytes"] > 0  # weights alone are above the worker's start)
        assert r["device"] == "cpu" and r["compile"] is False and r["dtype"] == "float32"
        if r["mode"] != "decode":  # the model's FLOPs per token, and the rate: tokens/s x FLOPs per token
            assert r["model_flops_per_token"] > 0
            assert r["model_gflops_per_s"] == pytest.approx(r["tokens_per_s"] * r["model_flops_per_token"] / 1e9)
    train = {(r["model"], r["seq_len"]): r for r in records if r["mode"] == "train"}
    # attention's FLOPs grow with the context, the chunked memory's do not (chunk_size 64 > both lengths: equal)
    assert train["transformer", 32]["model_flops_per_token"] > train["transformer", 16]["model_flops_per_token"]
    decode = {(r["model"], r["seq_len"]): r for r in records if r["mode"] == "decode"}
    # Miras decode state is O(1) in the position; the Transformer's KV cache grows with it.
    assert decode["moneta", 16]["state_bytes"] == decode["moneta", 32]["state_bytes"]
    assert decode["transformer", 32]["state_bytes"] > decode["transformer", 16]["state_bytes"]
    # how the step was compiled (make_step's block regions: CUDA's default); eager here
    assert all(r["compiled_by_regions"] is False for r in decode.values())
    assert report["info"]["torch"] and report["info"]["threads"] >= 1
    assert (tmp_path / "bench.png").exists() or "matplotlib" not in str(report)


def test_counting_faults_counts_the_pages_a_round_touches_afresh():
    """A round that allocates and fills 64 MiB (above any malloc's mmap threshold: mapped at the allocation and
    given back at the free) faults on each of its pages, 4 KiB or 2 MiB (transparent huge pages), every round; a
    round that touches nothing new does not. The median is over the rounds run, None before any."""
    def fresh():
        torch.ones(16 * 2**20).sum()
        return [0.0]
    run, result = bench.counting_faults((fresh, lambda times: {"seconds": times}))
    assert result([1.0]) == {"seconds": [1.0], "minor_faults_per_round": None}
    assert run() == [0.0]
    run()
    assert result([1.0])["minor_faults_per_round"] >= 64 * 2**20 // (2 * 2**20)
    idle_run, idle_result = bench.counting_faults((lambda: [0.0], lambda times: {}))
    idle_run()
    idle_run()
    assert idle_result([])["minor_faults_per_round"] < result([1.0])["minor_faults_per_round"]


@pytest.mark.skipif(bench._MALLINFO2 is None, reason="the C library is not glibc: no mallinfo2")
def test_model_args_override_the_miras_models_and_leave_the_baseline(tmp_path):
    """--model_args reaches the Miras models built in the worker (their FLOPs per token follow the chunk size) and
    their rows; the Transformer++ is built as it is."""
    import models
    report = run_bench(tmp_path, "--models=moneta,transformer", "--seq_lens=16", "--modes=train",
                       "--model_preset=tiny", "--model_args=recompute_inputs=false,chunk_size=8")
    rows = {r["model"]: r for r in report["records"]}
    assert rows["moneta"]["model_args"] == {"recompute_inputs": False, "chunk_size": 8}
    assert rows["transformer"]["model_args"] == {}

    def flops(name, **kw):
        return models.build_model(name, "tiny", vocab_size=rows[name]["vocab_size"], **kw).flops_per_token(16)
    assert flops("moneta", chunk_size=8) != flops("moneta")
    assert rows["moneta"]["model_flops_per_token"] == flops("moneta", chunk_size=8)
    assert rows["transformer"]["model_flops_per_token"] == flops("transformer")


def test_heap_peak_sees_a_buffer_freed_inside_the_block():
    """HeapPeak samples the heap's bytes in use while its block runs: a 64 MiB tensor made, filled and freed
    inside the block is in its peak, and no longer in use after it (heap_in_use, unlike the RSS, drops on free)."""
    before = bench.heap_in_use()
    with bench.HeapPeak() as heap:
        x = torch.ones(16, 2**20)  # 64 MiB
        x.mul_(2)
        del x
    assert heap.peak - before >= 64 * 2**20
    assert bench.heap_in_use() - before < 16 * 2**20


def test_forced_memory_limit_is_reported_as_oom_and_the_sweep_goes_on(tmp_path):
    # 8 MiB cannot hold a training step of the tiny Transformer at 512 tokens; the 16-token prefill fits.
    report = run_bench(tmp_path, "--models=transformer", "--seq_lens=512", "--modes=train", "--mem_limit_gb=0.008",
                       "--tokens_per_step=2048")
    (rec,) = report["records"]
    assert "oom" in rec and rec["tokens_per_s"] is None and rec["peak_mem_bytes"] is None


def test_interleave_times_every_model_in_one_worker(tmp_path):
    report = run_bench(tmp_path, "--models=moneta,transformer", "--seq_lens=16", "--modes=train,decode",
                       "--model_preset=tiny", "--interleave=true", "--repeats=2")
    records = report["records"]
    assert {(r["model"], r["mode"]) for r in records} == {
        (m, mode) for m in ("moneta", "transformer") for mode in ("train", "decode")}
    for r in records:
        assert "oom" not in r and "error" not in r, r
        assert r["interleaved"] is True and r["peak_mem_bytes"] is None  # one worker: no model's own peak
        assert r["tokens_per_s"] > 0 and r["first_call_s"] > 0
    decode = {r["model"]: r for r in records if r["mode"] == "decode"}
    assert decode["moneta"]["state_bytes"] > 0 and decode["transformer"]["state_bytes"] > 0


def test_profile_counts_the_memory_operator_once_forward_and_once_backward_per_layer(tmp_path):
    """--profile: one warm call per cell under torch.profiler. A training step of a 4-layer Moneta calls the
    memory operator 8 times (each layer's forward, then its backward), an attention model never; a decode step
    runs no chunk loop at all; the top ops are named, counted and timed."""
    report = run_bench(tmp_path, "--models=moneta,transformer", "--seq_lens=16", "--modes=train,decode",
                       "--model_preset=tiny", "--profile=true")
    prof = {(r["model"], r["mode"]): r["profile"] for r in report["records"]}
    assert prof["moneta", "train"]["memory_op"]["calls"] == 2 * 4
    assert 0 < prof["moneta", "train"]["memory_op"]["cpu_s"] < prof["moneta", "train"]["wall_s"]
    assert prof["moneta", "decode"]["memory_op"]["calls"] == prof["transformer", "train"]["memory_op"]["calls"] == 0
    for p in prof.values():
        assert p["wall_s"] > 0 and p["host_ops"] > 0 and "kernels" not in p  # kernel counts: CUDA only
        assert p["top"] and all(isinstance(name, str) and calls >= 1 and sec >= 0 for name, calls, sec in p["top"])
    # the chunked memory runs more host ops per step than attention: what a GPU launches from Python
    assert prof["moneta", "train"]["host_ops"] > prof["transformer", "train"]["host_ops"]
    # where the self time goes (CPU): eager, nothing is generated; only attention runs SDPA; both run matmuls
    for (model, mode), p in prof.items():
        parts = p["breakdown"]
        assert set(parts) == {"matmul_s", "attention_s", "fused_s", "other_s"} and min(parts.values()) >= 0
        assert parts["fused_s"] == 0 and parts["matmul_s"] > 0 and parts["other_s"] > 0
        assert (parts["attention_s"] > 0) == (model == "transformer")
        assert sum(parts.values()) <= 1.5 * p["wall_s"]  # self times partition the profiled call (plus overhead)


def test_profile_of_a_compiled_model_times_its_generated_kernels(tmp_path, capsys):
    """--profile --compile on a CPU: Inductor's kernels get records of their own (bench.with_compiled_kernel_records),
    so the breakdown counts fused kernel time, which without those records hides in the graphs' wrappers; the
    cell's printed row ends with it."""
    report = run_bench(tmp_path, "--models=transformer", "--seq_lens=16", "--modes=train", "--model_preset=tiny",
                       "--compile=true", "--profile=true")
    parts = report["records"][0]["profile"]["breakdown"]
    assert parts["fused_s"] > 0 and parts["attention_s"] > 0 and parts["matmul_s"] > 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("transformer"))
    ms = {k: 1e3 * v for k, v in parts.items()}
    assert row.endswith(f"| profiled: matmul {ms['matmul_s']:.3f} ms, attention {ms['attention_s']:.3f} ms, "
                        f"fused {ms['fused_s']:.3f} ms, other {ms['other_s']:.3f} ms")


def test_decode_rounds_restart_from_the_prefill():
    """Every decode round starts from a fresh prefill of seq_len tokens: more rounds time the same positions
    with the same KV cache (a full-attention step reads its whole preallocated cache, so a cache sized for all
    rounds' tokens would slow the Transformer++ at short lengths)."""
    sizes = []
    for repeats in (1, 3):
        cfg = bench.parse_args([*TINY, "--modes=decode", "--decode_tokens=4", f"--repeats={repeats}"])
        sizes.append(bench.bench_model(cfg, "transformer", 16, "decode")["state_bytes"])
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("seq_len,warmup,profile,n_graphs", [(62, 1, False, 2), (64, 1, False, 2), (16, 1, False, 1),
                                                            (59, 5, True, 2)])
def test_compiled_decode_warms_up_to_every_graph_the_timed_steps_use(decode_graph_counter, monkeypatch, seq_len, warmup,
                                                                       profile, n_graphs):
    """A compiled Miras decode step has a graph of its own for a chunk's first token (chunks of 64 here). The untimed
    warm-up steps run every graph a later step runs, whatever --warmup says, so that no timed or profiled step
    compiles (graphs counted with aot_eager instead of inductor): from a prefill of 62 tokens the timed steps cross
    position 64; from 64 (a chunk's end, as every default length) the round's untimed step is a chunk start and the
    timed ones are not; from 16 no step reaches a chunk start (one graph); from 59 with --warmup=5 the profiled step
    is at 64."""
    counter, profile_call, profiled = decode_graph_counter, bench.profile_call, []

    def graphs_around_profile(*args):
        before = counter.frame_count
        out = profile_call(*args)
        profiled.append((before, counter.frame_count))
        return out
    monkeypatch.setattr(bench, "profile_call", graphs_around_profile)
    cfg = bench.parse_args([*TINY, "--models=moneta", "--modes=decode", "--decode_tokens=4", f"--warmup={warmup}",
                            "--compile=true", "--device=cpu", f"--profile={profile}"])
    run, result = bench.prepare_cell(cfg, "moneta", seq_len, "decode")
    assert counter.frame_count == n_graphs  # before any timed step
    assert profiled == ([(n_graphs, n_graphs)] if profile else [])
    times = run()
    assert counter.frame_count == n_graphs and len(times) == 4
    assert ("profile" in result(times)) == profile


def without_faults(out):
    """An interleaved result's fields but minor_faults_per_round, after checking that every cell has that count
    (counting_faults: each cell its own rounds')."""
    for fields in out.values():
        assert isinstance(fields["minor_faults_per_round"], int) and fields["minor_faults_per_round"] >= 0
    return {key: {k: v for k, v in fields.items() if k != "minor_faults_per_round"} for key, fields in out.items()}


def test_interleave_prepares_every_model_then_times_rounds_in_turns(monkeypatch):
    """All cells are built (and compiled) before any is timed; each turn times one round of every model, the
    order reversed every other turn; each model's result sees all of its rounds."""
    log = []

    def fake_prepare(cfg, name, seq_len, mode):
        log.append(("prepare", name))

        def run():
            log.append(("run", name))
            return [float(len(log))]
        return run, lambda times: dict(times=times)
    monkeypatch.setattr(bench, "prepare_cell", fake_prepare)
    cfg = bench.parse_args([*TINY, "--repeats=3", "--interleave=true"])
    out = bench.bench_interleaved(cfg, ["a", "b"], [16], "train")
    assert log == [("prepare", "a"), ("prepare", "b"), ("run", "a"), ("run", "b"), ("run", "b"), ("run", "a"),
                   ("run", "a"), ("run", "b")]
    assert without_faults(out) == {("a", 16): dict(times=[3.0, 6.0, 7.0], interleaved=True),
                                   ("b", 16): dict(times=[4.0, 5.0, 8.0], interleaved=True)}


def test_interleaved_lengths_are_prepared_then_timed_in_turns_with_the_models(monkeypatch):
    """--interleave_lengths: every (model, length) cell of a mode is built before any is timed, and each turn
    times one round of every cell, the order reversed every other turn."""
    log = []

    def fake_prepare(cfg, name, seq_len, mode):
        log.append(("prepare", name, seq_len))

        def run():
            log.append((name, seq_len))
            return [float(len(log))]
        return run, lambda times: dict(times=times)
    monkeypatch.setattr(bench, "prepare_cell", fake_prepare)
    cfg = bench.parse_args([*TINY, "--repeats=2", "--interleave=true", "--interleave_lengths=true"])
    out = bench.bench_interleaved(cfg, ["a", "b"], [16, 32], "decode")
    cells = [("a", 16), ("b", 16), ("a", 32), ("b", 32)]
    assert log == [("prepare", *c) for c in cells] + cells + cells[::-1]
    assert without_faults(out) == {c: dict(times=[5.0 + i, 12.0 - i], interleaved=True) for i, c in enumerate(cells)}


def test_interleave_lengths_runs_one_worker_per_mode(tmp_path, monkeypatch):
    """End to end: one worker per mode holds every model and length (so a decode sweep's lengths see the same
    drift of the machine), and every (model, length) gets its own record."""
    workers = []
    in_worker = bench.in_worker

    def counting(fn, cfg):
        workers.append(fn.args[1:])  # (names, seq_lens, mode)
        return in_worker(fn, cfg)
    monkeypatch.setattr(bench, "in_worker", counting)
    report = run_bench(tmp_path, "--models=moneta,transformer", "--seq_lens=16,32", "--modes=prefill,decode",
                       "--model_preset=tiny", "--interleave=true", "--interleave_lengths=true")
    assert workers == [(["moneta", "transformer"], [16, 32], mode) for mode in ("prefill", "decode")]
    assert sorted((r["model"], r["seq_len"], r["mode"]) for r in report["records"]) == sorted(
        (m, n, mode) for m in ("moneta", "transformer") for n in (16, 32) for mode in ("prefill", "decode"))
    for r in report["records"]:
        assert "oom" not in r and "error" not in r, r
        assert r["interleaved"] is True and r["tokens_per_s"] > 0


def test_a_failed_interleaved_worker_fails_every_model_of_it(tmp_path):
    report = run_bench(tmp_path, "--models=moneta,transformer", "--seq_lens=512", "--modes=train",
                       "--mem_limit_gb=0.008", "--tokens_per_step=2048", "--interleave=true")
    assert [r["model"] for r in report["records"]] == ["moneta", "transformer"]
    for rec in report["records"]:
        assert "oom" in rec and rec["tokens_per_s"] is None and rec["peak_mem_bytes"] is None


def test_op_shape_sets_the_ops_inputs_and_its_flop_count(tmp_path):
    """--op_shape=B,H,d,E: the op runs at that shape (here one 4-wide head, where compute is nil and the time is
    the host's), records it, and counts its FLOPs for it, per token of the batch: a quarter of the heads, a
    quarter of the FLOPs per token."""
    small = run_bench(tmp_path, "--op", "--seq_lens=64", "--op_impls=eager", "--op_shape=2,1,4,2")
    (tmp_path / "bench.json").unlink()
    wide = run_bench(tmp_path, "--op", "--seq_lens=64", "--op_impls=eager", "--op_shape=2,4,4,2")
    for report, H in ((small, 1), (wide, 4)):
        ours = [r for r in report["records"] if r["impl"] == "eager"]
        assert ours and all((r["B"], r["H"], r["d"], r["E"], r["chunk"]) == (2, H, 4, 2, 64) for r in ours)
    x, _ = bench.op_inputs(64, "l2", False, shape=bench.op_shape(bench.parse_args(["--op_shape=2,1,4,2"])))
    assert x[0].shape == (2, 1, 64, 4) and x[5][0].shape == (2, 1, 8, 4)  # q; the memory's first layer
    gflops = {H: {(r["retention"], r["mode"]): r["gflops"] / r["tokens_per_s"]
                  for r in rep["records"] if r["impl"] == "eager"} for H, rep in ((1, small), (4, wide))}
    for key, per_token in gflops[1].items():
        assert gflops[4][key] == pytest.approx(4 * per_token)


def test_op_profile_counts_host_ops_per_chunk(tmp_path):
    """--op --profile: each fast path's row has a profile of one warm call and its host ops per chunk (the
    reference, token by token, is not profiled); compiled chunks run fewer host ops per chunk than eager ones (one
    compiled graph per chunk and direction instead of every op of it), and per chunk the count does not grow with T
    (each call's fixed work spread over more chunks)."""
    report = run_bench(tmp_path, "--op", "--seq_lens=128,512", "--op_impls=eager,compiled_chunks,reference",
                       "--op_shape=1,1,4,2", "--profile=true")
    per_chunk = {}
    for r in report["records"]:
        if r["impl"] == "reference":
            assert "profile" not in r
        elif r["impl"] != "titans-pytorch":
            p = r["profile"]
            assert p["host_ops"] > 0 and p["host_ops_per_chunk"] == p["host_ops"] / (r["seq_len"] // 64)
            per_chunk[r["impl"], r["retention"], r["mode"], r["seq_len"]] = p["host_ops_per_chunk"]
            # compiled chunks' kernels are timed as such; eager chunks generate none. On a CPU compiled chunks run as
            # a scan whose loop is Inductor's C++ wrapper, which calls the matmuls past the profiler's records
            # (memory_core.SCAN_DEVICES): their time is the graph call's there
            parts = p["breakdown"]
            assert (parts["fused_s"] > 0) == (r["impl"] == "compiled_chunks")
            assert (parts["matmul_s"] > 0) == (r["impl"] == "eager")
    # the op ran in this process: the kernel records were a patch for its compiles, not left on
    assert not torch._inductor.config.cpp.enable_kernel_profile
    for retention in ("l2", "lq", "kl"):
        for mode in ("fwd", "fwd+bwd"):
            assert per_chunk["compiled_chunks", retention, mode, 512] < per_chunk["eager", retention, mode, 512]
            assert per_chunk["compiled_chunks", retention, mode, 512] <= per_chunk["compiled_chunks", retention, mode, 128]


def test_op_compiled_runs_every_rule_at_every_length(tmp_path):
    """--op_impls=compiled (the whole call under torch.compile, fullgraph) compiles each rule with and without grad,
    then with T dynamic: 12 graphs, past dynamo's recompile limit of 8 per code object, which a copy of the op's code
    per rule keeps each rule within (one code object for all of them failed at the third rule)."""
    report = run_bench(tmp_path, "--op", "--seq_lens=64,128", "--op_impls=compiled", "--op_shape=1,1,4,2")
    rows = {(r["retention"], r["seq_len"], r["mode"]) for r in report["records"] if r["impl"] == "compiled"}
    assert rows == {(ret, T, m) for ret in ("l2", "lq", "kl") for T in (64, 128) for m in ("fwd", "fwd+bwd")}
    assert all(r["tokens_per_s"] > 0 and r["compile"] for r in report["records"] if r["impl"] == "compiled")


def test_op_mode_measures_fast_path_and_reference(tmp_path):
    report = run_bench(tmp_path, "--op", "--seq_lens=64", "--op_impls=eager,reference")
    impls = {(r["impl"], r["retention"], r["mode"]) for r in report["records"] if r["impl"] != "titans-pytorch"}
    assert impls == {(i, ret, m) for i in ("eager", "reference") for ret in ("l2", "lq", "kl")
                     for m in ("fwd", "fwd+bwd")}
    for r in report["records"]:
        assert r["tokens_per_s"] > 0
    assert report["info"]["gemm_gflops"] > 0
    titans = [r for r in report["records"] if r["impl"] == "titans-pytorch"]
    try:
        import titans_pytorch  # noqa: F401
    except ImportError:
        assert not titans
    else:
        assert {(r["seq_len"], r["mode"]) for r in titans} == {(64, "fwd"), (64, "fwd+bwd")}


TINY = ["--models=transformer", "--seq_lens=16", "--modes=prefill", "--model_preset=tiny", "--tokens_per_step=32",
        "--repeats=1", "--warmup=0"]


@pytest.mark.parametrize("args, key", [
    (["--nope=1"], "--key=value"),
    (["models=moneta"], "--key=value"),
    (["--repeats"], "--key=value"),
    (["--seq_lens=0"], "--seq_lens"),
    (["--seq_lens=16,-32"], "--seq_lens"),
    (["--seq_lens="], "--seq_lens"),
    (["--seq_lens=16,,32"], "--seq_lens"),
    (["--seq_lens=16,abc"], "--seq_lens"),
    (["--seq_lens=1.5"], "--seq_lens"),
    (["--seq_lens=16,16"], "--seq_lens"),
    (["--op", "--seq_lens=0"], "--seq_lens"),
    (["--repeats=0"], "--repeats"),
    (["--repeats=two"], "--repeats"),
    (["--warmup=-1"], "--warmup"),
    (["--tokens_per_step=8"], "--tokens_per_step"),      # < seq_len 16: a batch of 0
    (["--tokens_per_step=0"], "--tokens_per_step"),
    (["--modes=decode", "--decode_tokens=0"], "--decode_tokens"),
    (["--decode_tokens=-1"], "--decode_tokens"),
    (["--vocab_size=0"], "--vocab_size"),
    (["--models=moneta,gpt"], "--models"),
    (["--models="], "--models"),
    (["--models=moneta,moneta"], "--models"),
    (["--modes=train,eval"], "--modes"),
    (["--modes=train,"], "--modes"),
    (["--op", "--op_impls=eager,fast"], "--op_impls"),
    (["--op", "--op_shape=1,4,64"], "--op_shape"),
    (["--op", "--op_shape=1,0,64,4"], "--op_shape"),
    (["--op", "--op_shape=1,4,x,4"], "--op_shape"),
    (["--model_preset=huge"], "--model_preset"),
    (["--models=moneta", "--model_args=recompute=false"], "unknown model_args key 'recompute'"),
    (["--models=moneta", "--model_args=recompute_inputs=maybe"], "recompute_inputs"),
    (["--models=moneta", "--model_args=chunk_size=0"], "--model_args"),
    (["--models=moneta", "--model_args=chunk_size"], "key=value"),
    (["--preset=tpu"], "--preset"),
    (["--dtype=float16"], "dtype"),
    (["--dtype=float64"], "--dtype"),
    (["--device=tpu"], "--device"),
    (["--device=cuda:x"], "--device"),
    (["--device="], "--device"),
    (["--mem_limit_gb=-1"], "--mem_limit_gb"),
    (["--mem_limit_gb=nan"], "--mem_limit_gb"),
    (["--compile=yes"], "--compile"),
    (["--compile_mode=fast"], "compile_mode must be one of"),
    (["--device=cpu", "--compile=true", "--compile_mode=reduce-overhead"], "captures CUDA graphs"),
    (["--compile=false", "--compile_mode=max-autotune-no-cudagraphs"], "add --compile=true"),
    (["--json="], "--json"),
    (["--op", "--interleave=true"], "--interleave"),
    (["--interleave_lengths=true"], "--interleave=true"),
    (["--op", "--compile=true", "--compile_mode=max-autotune-no-cudagraphs"], "--op_impls names"),
])
def test_impossible_argument_is_a_one_line_error(tmp_path, capsys, args, key):
    out = tmp_path / "bench.json"
    assert bench.main([*TINY, f"--json={out}", *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("bench.py: error: ") and captured.err.count("\n") == 1, captured.err
    assert key in captured.err and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_says_use_cpu(capsys):
    assert bench.main([*TINY, "--device=cuda"]) == 2
    assert "--device=cpu" in capsys.readouterr().err


def test_command_line_error_exits_2_with_one_line_on_stderr():
    proc = subprocess.run([sys.executable, "bench.py", "--seq_lens=0"], cwd=os.path.dirname(bench.__file__),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("bench.py: error: --seq_lens") and proc.stderr.count("\n") == 1, proc.stderr


def test_given_values_win_over_the_preset_and_lists_are_normalized():
    cfg = bench.parse_args(["--warmup=0", "--models= moneta ,yaad", "--seq_lens=512, 64", "--device=cpu"])
    assert cfg.warmup == 0 and cfg.repeats == bench.PRESETS["cpu"]["repeats"]  # 0 is a value, not "unset"
    assert cfg.models == "moneta,yaad" and cfg.seq_lens == "512,64" and cfg.dtype == "float32"
    op = bench.parse_args(["--op", "--seq_lens=16384"])  # tokens_per_step does not limit the op benchmark
    assert op.op and op.seq_lens == "16384"


def test_worker_start_method_spawns_for_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert bench.worker_start_method("cpu") == "forkserver"
    assert bench.worker_start_method("cuda") == "spawn" and bench.worker_start_method("cuda:1") == "spawn"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # CUDA initialized here: no fork at all
    assert bench.worker_start_method("cpu") == "spawn"


WORKER_AFTER_THREADED_OPS = """
import functools, sys
import torch
import bench
torch.set_num_threads(2)
x = torch.randn(64, 4096)
for _ in range(20):  # multi-threaded ops in this process first: OpenMP's thread pool exists at the fork
    torch.nn.functional.rms_norm(x, (4096,)).sum()
cfg = bench.parse_args(sys.argv[1:])
out, _ = bench.in_worker(functools.partial(bench.bench_model, cfg, "transformer", 16, "prefill"), cfg)
assert out["tokens_per_s"] > 0, out
"""


def test_a_cpu_worker_starts_after_threaded_ops_here():
    """A CPU worker started from a process that has already run multi-threaded ops (a test session, a script
    that benchmarks after other work) runs its job: a plain fork of such a process waited forever in the
    worker's first parallel op (OpenMP's pool, forked mid-state); CPU workers now fork from a fork server."""
    proc = subprocess.run([sys.executable, "-c", WORKER_AFTER_THREADED_OPS, *TINY, "--vocab_size=64"],
                          cwd=os.path.dirname(bench.__file__), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_worker_runs_under_spawn(tmp_path):
    cfg = bench.parse_args([*TINY, f"--json={tmp_path / 'bench.json'}"])
    job = functools.partial(bench.bench_model, cfg, "transformer", 16, "prefill")
    out, peak = bench.in_worker(job, cfg, method="spawn")
    assert "error" not in out and "oom" not in out, out
    assert out["tokens_per_s"] > 0 and out["batch_size"] == 2 and peak is not None


def test_titans_baseline_has_our_heads_head_width_and_memory_width():
    pytest.importorskip("titans_pytorch")
    H, d, E = bench.OP_SHAPE["H"], bench.OP_SHAPE["d"], bench.OP_SHAPE["E"]
    mem = bench.titans_memory()
    assert [tuple(s) for s in mem.init_weight_shape] == [(H, d), (H, d, E * d), (H, E * d, d)]
    assert mem.heads == H and mem.retrieve_chunk_size == mem.store_chunk_size == bench.OP_SHAPE["chunk"]


def test_header_names_the_cpu_and_its_vector_instructions(tmp_path):
    """On a CPU the device is the CPU's model name (Linux's cpuinfo), not the bare architecture platform gives,
    and every run records the SIMD level that ATen and Inductor's CPU code use: the machine the ratios hold on."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2\n")
    assert bench.cpu_name(str(cpuinfo)) == "AMD EPYC 7B13"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu\n")  # no model name (some ARM kernels): platform's answer
    assert bench.cpu_name(str(cpuinfo)) == (platform.processor() or platform.machine())
    assert bench.cpu_name(str(tmp_path / "absent")) == (platform.processor() or platform.machine())
    info = bench.header(bench.BenchConfig(device="cpu"))
    assert info["device_name"] == bench.cpu_name()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and info["cpu_capability"]
