"""Writing and checking prepared datasets: the one atomic writer used by every prepare script.

A prepared dataset is a directory with

- train.bin, val.bin: token ids as raw little-endian uint16 (nanoGPT layout; read them with
  np.memmap(path, dtype=np.uint16, mode="r")),
- meta.json: at least {"tokenizer": "gpt2"|"char", "vocab_size": int, "dtype": "uint16",
  "train_tokens": int, "val_tokens": int}, plus "itos" (list of characters) for char-level data
  and "eot" (the end-of-text id or null). Prepare scripts add their own keys (source, split, ...).

Atomicity: everything is first written to temporary files in the same directory
(`<name>.<pid>.tmp`); only once all three are complete and fsynced are they moved over the real
names: the old meta.json is removed, the bins are moved in with os.replace, and the new
meta.json comes last. An error or a crash while writing (where all the time goes) leaves any
previous dataset untouched, and the temporary files are removed on an error. A crash within the
few renames leaves no meta.json: the directory reads as not ready (`dataset_ready`) and is
prepared again, never as a mix of old and new files. `dataset_ready` also checks the bins'
sizes against the token counts in meta.json.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np

DTYPE = np.uint16
SPLITS = ("train", "val")
META = "meta.json"

DATA_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = DATA_DIR.parent


def fsync_dir(path: pathlib.Path) -> None:
    """fsync a directory so that a rename in it is durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _to_uint16(ids) -> np.ndarray:
    a = np.asarray(ids)
    if a.size == 0:
        return a.astype(DTYPE)
    if a.dtype == DTYPE:
        return a.ravel()
    if a.min() < 0 or a.max() > np.iinfo(DTYPE).max:
        raise ValueError(f"token ids must be in [0, 65535] to be stored as uint16 (got {a.min()}..{a.max()})")
    return a.astype(DTYPE).ravel()


class DatasetWriter:
    """Stream token ids into train/val temporary files, then `commit(meta)` atomically.

        with DatasetWriter(out_dir) as w:
            w.add("train", ids); w.add("val", ids)
            w.commit({"tokenizer": "gpt2", "vocab_size": 50257, ...})

    Leaving the `with` block without commit (or with an exception) discards the temporary
    files and leaves the previous dataset, if any, as it was.
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = pathlib.Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tag = f"{os.getpid()}.tmp"
        self.tmp = {s: self.out_dir / f"{s}.bin.{tag}" for s in SPLITS}
        self.tmp_meta = self.out_dir / f"{META}.{tag}"
        self.counts = {s: 0 for s in SPLITS}
        self._files = {s: open(self.tmp[s], "wb") for s in SPLITS}
        self.committed = False

    def add(self, split: str, ids) -> int:
        """Append token ids to a split; returns how many were added."""
        a = _to_uint16(ids)
        a.astype("<u2", copy=False).tofile(self._files[split])
        self.counts[split] += int(a.size)
        return int(a.size)

    def _close_files(self) -> None:
        for f in self._files.values():
            if not f.closed:
                f.close()

    def move_tail_to_val(self, fraction: float) -> None:
        """If nothing went to val, move the last `fraction` of train's tokens there (used when
        a corpus is a single document that cannot be split by documents)."""
        if self.counts["val"] or not self.counts["train"]:
            return
        n_val = max(1, int(round(self.counts["train"] * fraction)))
        n_val = min(n_val, self.counts["train"] - 1) if self.counts["train"] > 1 else 0
        if n_val <= 0:
            return
        self._files["train"].flush()
        keep = self.counts["train"] - n_val
        data = np.fromfile(self.tmp["train"], dtype=DTYPE, offset=2 * keep)
        self.add("val", data)
        self._files["train"].truncate(2 * keep)
        self._files["train"].seek(2 * keep)
        self.counts["train"] = keep

    def commit(self, meta: dict) -> pathlib.Path:
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
        self._close_files()
        meta = dict(meta)
        meta.setdefault("dtype", "uint16")
        meta["train_tokens"] = self.counts["train"]
        meta["val_tokens"] = self.counts["val"]
        for key in ("tokenizer", "vocab_size"):
            if key not in meta:
                raise ValueError(f"dataset meta needs {key!r}")
        with open(self.tmp_meta, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        # Commit: the old meta goes first, so that from here until the new meta is in place the
        # directory reads as "no dataset" (prepared again) rather than as a mixed one.
        try:
            (self.out_dir / META).unlink()
        except FileNotFoundError:
            pass
        for s in SPLITS:
            os.replace(self.tmp[s], self.out_dir / f"{s}.bin")
        os.replace(self.tmp_meta, self.out_dir / META)
        fsync_dir(self.out_dir)
        self.committed = True
        return self.out_dir

    def abort(self) -> None:
        self._close_files()
        for p in [*self.tmp.values(), self.tmp_meta]:
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.committed:
            self.abort()
        return False


def write_dataset(out_dir: str | os.PathLike, train_ids, val_ids, meta: dict) -> pathlib.Path:
    """Write train.bin, val.bin and meta.json into out_dir atomically (see module doc)."""
    with DatasetWriter(out_dir) as w:
        w.add("train", train_ids)
        w.add("val", val_ids)
        return w.commit(meta)


def read_meta(out_dir: str | os.PathLike) -> dict:
    with open(pathlib.Path(out_dir) / META, encoding="utf-8") as f:
        return json.load(f)


def dataset_ready(out_dir: str | os.PathLike) -> bool:
    """True if out_dir holds a complete dataset: meta.json and both bins, of the sizes in meta."""
    d = pathlib.Path(out_dir)
    try:
        meta = read_meta(d)
        return all(
            (d / f"{s}.bin").stat().st_size == 2 * int(meta[f"{s}_tokens"]) for s in SPLITS
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def load_split(out_dir: str | os.PathLike, split: str) -> np.memmap:
    """Read-only memmap of a split's token ids."""
    return np.memmap(pathlib.Path(out_dir) / f"{split}.bin", dtype=DTYPE, mode="r")
