"""eval.py: the lm-evaluation-harness adapter against the model's own forward (float64), rolling log-likelihood
against the model's loss past the block size, generate_until against sample.py's greedy decoding, an offline task
end to end through lm_eval.simple_evaluate, one-line errors.

Checkpoints: tiny models (2 layers x 32, context BLOCK) saved with train.save_checkpoint and the keys train.py
writes, for every model, a hybrid and both tokenizers; the generation tests use a one-layer Moneta trained for a
few steps by train.train (a random model's greedy text is often one repeated character)."""
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

import eval as lm_eval_py
import models
import sample
import train
from conftest import write_word_dataset
from data import prepare_eval

BLOCK = 16
TEXT = "the quick brown fox jumps over the lazy dog. " * 4  # longer than BLOCK in either tokenizer


def char_meta(text):
    itos = sorted(set(text) | {"\n"})
    return {"tokenizer": "char", "vocab_size": len(itos), "itos": itos, "eot": None}


GPT2_META = {"tokenizer": "gpt2", "vocab_size": 50257, "eot": 50256}


def save_ckpt(directory, name, meta, variant=None):
    """A random-init tiny checkpoint holding what train.py's save() writes that loading needs."""
    vocab = meta["vocab_size"] if meta["tokenizer"] == "char" else 50304
    preset = "tiny" + (f"+{variant}" if variant else "")
    extra = dict(chunk_size=4, gate_rank=8, window=8) if name != "transformer" else {}
    cfg = models.make_config(name, preset, n_layer=2, n_embd=32, n_head=2, block_size=BLOCK, vocab_size=vocab,
                             **extra)
    torch.manual_seed(0)
    model = models.build_model(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    train.save_checkpoint({"model": model.state_dict(), "model_name": name, "model_config": cfg.to_dict(),
                           "iter_num": 0, "dataset": {"dir": None, "meta": meta}}, directory / "ckpt.pt")
    return str(directory)


def adapter(out_dir, dtype="float64", batch_size=3):
    return lm_eval_py.MirasLM(sample.load_model(out_dir, device="cpu", dtype=dtype), batch_size=batch_size)


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0, metadata=("test", i, 1))
            for i, a in enumerate(args)]


def model_logprob(lm, context, continuation):
    """log P(continuation | context) and greedy-ness from one forward of the model on this request alone
    (the tokens split as the harness's HF model splits them; full attention sees its last BLOCK inputs)."""
    tok, model = lm.tok, lm.model
    n_spaces = len(context) - len(context.rstrip())  # the harness moves a context's trailing spaces over
    context, continuation = context[:len(context) - n_spaces], context[len(context) - n_spaces:] + continuation
    whole, n_ctx = tok.encode(context + continuation), len(tok.encode(context))
    if not context:
        whole, n_ctx = [lm.eot_token_id] + tok.encode(continuation), 1
    inputs = whole[:-1][-BLOCK:] if lm.max_length else whole[:-1]
    with torch.no_grad():
        logp = model(torch.tensor([inputs]))[0][0].log_softmax(-1)
    n = len(whole) - n_ctx
    scored, targets = logp[len(inputs) - n:], torch.tensor(whole[n_ctx:])
    greedy = bool((scored[:, :tok.vocab_size].argmax(-1) == targets).all())
    return float(scored.gather(-1, targets[:, None]).sum()), greedy


# ---------------------------------------------------------------------------------------------- scoring

CASES = [("moneta", "char", None), ("yaad", "char", None), ("memora", "char", None), ("transformer", "char", None),
         ("moneta", "char", "hybrid"), ("moneta", "gpt2", None), ("transformer", "gpt2", None)]


@pytest.mark.parametrize("name,kind,variant", CASES, ids=["-".join(filter(None, c)) for c in CASES])
def test_loglikelihood_equals_the_models_logprobs(name, kind, variant, tmp_path, one_thread):
    meta = char_meta(TEXT) if kind == "char" else GPT2_META
    lm = adapter(save_ckpt(tmp_path / "ckpt", name, meta, variant))
    assert (lm.max_length == BLOCK) == (name == "transformer")  # only full attention truncates
    with torch.no_grad():  # the model's own greedy next word: its greedy flag must come out True
        first = lm.model(torch.tensor([lm.tok.encode("the lazy")]))[0][0, -1, :lm.tok.vocab_size].argmax()
    args = [("the quick", " brown"), (TEXT, " fox"), ("over the", " lazy dog."), ("", "the end"),
            ("the lazy", lm.tok.decode([int(first)])), (TEXT[:40], TEXT[40:])]
    if lm.max_length:  # a continuation longer than the attention context is an error, not a wrong slice
        with pytest.raises(lm_eval_py.EvalError, match="does not fit the attention model's context"):
            lm.loglikelihood(requests("loglikelihood", args[-1:]))
        args = args[:-1]
    got = lm.loglikelihood(requests("loglikelihood", args))
    for (context, continuation), (logp, greedy) in zip(args, got):
        ref_logp, ref_greedy = model_logprob(lm, context, continuation)
        assert logp == pytest.approx(ref_logp, rel=1e-10, abs=1e-10) and greedy == ref_greedy
    assert got[4][1] is True and not all(g for _, g in got)
    assert lm.stats["past_block"] >= 1 and lm.stats["longest"] > BLOCK


def test_batches_hold_at_most_batch_size_blocks(tmp_path, monkeypatch, one_thread):
    lm = adapter(save_ckpt(tmp_path / "ckpt", "moneta", char_meta(TEXT)))
    shapes, forward = [], lm.model.forward
    monkeypatch.setattr(lm.model, "forward", lambda idx, *a: shapes.append(tuple(idx.shape)) or forward(idx, *a))
    args = [(TEXT[:n], " fox") for n in (2, 3, 5, 9, 10, 40, 41, 150, 151)]
    got = lm.loglikelihood(requests("loglikelihood", args))
    assert sum(b for b, _ in shapes) == len(args) and any(b > 1 for b, _ in shapes)
    assert all(b == 1 or b * t <= 3 * BLOCK for b, t in shapes)  # batch_size 3 rows of BLOCK tokens
    assert [g[0] for g in got] == pytest.approx([model_logprob(lm, *a)[0] for a in args], rel=1e-10)


@pytest.mark.parametrize("name", ["moneta", "transformer"])
def test_rolling_loglikelihood_past_the_block_equals_the_models_loss(name, tmp_path, one_thread):
    lm = adapter(save_ckpt(tmp_path / "ckpt", name, char_meta(TEXT)))
    text = TEXT[:3 * BLOCK]  # three blocks of characters
    ids = lm.tok.encode(text)
    (got,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    nl = lm.tok.stoi["\n"]  # the first character is conditioned on the separator

    def loss(x, y):  # the training loss (summed), in float64: the model's forward casts it to float32
        with torch.no_grad():
            return F.cross_entropy(lm.model(torch.tensor([x]))[0][0], torch.tensor(y), reduction="sum")

    if name == "moneta":  # the whole text in one pass through the recurrence
        ref = loss([nl] + ids[:-1], ids)
    else:  # the harness's disjoint windows of BLOCK tokens
        x = [[nl] + ids[:BLOCK - 1]] + [ids[k * BLOCK - 1:(k + 1) * BLOCK - 1] for k in (1, 2)]
        ref = sum(loss(x[k], ids[k * BLOCK:(k + 1) * BLOCK]) for k in range(3))
    assert got == pytest.approx(-float(ref), rel=1e-12)


# ---------------------------------------------------------------------------------------------- generation

@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    data = write_word_dataset(tmp_path_factory.mktemp("data"), 400)
    out = tmp_path_factory.mktemp("moneta")
    torch.set_num_threads(1)
    train.train(train.TrainConfig(model="moneta", preset="tiny", n_layer=1, n_embd=32, n_head=2, block_size=32,
                                  batch_size=8, max_iters=40, warmup_iters=2, eval_interval=40, eval_iters=1,
                                  log_interval=40, learning_rate=1e-2, device="cpu", dtype="float32", compile=False,
                                  dataset=data, out_dir=str(out), model_args="chunk_size=8,gate_rank=8"))
    return str(out)


def test_generate_until_stops_at_the_stop_string_and_equals_sample_greedy(trained_dir, monkeypatch):
    lm = adapter(trained_dir, dtype="float32")
    prompt = "the lazy dog the end. the quick"
    ref = lm.tok.decode(sample.generate_stream(lm.model, lm.tok.encode(prompt), 60, temperature=0.0))
    stop = next(c for c in ref[5:] if c not in ref[:5])  # a character that first appears after a few
    assert len(set(ref)) > 3 and ref.index(stop) < 50
    steps = []
    forward_step = lm.model.forward_step
    monkeypatch.setattr(lm.model, "forward_step", lambda *a: steps.append(1) or forward_step(*a))
    stops, plain = lm.generate_until(requests("generate_until", [
        (prompt, {"until": [stop, "NEVER"], "max_gen_toks": 60, "do_sample": False}),
        (prompt, {"until": [], "max_gen_toks": 60})]))
    assert stops == ref.split(stop)[0] and plain == ref
    assert len(steps) == (ref.index(stop) + 1) + (60 - 1)  # stopped right after the stop string


def test_generate_until_attention_left_truncates(tmp_path, one_thread):
    lm = adapter(save_ckpt(tmp_path / "ckpt", "transformer", char_meta(TEXT)), dtype="float32")
    kept = lm.tok.encode(TEXT)[-(BLOCK - 4):]  # room for max_gen_toks = 4 inside the trained positions
    ref = lm.tok.decode(sample.generate_stream(lm.model, kept, 4, temperature=0.0))
    (got,) = lm.generate_until(requests("generate_until", [(TEXT, {"until": [], "max_gen_toks": 4})]))
    assert got == ref and lm.stats["past_block"] == 1


# ---------------------------------------------------------------------------------------------- end to end

@pytest.fixture
def hf_env(monkeypatch):
    """eval.run sets HF_DATASETS_OFFLINE / HF_HUB_OFFLINE for the process: restored after the test."""
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, os.environ.get(key, "0"))


def test_offline_tasks_end_to_end(tmp_path, hf_env, capsys, one_thread):
    """simple_evaluate on a GPT-2 BPE checkpoint (it can spell every task): the harness's perplexity of the last
    word equals exp(-mean log-likelihood) computed by the model itself on the first documents."""
    out_dir = save_ckpt(tmp_path / "ckpt", "moneta", GPT2_META)
    tasks = "shakespeare_lastword,shakespeare_ppl,passkey_noise_256"
    cfg = lm_eval_py.parse_args([f"--out_dir={out_dir}", f"--tasks={tasks}", "--limit=3", "--bootstrap_iters=0",
                                 "--device=cpu", "--dtype=float64"])
    results = lm_eval_py.run(cfg)
    out, err = capsys.readouterr()
    docs = [json.loads(line) for line in open(prepare_eval.TASK_DIR / "shakespeare_lastword.jsonl")][:3]
    lm = adapter(out_dir)
    ref = [model_logprob(lm, d["context"], d["target"])[0] for d in docs]
    res = results["results"]
    assert res["shakespeare_lastword"]["perplexity,none"] == pytest.approx(math.exp(-sum(ref) / 3), rel=1e-9)
    assert 0 <= res["shakespeare_lastword"]["acc,none"] <= 1
    ppl = res["shakespeare_ppl"]
    assert ppl["bits_per_byte,none"] == pytest.approx(math.log2(ppl["byte_perplexity,none"]), rel=1e-9)
    solved = 3 * res["passkey_noise_256"]["exact_match,first_5_digits"]
    assert solved == pytest.approx(round(solved))
    assert "shakespeare_lastword" in out and "word_perplexity" in out  # the harness's table on stdout
    assert "whole context runs through the recurrence" in err and "ran whole through the recurrence" in err
    saved = json.loads(open(lm_eval_py.results_path(cfg, lm.loaded)).read())
    assert all(saved["results"]["shakespeare_ppl"][k] == pytest.approx(ppl[k]) for k in ("word_perplexity,none",
                                                                                        "byte_perplexity,none"))
    assert "long_context" in saved["config"]


def test_offline_task_documents():
    """What data/prepare_eval.py promises: the last word follows the LAMBADA-style rule, the perplexity documents
    are all of the held-out plays, the passkey prompts are recall_tasks' samples cut before the key."""
    from data import recall_tasks
    from data.shakespeare import corpus

    if not prepare_eval.ready():
        prepare_eval.prepare(verbose=False)
    docs = {f: [json.loads(line) for line in open(prepare_eval.TASK_DIR / f)] for f in prepare_eval.files()}
    last = docs["shakespeare_lastword.jsonl"]
    assert len(last) == prepare_eval.LASTWORD_DOCS and {d["play"] for d in last} == set(corpus.VAL_PLAYS)
    for d in last:
        word, context = d["target"][1:], d["context"]
        before, line = context.rsplit("\n", 1)
        assert d["target"][0] == " " and word.isalpha() and len(word) >= 4 and not line.endswith(" ")
        assert re.search(rf"\b{word}\b", before) and not re.search(rf"\b{word}\b", line)
        assert context + d["target"] in corpus.play_text(d["play"])
    for play in corpus.VAL_PLAYS:
        text = "\n\n".join(d["text"] for d in docs["shakespeare_ppl.jsonl"] if d["play"] == play)
        assert text == corpus.play_text(play)
    for n in prepare_eval.PASSKEY_LENGTHS:
        batch = recall_tasks.passkey(prepare_eval.PASSKEY_DOCS, context_len=n, seed=prepare_eval.SEED)
        for d, row, key in zip(docs[f"passkey_noise_{n}.jsonl"], batch.inputs, batch.info["passkeys"]):
            assert len(d["prompt"]) == n - 4 and d["target"] == key
            assert (d["prompt"] + key).startswith(recall_tasks.decode(row))


# ---------------------------------------------------------------------------------------------- errors

def _error(capsys, *args):
    rc = lm_eval_py.main(["--device=cpu", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("eval.py: error:"), err
    return err[0]


def test_errors(tmp_path, trained_dir, hf_env, capsys):
    assert "no checkpoint in" in _error(capsys, f"--out_dir={tmp_path / 'none'}")
    assert "unknown key 'task'" in _error(capsys, "--task=piqa")
    assert "at least one task" in _error(capsys, "--tasks=,")
    msg = _error(capsys, f"--out_dir={trained_dir}", "--tasks=no_such_task")
    assert "unknown task 'no_such_task'" in msg and "shakespeare_lastword" in msg and "lm-eval ls tasks" in msg
    # a character checkpoint of the word corpus cannot spell Shakespeare: the task is named, before any scoring
    lm = adapter(trained_dir, "float32")
    with pytest.raises(lm_eval_py.EvalError, match="task test: .*lacks"):
        lm.loglikelihood(requests("loglikelihood", [("the quick", " Brown")]))


def test_network_task_offline_is_a_one_line_error(trained_dir, hf_env, capsys):
    msg = _error(capsys, f"--out_dir={trained_dir}", "--tasks=piqa")
    assert msg.startswith("eval.py: error: task piqa:") and "offline" in msg and "--online=true" in msg

