"""The outer-gradient norm of a Memora checkpoint on the training batches of given steps, with its memory run as
trained ("gain") and with one thing changed at a time (README, "Stability", the Gauss-Newton default).

    python results/memora_step/probe_checkpoint.py OUT_DIR STEPS     # e.g. /tmp/gain75 75,74,73

OUT_DIR: a train.py run of the BPE grid's size m at 512 tokens with Memora's previous step, stopped before its
outer gradient turned chaotic (--max_iters=75; the command is in README). The batches are the ones train.py
draws at those steps (seed 1337, batch 4)."""
import pathlib
import sys

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import model_common  # noqa: E402
import train  # noqa: E402
from sample import load_model  # noqa: E402

model = load_model(sys.argv[1]).model.float()
model.train()
steps = [int(s) for s in sys.argv[2].split(",")]
data = np.memmap(ROOT / "data/shakespeare_compact/train.bin", dtype=np.uint16, mode="r")
T, B = model.config.block_size, 4


def grad_norms():
    out = []
    for step in steps:
        off = train.step_offsets(1337, 0, step, 1, B, len(data), T)[0]
        x = torch.from_numpy(np.stack([data[o:o + T + 1] for o in off]).astype(np.int64))
        model.zero_grad()
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        out.append(f"{torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item():.3g}")
    return " / ".join(out)


def with_memory(**kw):
    for block in model.blocks:
        block.mixer.mem_kwargs.update(kw)


def with_gates(change):
    def gates(self, u, dtype):
        g = plain_gates(self, u, dtype)
        name, f = change
        g[name] = f(g[name])
        return g
    model_common.MirasLayer._gates = gates


plain_gates = model_common.MirasLayer._gates
print(f"steps {steps}: outer-gradient norm")
for label, memory, gate in [
        ("as trained", {}, None),
        ("step sized by Gauss-Newton", dict(normalize_step="gauss_newton"), None),
        ("Gauss-Newton, eta x 2", dict(normalize_step="gauss_newton"), ("eta", lambda e: 2 * e)),
        ("chunk size 16", dict(chunk_size=16), None),
        ("eta x 0.5", {}, ("eta", lambda e: 0.5 * e)),
        ("eta x 0.25", {}, ("eta", lambda e: 0.25 * e)),
        ("no decay (alpha = 1)", {}, ("alpha", torch.ones_like))]:
    with_memory(**{"normalize_step": "gain", "chunk_size": 64, **memory})
    model_common.MirasLayer._gates = plain_gates
    if gate:
        with_gates(gate)
    print(f"  {label}: {grad_norms()}", flush=True)
