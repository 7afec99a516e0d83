"""The offline tasks' `custom_dataset` (lm-evaluation-harness): a JSONL file of this folder, which
data/prepare_eval.py builds from data the repo already has. Loaded with `datasets`' json builder, no network."""
import pathlib

import datasets

HERE = pathlib.Path(__file__).resolve().parent


def load(file, **_metadata):
    """{"test": the documents of `file`}; the harness passes its task metadata as keywords too."""
    path = HERE / file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: build the offline tasks first (python data/prepare_eval.py)")
    return datasets.load_dataset("json", data_files={"test": str(path)})
