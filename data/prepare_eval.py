"""Build the offline evaluation tasks' documents: data/eval_tasks/*.jsonl, for lm-evaluation-harness.

    python data/prepare_eval.py [--out_dir=DIR]

Everything comes from data the repo already has, so nothing is downloaded (eval.py runs this on demand):

- shakespeare_lastword.jsonl: LAMBADA-style last-word prediction on the held-out plays (corpus.VAL_PLAYS,
  which no training split of this repo contains). A document is a passage of whole lines (at least
  LASTWORD_CONTEXT characters) followed by the last word of the next spoken line; the word has >= 4 letters,
  follows a space, is not one of the COMMON_WORDS most frequent words of the training plays, and occurs
  earlier in the passage but not in its own line, so guessing it takes the broad context (LAMBADA's
  criterion, made automatic). Fields: context, target (" word"). LASTWORD_DOCS of them,
  drawn with a fixed seed.
- shakespeare_ppl.jsonl: the held-out plays cut into documents of about PPL_DOC_CHARS characters at speech
  boundaries (all of their text), for rolling log-likelihood: word and byte perplexity. Field: text.
- passkey_noise_<L>.jsonl for L in PASSKEY_LENGTHS: data/recall_tasks.passkey samples (noise haystack, a
  5-digit key at a random depth) of L characters, cut before the key. Fields: prompt, target (the key), depth.

Importable: `prepare(out_dir=None) -> path`, `ready(out_dir=None) -> bool`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from data import recall_tasks  # noqa: E402
from data.shakespeare import corpus  # noqa: E402

TASK_DIR = pathlib.Path(__file__).resolve().parent / "eval_tasks"
LASTWORD_CONTEXT = 600   # characters before the target line: several speeches, ~5x the Quickstart context
LASTWORD_DOCS = 500
COMMON_WORDS = 100       # function words ("that", "will", "thou") are left out as targets
PPL_DOC_CHARS = 4000
PASSKEY_LENGTHS = (256, 1024, 4096)
PASSKEY_DOCS = 50
SEED = 0


def files():
    """The JSONL file names prepare() writes."""
    return (["shakespeare_lastword.jsonl", "shakespeare_ppl.jsonl"]
            + [f"passkey_noise_{n}.jsonl" for n in PASSKEY_LENGTHS])


def ready(out_dir=None) -> bool:
    d = pathlib.Path(out_dir) if out_dir is not None else TASK_DIR
    return all((d / f).is_file() for f in files())


def common_words(n=COMMON_WORDS):
    """The n most frequent words (lower case) of the training plays."""
    words = re.findall(r"[a-z]+", corpus.corpus_text(corpus.split_plays()[0]).lower())
    uniq, counts = np.unique(words, return_counts=True)
    return set(uniq[np.argsort(-counts, kind="stable")[:n]])


def lastword_docs(plays=corpus.VAL_PLAYS, n=LASTWORD_DOCS, context_chars=LASTWORD_CONTEXT, seed=SEED):
    docs, common = [], common_words()
    for slug in plays:
        lines = corpus.play_text(slug).split("\n")
        starts = np.cumsum([0] + [len(s) + 1 for s in lines])  # character offset of every line
        text = "\n".join(lines)
        for i, line in enumerate(lines):
            m = re.search(r" ([A-Za-z]{4,})[^A-Za-z]*$", line)
            if not m or line.endswith(":") or starts[i] < context_chars:
                continue  # no qualifying last word, a speaker's name, or too little text before it
            word, before = m.group(1), line[:m.start(1)]
            if word.lower() in common:
                continue
            first = int(np.searchsorted(starts, starts[i] - context_chars, side="right")) - 1
            passage = text[starts[first]:starts[i]]
            if re.search(rf"\b{word}\b", passage) and not re.search(rf"\b{word}\b", before):
                docs.append({"context": passage + before.rstrip(" "), "target": " " + word, "play": slug})
    rng = np.random.default_rng(seed)
    keep = sorted(rng.choice(len(docs), size=min(n, len(docs)), replace=False))
    return [docs[i] for i in keep]


def ppl_docs(plays=corpus.VAL_PLAYS, doc_chars=PPL_DOC_CHARS):
    docs = []
    for slug in plays:
        piece = ""
        for speech in corpus.play_text(slug).split("\n\n"):
            piece = f"{piece}\n\n{speech}" if piece else speech
            if len(piece) >= doc_chars:
                docs.append({"text": piece, "play": slug})
                piece = ""
        if piece:
            docs.append({"text": piece, "play": slug})
    return docs


def passkey_docs(length, n=PASSKEY_DOCS, seed=SEED):
    batch = recall_tasks.passkey(n, context_len=length, depth=None, seed=seed, haystack="noise")
    digits = batch.info["num_digits"]
    docs = []
    for row, key, depth in zip(batch.inputs, batch.info["passkeys"], batch.info["depths"]):
        text = recall_tasks.decode(row)  # the sample's first `length` characters; the key is its last digits
        prompt = text[:length + 1 - digits]
        assert text[length + 1 - digits:] == key[:-1] and prompt.endswith(recall_tasks.QUESTION)
        docs.append({"prompt": prompt, "target": key, "depth": round(float(depth), 4)})
    return docs


def write_jsonl(path: pathlib.Path, docs) -> None:
    """One JSON object per line, written to a temporary file and moved into place (never half a file)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def prepare(out_dir=None, verbose: bool = True) -> pathlib.Path:
    out = pathlib.Path(out_dir) if out_dir is not None else TASK_DIR
    out.mkdir(parents=True, exist_ok=True)
    sets = {"shakespeare_lastword.jsonl": lastword_docs(), "shakespeare_ppl.jsonl": ppl_docs()}
    sets.update({f"passkey_noise_{n}.jsonl": passkey_docs(n) for n in PASSKEY_LENGTHS})
    for name, docs in sets.items():
        write_jsonl(out / name, docs)
        if verbose:
            print(f"wrote {out / name}: {len(docs)} documents")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out_dir", default=None, help="output directory (default: data/eval_tasks)")
    args = ap.parse_args(argv)
    prepare(args.out_dir)


if __name__ == "__main__":
    main()
