"""The long-context corpus: the Python source of the installed torch package, at character level.

    python data/torch_code/prepare.py [--out_dir=DIR] [--max_files=N] [--allow_other_torch]

Why: at the CPU studies' budgets no model uses more than a few dozen tokens of Shakespeare (README, "Scaling
study"), so a context sweep there measures nothing. Source code repeats its identifiers, imports and call
patterns across a whole file, so a model can predict a token from something hundreds of characters back
(scaling.py's context_check grid measures whether it does).

Reproducible offline: the text is the `*.py` files under the torch package directory, one document per file,
in sorted order of their path inside the package, split by data/prepare_text.py's rule (every 10th file to
val). It is defined for the pinned torch==2.13.0 (requirements.txt; BSD-3-Clause, ~2,200 files, ~46M
characters); another torch version is another corpus, refused unless --allow_other_torch (meta.json records
the version either way). The vocabulary is the set of characters that occur (~150, a few non-ASCII).
Importable: `prepare(out_dir=None) -> path`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from data.prepare_text import iter_files, prepare_documents  # noqa: E402

DEFAULT_DIR = pathlib.Path(__file__).resolve().parent
TORCH_VERSION = "2.13.0"


def source_files(max_files: int | None = None) -> tuple[list[pathlib.Path], str]:
    """The corpus's files in order and the torch version they come from."""
    import torch

    root = pathlib.Path(torch.__file__).resolve().parent
    files = sorted(root.rglob("*.py"), key=lambda f: f.relative_to(root).as_posix())
    return files[:max_files] if max_files is not None else files, torch.__version__


def prepare(out_dir=None, max_files: int | None = None, allow_other_torch: bool = False,
            verbose: bool = True) -> pathlib.Path:
    """Write the corpus into out_dir (default data/torch_code). max_files: the first N files (for tests)."""
    files, version = source_files(max_files)
    if version.split("+")[0] != TORCH_VERSION and not allow_other_torch:
        raise SystemExit(f"data/torch_code: the corpus is defined as torch {TORCH_VERSION}'s source, but torch "
                         f"{version} is installed; install torch=={TORCH_VERSION} (requirements.txt) or pass "
                         f"--allow_other_torch to build a different corpus")
    if not files:
        raise SystemExit("data/torch_code: found no .py file in the torch package")
    return prepare_documents(iter_files(str(f) for f in files), out_dir or DEFAULT_DIR, tokenizer="char",
                             val_fraction=0.1, source=f"the *.py files of the torch {version} package (BSD-3-Clause)",
                             verbose=verbose)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out_dir", default=None, help="output directory (default: data/torch_code)")
    ap.add_argument("--max_files", type=int, default=None, help="only the first N files (a small subset)")
    ap.add_argument("--allow_other_torch", action="store_true",
                    help=f"build the corpus from a torch other than {TORCH_VERSION} (a different corpus)")
    args = ap.parse_args(argv)
    if args.max_files is not None and args.max_files < 1:
        ap.error("--max_files must be at least 1")
    prepare(args.out_dir, args.max_files, args.allow_other_torch)


if __name__ == "__main__":
    main()
