"""The chunk loop's recomputing backward (the miras::chunk_loop operator, memory_core._chunk_loop) against plain
autograd through the same eager pieces (memory_core.RECOMPUTE_BACKWARD = False), in float64: every objective x
retention, T not a multiple of the chunk and T < chunk, a carried MemoryState in and out, momentum,
normalize_step; its compiled chunks; and that a training step and a decode step never make the host wait on the
device (CUDA-graph capture)."""
import collections
import gc
import itertools
import os
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import memory_core
from memory_core import OBJECTIVES, RETENTIONS, MemoryState, miras_memory
from test_memory_core import assert_close, grad_inputs, make_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def grads(inp, leaves, recompute, carried, fn=miras_memory, **kw):
    memory_core.RECOMPUTE_BACKWARD = recompute
    try:
        state = inp["state"]
        if carried:  # a chunk in progress: prefill 3 tokens without gradients, then continue from its state
            cut = {n: x[:, :, :3] if torch.is_tensor(x) and n not in ("ln_weight", "ln_bias") else x
                   for n, x in inp.items()}
            with torch.no_grad():
                _, st = _call(cut, fn, MemoryState.start(state, kw.get("momentum") is not None, kw["retention"],
                                                     kw.get("normalize_step", False)), **kw)
            state = st._replace(weights=tuple(w.clone().requires_grad_(True) for w in st.weights))
            leaves = dict(leaves, **{f"w{i}": w for i, w in enumerate(state.weights)})
        y, out = _call(inp, fn, state, **kw)
        g = torch.Generator().manual_seed(0)
        loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
        for w in (out.weights if isinstance(out, MemoryState) else out):
            loss = loss + (w * torch.randn(w.shape, generator=g, dtype=w.dtype)).sum()
        names = list(leaves)
        return y, dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)))
    finally:
        memory_core.RECOMPUTE_BACKWARD = True


def _call(inp, fn, state, **kw):
    mom = kw.pop("momentum", None)
    return fn(inp["q"], inp["k"], inp["v"], inp["eta"], inp["alpha"], state, inp["ln_weight"],
                        inp["ln_bias"], delta=inp["delta"] if kw["objective"] == "huber" else None,
                        momentum=inp["momentum"] if mom is not None else None, **kw)


@pytest.fixture(params=[1, 2], ids=["chunks_alone", "chunks_in_pairs"])
def chunks_per_group(request, monkeypatch):
    """The operator's chunks run alone (a CPU's default: compiled, consecutive whole chunks run as one scan,
    memory_core.SCAN_DEVICES) or in groups (memory_core.CHUNKS_PER_GROUP: 4 on CUDA; 2 here, so that a few chunks
    make groups, alone ones and a padded one; as on CUDA, no scan)."""
    monkeypatch.setattr(memory_core, "CHUNKS_PER_GROUP", {"cpu": request.param})
    if request.param > 1:
        monkeypatch.setattr(memory_core, "SCAN_DEVICES", ())
    return request.param


@pytest.fixture
def chunks_in_fours(monkeypatch):
    """Groups of four chunks and no scan, CUDA's way (memory_core.CHUNKS_PER_GROUP, SCAN_DEVICES), on the CPU."""
    monkeypatch.setattr(memory_core, "CHUNKS_PER_GROUP", {"cpu": 4})
    monkeypatch.setattr(memory_core, "SCAN_DEVICES", ())


@pytest.mark.parametrize("objective,retention", list(itertools.product(OBJECTIVES, RETENTIONS)))
@pytest.mark.parametrize("T,b,carried", [(11, 4, False), (3, 8, False), (13, 4, True)])
def test_recomputing_backward_equals_autograd(objective, retention, T, b, carried, chunks_per_group):
    inp = make_inputs(21, T=T, retention=retention)
    kw = dict(objective=objective, retention=retention, chunk_size=b)
    results = []
    for recompute in (True, False):
        x, leaves = grad_inputs(inp, objective, False)
        results.append(grads(x, leaves, recompute, carried, **kw))
    (y1, g1), (y2, g2) = results
    assert_close(y1, y2, rtol=0, atol=0, what="y")
    for name in g2:
        assert (g1[name] is None) == (g2[name] is None), name
        if g2[name] is not None:
            assert_close(g1[name], g2[name], rtol=1e-12, atol=1e-12, what=f"d/d{name}")


@pytest.mark.parametrize("objective,retention,extra", [("lp", "lq", dict(momentum=True)),
                                                       ("lp", "lq", dict(normalize_step=True)),
                                                       ("huber", "kl", dict(normalize_step=True))])
def test_recomputing_backward_momentum_and_normalized(objective, retention, extra, chunks_per_group):
    """With a carried state (kl: its lag pieces start the normalizer's running sum afresh)."""
    inp = make_inputs(22, T=10, retention=retention)
    kw = dict(objective=objective, retention=retention, chunk_size=4, **extra)
    results = []
    for recompute in (True, False):
        x, leaves = grad_inputs(inp, objective, "momentum" in extra)
        results.append(grads(x, leaves, recompute, True, **kw))
    (y1, g1), (y2, g2) = results
    assert_close(y1, y2, rtol=0, atol=0, what="y")
    for name in g2:
        if g2[name] is not None:
            assert_close(g1[name], g2[name], rtol=1e-12, atol=1e-12, what=f"d/d{name}")


def test_recomputing_backward_keeps_no_chunk_activations():
    """The autograd graph holds one node for the whole loop, not one per chunk operation."""
    inp = make_inputs(23, T=40, retention="l2")
    x, _ = grad_inputs(inp, "l2", False)
    y, _ = _call(x, miras_memory, x["state"], objective="l2", retention="l2", chunk_size=4)
    seen, stack, n_loop = set(), [y.grad_fn], 0
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        n_loop += "chunk_loop" in type(fn).__name__  # the miras::chunk_loop operator's backward node
        stack.extend(f for f, _ in fn.next_functions)
    assert n_loop == 1 and len(seen) < 60, (n_loop, len(seen))


def test_compiled_chunks_one_graph_for_every_length(chunks_in_fours):
    """compile_chunks pads short pieces to a whole chunk with no-op tokens: the padded pieces give eager's
    outputs and gradients (float64, kl: chunks from their lag token, one padded, and a lone lag token; alone and
    in a group of four), and a new length compiles nothing new."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    memory_core._COMPILED.clear()
    kw = dict(objective="huber", retention="kl", chunk_size=4)
    # T = 22: a group of four chunks, then two chunks alone, one padded; T = 9: two chunks alone, then a lone lag token
    for T in (9, 22):
        x, leaves = grad_inputs(make_inputs(24, T=T, retention="kl"), "huber", False)
        y, g = grads(x, leaves, True, False, **kw)
        y_c, g_c = grads(x, leaves, True, False, compile_chunks=True, **kw)
        assert_close(y_c, y, rtol=1e-10, atol=1e-11, what="compiled y")
        for name in g:
            assert_close(g_c[name], g[name], rtol=1e-9, atol=1e-10, what=f"compiled d/d{name}")
    n_graphs = counters["stats"]["unique_graphs"]
    # 15: a group, its last chunk padded; 37: two groups, a chunk alone, a lone lag token; 46: three groups
    for T in (15, 37, 46):
        x, leaves = grad_inputs(make_inputs(25, T=T, retention="kl"), "huber", False)
        grads(x, leaves, True, False, compile_chunks=True, **kw)
    assert counters["stats"]["unique_graphs"] == n_graphs, "a new length compiled a new graph"



@pytest.mark.parametrize("objective,retention,extra", [("huber", "l2", {}), ("lp", "lq", dict(momentum=True)),
                                                       ("l2", "kl", dict(normalize_step="gain"))])
def test_compiled_chunks_from_a_carried_state_equal_eager(objective, retention, extra, chunks_per_group):
    """Compiled chunks cut their inputs once per call into whole chunks (memory_core._chunked_split): a first piece
    that continues the carried state's chunk, whole chunks, a padded last one, and for kl a lone lag token at the
    end (T = 10 after 3 carried tokens of a chunk of 4: 1 + 4 + 4 + 1) or a padded lag chunk (T = 12), with
    momentum and the normalized step, over several memories (B = H = 2): outputs and gradients equal eager's
    (float64), forward and recomputing backward."""
    torch._dynamo.reset()
    kw = dict(objective=objective, retention=retention, chunk_size=4, **extra)
    for T in (10, 12):
        x, leaves = grad_inputs(make_inputs(28, B=2, T=T, retention=retention), objective, "momentum" in extra)
        y, g = grads(x, leaves, True, True, **kw)
        y_c, g_c = grads(x, leaves, True, True, compile_chunks=True, **kw)
        assert_close(y_c, y, rtol=1e-10, atol=1e-11, what=f"compiled y at T={T}")
        for name in g:
            assert_close(g_c[name], g[name], rtol=1e-9, atol=1e-10, what=f"compiled d/d{name} at T={T}")

def test_compiled_chunks_inside_a_compiled_model_compile_on_the_first_step_only(chunks_on_aot_eager):
    """A whole-model compile (compile_memory None: its chunks compiled too) builds every chunk graph in the first
    training step: the forward and the backward's recompute. Later steps reuse them (the forward kernel used to
    see its inputs with another dispatch key set after the first call: one more graph on the second step)."""
    from torch._dynamo.utils import counters
    from models import build_model
    torch._dynamo.reset()
    memory_core._COMPILED.clear()
    torch.manual_seed(0)
    model = build_model("moneta", "tiny", n_layer=1, n_embd=32, n_head=2, vocab_size=32, block_size=32,
                        chunk_size=16)
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(32, (2, 33))
    graphs = []
    for _ in range(3):
        _, loss = compiled(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        graphs.append(counters["stats"]["unique_graphs"])
    assert memory_core._COMPILED, "the chunks ran eagerly inside a compiled model"
    assert graphs[0] == graphs[1] == graphs[2], f"graphs compiled after steps 1, 2, 3: {graphs}"


@pytest.mark.parametrize("objective,retention", [("lp", "lq"), ("l2", "kl")])
def test_scanned_chunks_compile_once_for_every_number_of_chunks(objective, retention, chunks_on_aot_eager):
    """On a CPU (memory_core.SCAN_DEVICES) a call's whole chunks run as one scan (_scan_run) with the number of
    chunks dynamic: its forward and its backward (_scan_run_grads) compile once for 3, 5 (a padded last one) and
    6 chunks, nothing else compiles (for kl: a lag chunk at every chunk start), and outputs and gradients equal
    eager's (float64). The compiler is a counting aot_eager (Inductor's code for the scan: the other compiled-chunk
    tests)."""
    assert "cpu" in memory_core.SCAN_DEVICES
    torch._dynamo.reset()
    kw = dict(objective=objective, retention=retention, chunk_size=4)
    for T in (12, 19, 24):
        x, leaves = grad_inputs(make_inputs(31, T=T, retention=retention), objective, False)
        y, g = grads(x, leaves, True, False, **kw)
        y_c, g_c = grads(x, leaves, True, False, compile_chunks=True, **kw)
        assert_close(y_c, y, rtol=1e-10, atol=1e-11, what=f"scanned y at T={T}")
        for name in g:
            assert_close(g_c[name], g[name], rtol=1e-9, atol=1e-10, what=f"scanned d/d{name} at T={T}")
    assert sorted(fn.__name__ for fn, _ in memory_core._COMPILED) == ["_scan_run", "_scan_run_grads"]
    assert chunks_on_aot_eager.frame_count == 2, f"{chunks_on_aot_eager.frame_count} graphs for 3, 5 and 6 chunks"


def test_scanned_chunks_from_a_start_state_of_one_tensor(chunks_on_aot_eager):
    """A scan refuses carried inputs that alias each other, and a start state can be views of one buffer (here both
    weight matrices are one tensor, expansion 1): the scanned chunks run from it as from any other, forward and
    backward, and equal eager (float64; a counting aot_eager compiles the scan: it checks the aliasing as Inductor
    does)."""
    torch._dynamo.reset()
    kw = dict(objective="lp", retention="lq", chunk_size=4)
    x, leaves = grad_inputs(make_inputs(32, T=12, E=1, retention="lq"), "lp", False)
    x["state"] = (x["state"][0], x["state"][0])
    y, g = grads(x, leaves, True, False, **kw)
    y_c, g_c = grads(x, leaves, True, False, compile_chunks=True, **kw)
    assert_close(y_c, y, rtol=1e-10, atol=1e-11, what="scanned y")
    for name in g:
        assert_close(g_c[name], g[name], rtol=1e-9, atol=1e-10, what=f"scanned d/d{name}")
    assert chunks_on_aot_eager.frame_count == 2


def test_a_scan_that_compiles_leaves_its_inputs_to_no_reference_cycle(chunks_on_aot_eager):
    """Dynamo's tracer keeps the inputs of a call it compiles in reference cycles, for a scan the whole call's
    chunk-major stacks and saved starts: the scanned call that compiled collects them, so that none waits for
    Python's next full collection (automatic collection off here; 3 chunks of 4: a stack is [3, N, 4, ...])."""
    torch._dynamo.reset()
    x, leaves = grad_inputs(make_inputs(33, T=12, retention="lq"), "lp", False)
    gc.collect()
    gc.disable()
    try:
        grads(x, leaves, True, False, compile_chunks=True, objective="lp", retention="lq", chunk_size=4)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [tuple(o.shape) for o in gc.garbage if type(o) is torch.Tensor and o.dim() > 1 and o.shape[0] == 3]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert chunks_on_aot_eager.frame_count == 2
    assert not left, f"the scans' inputs left in reference cycles: {left}"


@pytest.mark.parametrize("objective,retention,T", [("lp", "lq", 9), ("l2", "kl", 6)])
def test_compiled_chunks_with_the_gauss_newton_step(objective, retention, T):
    """The Gauss-Newton step inside compiled, padded pieces: the padded no-op tokens (k = 0) have no step and
    no gradient (its ratios are 0 / floor there, not 0 / 0), and outputs and gradients are eager's (float64);
    also with kl (Memora's default rule): a chunk from its lag token, then a padded one."""
    kw = dict(objective=objective, retention=retention, chunk_size=4, normalize_step="gauss_newton")
    x, leaves = grad_inputs(make_inputs(26, T=T, retention=retention), objective, False)
    y, g = grads(x, leaves, True, False, **kw)
    y_c, g_c = grads(x, leaves, True, False, compile_chunks=True, **kw)
    assert_close(y_c, y, rtol=1e-10, atol=1e-11, what="compiled y")
    for name in g:
        assert torch.isfinite(g_c[name]).all(), name
        assert_close(g_c[name], g[name], rtol=1e-9, atol=1e-10, what=f"compiled d/d{name}")


def test_compiled_chunks_do_not_assert_their_inputs_again():
    """Dynamo guards a chunk graph's inputs (static shapes and strides), so its Inductor code does not assert each
    input's size and stride again on every call, host work paid once per chunk (the generated code of a training
    call's forward and recomputing backward, Inductor's cache off so that the code is generated)."""
    from torch._inductor.utils import run_and_get_code
    memory_core._COMPILED.clear()
    x, leaves = grad_inputs(make_inputs(26, T=6, retention="l2"), "l2", False)
    with torch._inductor.config.patch(fx_graph_cache=False):
        _, codes = run_and_get_code(grads, x, leaves, True, False, objective="l2", retention="l2", chunk_size=4,
                                    compile_chunks=True)
    assert len(codes) >= 2  # the forward's chunk and the backward's recompute and vjp
    assert not [c for c in codes if "assert_size_stride(" in c]


def test_compiled_chunks_graph_count_is_bounded_per_rule_without_a_recompile_limit_patch(chunks_in_fours,
                                                                                         chunks_on_aot_eager):
    """Each (rule, shapes but T's, dtype) gets its own compiled copy of each kind of group of pieces' forward
    (memory_core._run_group) and backward (its recompute and vjp, memory_core._group_grads), with at most two
    graphs each, so a process that trains and evaluates several rules stays within dynamo's default budget of 8 per
    function (fullgraph makes running past it an error), and a new length compiles nothing."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    memory_core._COMPILED.clear()
    counters.clear()
    rules = [("l2", "l2"), ("lp", "lq"), ("huber", "kl"), ("dot", "l2")]

    def run_all(T):
        for objective, retention in rules:
            kw = dict(objective=objective, retention=retention, chunk_size=4, compile_chunks=True)
            x, leaves = grad_inputs(make_inputs(26, T=T, retention=retention), objective, False)
            grads(x, leaves, True, False, **kw)  # train: forward + recomputing backward
            with torch.no_grad():  # evaluation, another batch size
                one = {n: t[:1] if torch.is_tensor(t) and n not in ("ln_weight", "ln_bias") else t
                       for n, t in x.items()}
                one["state"] = tuple(w[:1] for w in x["state"])
                _call(one, miras_memory, one["state"], **kw)
    run_all(21)
    n_graphs = counters["stats"]["unique_graphs"]
    assert n_graphs > 8  # more than one function's default budget in this process, and no error
    assert n_graphs <= 2 * len(memory_core._COMPILED), (n_graphs, len(memory_core._COMPILED))
    # one per kind of group of the 21 tokens in chunks of 4 (l2, dot, lq: four chunks from their start, then such
    # chunks alone; kl: the same from their lag token, and the lone lag token): the forward's for the training and
    # the evaluation batch, the backward's for training
    assert len(memory_core._COMPILED) == 2 * 9 + 9
    for T in (14, 6, 30):
        run_all(T)
    assert counters["stats"]["unique_graphs"] == n_graphs, "a new length compiled a new graph"


def test_compiled_chunks_of_one_memory_compile_nothing_for_a_new_length(chunks_on_aot_eager):
    """B = H = 1: a whole chunk cut from one memory's inputs is contiguous whatever its stride along the size-1
    memory dimension (the input's T * d), and dynamo guards on that stride too. More lengths than dynamo's
    recompile limit, forward and recomputing backward, compile no new graph (they were one graph per length, then
    a hard failure under fullgraph)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    memory_core._COMPILED.clear()
    counters.clear()
    kw = dict(objective="l2", retention="l2", chunk_size=4, compile_chunks=True)
    seen = []
    for T in range(9, 9 + 4 * 10, 4):  # 10 lengths, each a padded last chunk after whole ones
        x, leaves = grad_inputs(make_inputs(27, B=1, H=1, T=T), "l2", False)
        grads(x, leaves, True, False, **kw)
        seen.append(counters["stats"]["unique_graphs"])
    assert seen == seen[:1] * len(seen), f"graphs after each length: {seen}"


@pytest.mark.parametrize("name", ["moneta", "memora"])
def test_whole_model_compile_sees_one_node_for_the_memory(name):
    """torch.compile of a whole model traces the chunk loop as one operator (miras::chunk_loop): the traced
    graph has the same number of ops at 64 and 200 tokens (before the operator it unrolled every chunk), and
    the compiled model's loss and gradients equal eager's (float64, aot_eager: the same kernels)."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from models import build_model
    torch.manual_seed(0)
    # eager chunks inside the traced operator (compile_memory None would compile them inside a whole-model compile:
    # other kernels, not equal to the last bit; the compiled chunks have their own tests)
    model = build_model(name, "tiny", n_layer=1, vocab_size=32, block_size=256, chunk_size=16,
                        compile_memory=False).double()
    ops = []
    for T in (64, 200):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        idx = torch.randint(32, (2, T + 1))
        grads = []
        for fn in (compiled, model):
            model.zero_grad()
            _, loss = fn(idx[:, :-1], idx[:, 1:])
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        (loss_c, g_c), (loss_e, g_e) = grads
        assert_close(loss_c, loss_e, rtol=1e-12, atol=1e-12, what="compiled loss")
        for a, b in zip(g_c, g_e):
            assert_close(a, b, rtol=1e-10, atol=1e-12, what="compiled grad")
        assert counter.frame_count == 1
        ops.append(counter.op_count)
    assert ops[0] == ops[1], f"the traced graph grew with T: {ops}"


@pytest.mark.parametrize("name", ["moneta", "memora"])
def test_aot_graphs_do_not_grow_with_the_length(name):
    """What Inductor compiles is AOTAutograd's forward and backward graphs, which hold everything the backward
    keeps: the operator saves its piece starts as one stacked tensor per state slot, so both graphs have the
    same nodes at 64 and 200 tokens (with one saved tensor per piece they grew with T / chunk_size, and the
    compile time with them)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from models import build_model
    torch.manual_seed(0)
    # eager chunks inside the operator: compiling them (compile_memory None, inside a whole-model compile) costs
    # an Inductor compile and changes nothing counted here (the operator is one node either way)
    model = build_model(name, "tiny", n_layer=1, vocab_size=32, block_size=256, chunk_size=16,
                        compile_memory=False).double()
    sizes = []
    for T in (64, 200):
        torch._dynamo.reset()
        seen = {}

        def keep(kind):
            def compiler(gm, example_inputs):
                seen[kind] = len(gm.graph.nodes)
                return make_boxed_func(gm.forward)
            return compiler
        compiled = torch.compile(model, backend=aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw")),
                                 fullgraph=True)
        idx = torch.randint(32, (2, T + 1))
        _, loss = compiled(idx[:, :-1], idx[:, 1:])
        loss.backward()
        sizes.append((seen["fw"], seen["bw"]))
    assert sizes[0] == sizes[1], f"forward / backward graph nodes at 64 and 200 tokens: {sizes}"


@pytest.mark.parametrize("objective,retention", [("l2", "l2"), ("lp", "lq"), ("huber", "kl")])
def test_traced_operator_gradients_equal_eager(objective, retention):
    """miras_memory traced whole by torch.compile (aot_eager: the same kernels, so equal to the last bit):
    the operator's fake outputs, saved piece starts and backward line up for several pieces (T 10, chunk 4)."""
    inp = make_inputs(26, T=10, retention=retention)
    kw = dict(objective=objective, retention=retention, chunk_size=4)
    x, leaves = grad_inputs(inp, objective, False)
    y, g = grads(x, leaves, True, False, **kw)
    torch._dynamo.reset()
    traced = torch.compile(miras_memory, backend="aot_eager", fullgraph=True)
    y_c, g_c = grads(x, leaves, True, False, fn=traced, **kw)
    assert_close(y_c, y, rtol=0, atol=0, what="traced y")
    for name in g:
        if g[name] is not None:
            assert_close(g_c[name], g[name], rtol=0, atol=0, what=f"traced d/d{name}")


def test_flop_counter_counts_the_operator():
    """torch's FlopCounterMode sees inside the chunk-loop operator through its registered formula: the forward
    counts memory_core.chunk_flops per token and head, the backward three times that (recompute + backward)."""
    from torch.utils.flop_counter import FlopCounterMode
    inp = make_inputs(27, T=11, retention="l2")
    x, leaves = grad_inputs(inp, "l2", False)
    B, H, T, d = x["q"].shape
    E = x["state"][0].shape[-2] // d
    per_call = B * H * T * memory_core.chunk_flops(d, E, "mlp", False, 4)
    with FlopCounterMode(display=False) as counter:
        y, _ = _call(x, miras_memory, x["state"], objective="l2", retention="l2", chunk_size=4)
    assert counter.get_total_flops() == per_call > 0
    with FlopCounterMode(display=False) as counter:
        y.sum().backward()
    assert counter.get_total_flops() == 3 * per_call


@pytest.mark.parametrize("compile_chunks", [False, True])
def test_traced_operator_with_a_new_batch_size_or_length(compile_chunks, chunks_on_aot_eager):
    """A whole-model compile that meets a second batch size or length (training on B / world rows per rank,
    evaluating on B: dynamo then marks those sizes dynamic) traces the operator with symbolic shapes: its fake
    implementation must plan without building the compiled chunk functions, whose cache key needs concrete
    shapes (it raised "unhashable type: SymInt"). Outputs and gradients stay eager's (float64)."""
    kw = dict(objective="l2", retention="l2", chunk_size=4, compile_chunks=compile_chunks)
    torch._dynamo.reset()
    traced = torch.compile(miras_memory, backend="aot_eager", fullgraph=True)
    for seed, (B, T) in enumerate([(2, 6), (3, 6), (3, 9)]):
        x, leaves = grad_inputs(make_inputs(40 + seed, B=B, T=T), "l2", False)
        y, g = grads(x, leaves, True, False, **kw)
        y_c, g_c = grads(x, leaves, True, False, fn=traced, **kw)
        assert_close(y_c, y, rtol=1e-10, atol=1e-11, what=f"traced y at B={B}, T={T}")
        for name in g:
            assert_close(g_c[name], g[name], rtol=1e-9, atol=1e-10, what=f"traced d/d{name} at B={B}, T={T}")


@pytest.mark.parametrize("retention,chunks", [("l2", 1), ("kl", 4)])
def test_traced_operator_compiles_no_graph_per_number_of_chunks(retention, chunks, monkeypatch):
    """A whole-model compile that has met two lengths traces the operator with a symbolic T; the fake
    implementation sizes the saved piece starts by arithmetic on T (memory_core._saved_counts), not by walking the
    plan, whose comparisons guarded on T's range: a new graph for every number of chunks, until dynamo's recompile
    limit (a hard failure under fullgraph). What is left are guards on a few cases (one saved group, which changes
    the buffers' contiguity; kl in groups of four: T mod 4 = 1, a lone last lag token), met by the first lengths:
    ten more, each another number of chunks of 4, compile nothing. Outputs and gradients stay eager's (float64),
    and the arithmetic counts what the plan's groups save."""
    from torch._dynamo.testing import CompileCounterWithBackend
    layout = [2, 2, 2, 2, -1]  # weights, anchor, norms, momentum; no grad_sum
    for b, pos, has_lag, size, T in itertools.product((1, 3, 4), range(4), (False, True), (1, 2, 4), range(1, 30)):
        if pos < b:
            plan = memory_core._plan(T, pos, b, has_lag)
            groups = memory_core._groups(plan, size)
            saved = [sum(row[j] for row in memory_core._saved_slots(plan, groups, layout)) for j in range(8)]
            assert memory_core._saved_counts(T, pos, b, has_lag, size, layout) == saved, (b, pos, has_lag, size, T)
    monkeypatch.setattr(memory_core, "CHUNKS_PER_GROUP", {"cpu": chunks})
    objective = "huber" if retention == "kl" else "l2"
    kw = dict(objective=objective, retention=retention, chunk_size=4)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    traced = torch.compile(miras_memory, backend=counter, fullgraph=True)
    # the first lengths: each case once (one saved group or more, each with and without a lone lag token)
    for T in (6, 9, 13, 17, 22, 25, 30) + (34, 38, 41, 46, 49, 54, 57, 62, 65, 70):
        if T == 34:
            graphs = counter.frame_count
        x, leaves = grad_inputs(make_inputs(41, T=T, retention=retention), objective, False)
        if T in (6, 9, 38, 41):  # eager first: it imports the rule's model file, which dynamo does not trace
            y, g = grads(x, leaves, True, False, **kw)
            y_c, g_c = grads(x, leaves, True, False, fn=traced, **kw)
            assert_close(y_c, y, rtol=1e-10, atol=1e-11, what=f"traced y at T={T}")
            for name in g:
                assert_close(g_c[name], g[name], rtol=1e-9, atol=1e-10, what=f"traced d/d{name} at T={T}")
        else:
            grads(x, leaves, True, False, fn=traced, **kw)
    assert counter.frame_count == graphs, f"{counter.frame_count - graphs} graphs for ten more lengths"


@pytest.mark.parametrize("compile_chunks", [False, True])
def test_recomputing_backward_through_the_state_alone(compile_chunks):
    """A loss on the state after the call only (y unused: its gradient is None, and so are the saved piece
    starts', which autograd no longer fills with zeros): the recomputing backward equals plain autograd
    (float64, lq with momentum, eager and compiled chunks)."""
    kw = dict(objective="lp", retention="lq", chunk_size=4, compile_chunks=compile_chunks)
    results = []
    for recompute in (True, False):
        memory_core.RECOMPUTE_BACKWARD = recompute
        try:
            x, leaves = grad_inputs(make_inputs(29, T=10, retention="lq"), "lp", True)
            _, out = _call(x, miras_memory, x["state"], momentum=True, **kw)
            g = torch.Generator().manual_seed(1)
            loss = sum((w * torch.randn(w.shape, generator=g, dtype=w.dtype)).sum() for w in out)
            results.append(torch.autograd.grad(loss, list(leaves.values()), allow_unused=True))
        finally:
            memory_core.RECOMPUTE_BACKWARD = True
    for (name, leaf), got, want in zip(leaves.items(), *results):  # q reads only: None from autograd, 0 from the op
        zero = torch.zeros_like(leaf)
        assert_close(zero if got is None else got, zero if want is None else want, rtol=1e-10, atol=1e-11,
                     what=f"d/d{name}")


def _vjp_of(fn, cotangent):
    """xs -> (fn(xs), its vjp with `cotangent`), through torch.func.vjp as the compiled chunk backward runs it."""
    def run(*xs):
        out, pull = torch.func.vjp(fn, *xs)
        return out, pull(cotangent)
    return run


@pytest.mark.parametrize("product", ["nt", "tn", "gram"])
def test_layout_keeping_products_equal_matmul_with_row_major_gradients(product):
    """The compiled chunks' products (memory_core._mm_nt, _mm_tn) go through autograd Functions whose gradients
    are row-major: the same values as autograd through the plain matmul (float64, awkward shapes), eager and
    under torch.compile through torch.func.vjp, as the compiled backward runs them: on operands computed inside
    the differentiated function, for which dynamo runs a Function's own backward (for a primal it differentiates
    the Function's forward instead, pytorch/pytorch#193279)."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    b = {"nt": (3, 6, 7), "tn": (3, 5, 6), "gram": None}[product]
    leaves = (a,) if b is None else (a, torch.randn(*b, generator=g, dtype=torch.float64))
    plain = {"nt": lambda a, b: a @ b.transpose(-1, -2), "tn": lambda a, b: a.transpose(-1, -2) @ b,
             "gram": lambda a: a @ a.transpose(-1, -2)}[product]
    fast = {"nt": memory_core._mm_nt, "tn": memory_core._mm_tn, "gram": lambda a: memory_core._mm_nt(a, a)}[product]
    function = {"nt": memory_core._MatmulNT, "tn": memory_core._MatmulTN, "gram": memory_core._Gram}[product]
    cotangent = torch.randn(plain(*leaves).shape, generator=g, dtype=torch.float64)

    def computed(fn):  # the operands doubled inside the differentiated function
        return lambda *xs: fn(*(2.0 * t for t in xs))
    want_y, want_g = _vjp_of(plain, cotangent)(*leaves)
    xs = [t.clone().requires_grad_(True) for t in leaves]
    y = function.apply(*xs)
    assert_close(y, want_y, rtol=1e-13, atol=1e-13, what="eager y")
    for got, want in zip(torch.autograd.grad(y, xs, cotangent), want_g):
        assert got.is_contiguous(), "a gradient in a transposed layout"
        assert_close(got, want, rtol=1e-13, atol=1e-13, what="eager gradient")
    want_y, want_g = _vjp_of(computed(plain), cotangent)(*leaves)
    y_c, g_c = torch.compile(_vjp_of(computed(fast), cotangent), fullgraph=True, dynamic=False)(*leaves)
    assert_close(y_c, want_y, rtol=1e-13, atol=1e-13, what="compiled y")
    for got, want in zip(g_c, want_g):
        assert_close(got, want, rtol=1e-13, atol=1e-13, what="compiled gradient")


def test_compiled_gelu_from_normal_parts_equals_aten_gelu_and_its_derivatives():
    """In the compiled recompute (torch.compile, grad on) the memory's gelu and gelu' come from
    memory_core._NormalParts (Phi and phi once per pre-activation, its own backward): the same values as aten's gelu
    and gelu backward, and the same vjp through both (which takes gelu'' for the slope's input), float64, at 0, in
    both tails and around the bend. The pre-activation is a product inside the differentiated function, as in the
    chunk recompute: dynamo runs a Function's own backward under torch.func.vjp only for inputs computed there (for
    a primal it differentiates the Function's forward instead, pytorch/pytorch#193279)."""
    g = torch.Generator().manual_seed(5)
    z = torch.cat([torch.tensor([0.0, -9.0, 9.0, -40.0, 40.0, 1e-8]), torch.randn(3 * 5 * 7 - 6, generator=g)])
    z = (z * 1.5).view(3, 5, 7).to(torch.float64)
    scale = torch.rand(3, 1, 1, generator=g, dtype=torch.float64) + 0.5
    x = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    cotangents = [torch.randn(3, 5, 7, generator=g, dtype=torch.float64) for _ in range(2)]

    def plain(z, scale, x):
        z = z * scale
        return F.gelu(z), torch.ops.aten.gelu_backward(x, z)

    def fast(z, scale, x):
        a, record = memory_core._gelu(z * scale)
        return a, memory_core._gelu_vjp(x, record)

    want_y, want_g = _vjp_of(plain, tuple(cotangents))(z, scale, x)
    got_y, got_g = torch.compile(_vjp_of(fast, tuple(cotangents)), fullgraph=True, dynamic=False)(z, scale, x)
    for got, want, what in ((got_y, want_y, "gelu, gelu' x"), (got_g, want_g, "d/dz, d/dscale, d/dx")):
        for a, b in zip(got, want):
            assert_close(a, b, rtol=1e-13, atol=1e-13, what=f"compiled {what}")
    zz = z.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(memory_core._NormalParts.apply, (zz,)), "the Function's backward"


class _HostSyncSpy(TorchDispatchMode):
    """Records the aten calls that make the host wait on the device (a tensor's value read on the host: .item(),
    bool(), a data-dependent shape) or copy host data to it (torch.tensor / as_tensor of Python values), neither
    of which a CUDA-graph capture allows, including those inside the miras::chunk_loop operators, whose kernels
    it runs under itself (a dispatch mode is off inside the ops it handles), and the scan of compiled chunks on a
    CPU, run eagerly (memory_core._scan_run), whose loop it runs under itself likewise."""
    supports_higher_order_operators = True
    SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
             torch.ops.aten.equal.default, torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default,
             torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}

    def __init__(self):
        super().__init__()
        self.syncs, self.inside_loop = collections.Counter(), 0  # (op, the repo's line that called it): count
        self.loop = {"chunk_loop": memory_core._chunk_loop, "chunk_loop_backward": memory_core._chunk_loop_backward}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SYNCS:
            ours = [f for f in traceback.extract_stack() if os.path.dirname(os.path.abspath(f.filename)) == ROOT]
            self.syncs[func.__name__, f"{os.path.basename(ours[-1].filename)}:{ours[-1].lineno}" if ours else "?"] += 1
        if func is torch.ops.higher_order.scan:
            from torch._higher_order_ops.scan import _extract_carry_and_out, generic_scan  # the scan's eager loop
            combine_fn, init, xs, additional_inputs = args
            with self:
                return _extract_carry_and_out(generic_scan(combine_fn, init, xs, additional_inputs=additional_inputs),
                                              len(init))
        if func.namespace == "miras" and func._opname in self.loop:
            self.inside_loop += 1
            with self:
                return self.loop[func._opname]._init_fn(*args, **kwargs)
        return func(*args, **kwargs)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name, preset", [("moneta", "tiny"), ("yaad", "tiny"), ("memora", "tiny"),
                                          ("moneta", "tiny+titans_lmm"), ("yaad", "tiny+hybrid")])
def test_training_step_and_decode_step_never_wait_on_the_device(name, preset, padded, monkeypatch):
    """The engine issue: no host synchronization inside the chunk loop, so that a GPU can capture a training step
    (or a decode step) as CUDA graphs. A Miras LM's forward + backward (T = 150: two whole chunks and a partial
    one) and eight decode steps across a chunk boundary read no tensor value on the host and make no tensor from
    host data; also with momentum (titans_lmm) and in a hybrid with sliding-window attention. padded: the compiled
    chunks' host path (pieces cut once and padded to a chunk, end-row fills), with the chunk functions left eager
    so that the spy sees into them."""
    from models import build_model
    import sample
    if padded:
        monkeypatch.setattr(memory_core, "_compiled", lambda fn, key: fn)
    torch.manual_seed(0)
    model = build_model(name, preset, vocab_size=64, block_size=300, compile_memory=padded)
    idx = torch.randint(64, (2, 151))
    spy = _HostSyncSpy()
    with spy:
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
    assert spy.inside_loop == 2 * model.config.layers.count("M"), "the spy did not run the chunk loop's kernels"
    assert not spy.syncs, f"host syncs or host data in a training step: {dict(spy.syncs)}"
    model.eval()
    cache = model.init_cache(1, 300, "cpu", torch.float32)
    step = sample.make_step(model)
    with torch.no_grad():
        model.prefill(idx[:1, :60], cache)
        tok = idx[:1, 60:61]
        with spy:
            for _ in range(8):  # positions 60-67: a chunk's first token (64) among them
                tok, _ = step(tok, cache)
    assert not spy.syncs, f"host syncs or host data in a decode step: {dict(spy.syncs)}"
