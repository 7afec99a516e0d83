"""Score a train.py checkpoint with EleutherAI's lm-evaluation-harness (lm-eval 0.4.x), the tool the paper's
Table 2 (and most of its peers' tables) comes from.

    python eval.py                                         # the main job's checkpoint (out/), Shakespeare tasks
    python eval.py --out_dir=out --tasks=offline           # + passkey_noise (needs the digits in the vocabulary)
    python eval.py --tasks=offline --limit=20              # a quick look: 20 documents per task
    python eval.py --out_dir=out --tasks=paper --online --device=cuda   # the paper's Table 2 tasks (downloads)

Configuration: the EvalConfig defaults below, then `--key=value` overrides (cli.parse, as sample.py; --help).

Tasks: lm-eval task, group or tag names, comma-separated, plus two names of ours: `offline` (the tasks that ship
with the repo, data/eval_tasks/: shakespeare_lastword, shakespeare_ppl, passkey_noise_{256,1024,4096}, built
from data the repo has by data/prepare_eval.py, which runs here when they are missing) and `paper` (PAPER_TASKS:
Wiki and LAMBADA perplexity, PIQA, HellaSwag, WinoGrande, ARC-e/c, SIQA, BoolQ). eval.py runs offline
(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) unless --online=true: a task whose dataset is not on this machine is
then a one-line error saying so. The harness's table goes to stdout and its JSON results next to the
checkpoint (<out_dir>/lm_eval_<ckpt>_<tasks>.json) or to --output.

The model (MirasLM, an lm_eval TemplateLM; any checkpoint sample.load_model reads: all four models, hybrids,
variants, GPT-2 BPE or characters):
- loglikelihood / loglikelihood_rolling: requests sorted longest first (as the harness's HF model), one
  parallel forward per batch of at most batch_size x block_size padded tokens, right-padded; log-probabilities over the model's whole (padded) vocabulary, as in
  its training loss; "greedy" compares with the argmax over the tokenizer's ids (what generation may produce).
- generate_until: sample.generate_stream (parallel prefill, then the recurrent O(1) step for Miras layers, a
  KV cache for attention), greedy unless the request samples; stops at the request's `until` strings (and at
  <|endoftext|> for GPT-2), cut before the first one, as the HF model does.
- Contexts longer than the training context (block_size): a model without full-attention layers (Moneta, Yaad,
  Memora and their hybrids with sliding-window attention) runs the whole context through its recurrence,
  rolling log-likelihood included (one window per document); a model with full-attention layers is
  left-truncated to its last block_size tokens (generation: block_size - max_gen_toks), and rolling
  log-likelihood uses the harness's disjoint block_size windows. eval.py prints which, and how many requests it
  concerned; the JSON's config records it.
- Empty contexts are conditioned on the document separator: <|endoftext|> for GPT-2, the newline for a
  character vocabulary (which has no end-of-text token; the corpus separates speeches and plays by blank lines).

Library use (tests): MirasLM(sample.load_model(...), batch_size); run(cfg) -> the harness's results dict.
"""
import contextlib
import functools
import json
import os
import pathlib
import re
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

import cli
import sample
import train
from data import prepare_eval

TASK_DIR = prepare_eval.TASK_DIR
OFFLINE_TAG = "miras_offline"  # the tag data/eval_tasks/*.yaml carry
PAPER_TASKS = ("wikitext", "lambada_openai", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
               "social_iqa", "boolq")
ALIASES = {"offline": (OFFLINE_TAG,), "paper": PAPER_TASKS}
GEN_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


@dataclass
class EvalConfig:
    out_dir: str = sample.MAIN_OUT_DIR  # where train.py wrote ckpt.pt / ckpt_best.pt
    ckpt: str = "auto"                  # auto (best if present, else latest) | best | latest
    tasks: str = "shakespeare_lastword,shakespeare_ppl"  # comma-separated lm-eval task / group / tag names;
                                        # offline (these and passkey_noise); paper
    limit: Optional[int] = None         # documents per task (a quick look: then not the task's numbers)
    num_fewshot: Optional[int] = None   # None: each task's own (0 for the offline tasks and the paper's)
    batch_size: int = 16                # scoring: rows of block_size tokens per forward (fewer, longer rows for a
                                        # recurrent model's long requests); generation: one request at a time
    online: bool = False                # allow the Hugging Face Hub (the paper's tasks download their data)
    output: str = ""                    # results JSON; "": next to the checkpoint
    bootstrap_iters: int = 100000       # the harness's stderr bootstrap (its default); 0: no stderr
    seed: int = 1234                    # sampling generator (greedy tasks do not use it) and the harness's seeds
    device: str = "auto"                # auto (cuda if available, else cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"                 # auto (bfloat16 on CUDA if supported, else float32) | float32 | bfloat16 |
                                        # float16 | float64


class EvalError(cli.ConfigError):
    """A user-facing problem (unknown task, missing checkpoint, a task needing the network while offline):
    main() prints it as one line."""


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, _ = cli.parse(EvalConfig, argv, "eval.py", error=EvalError)
    checks = [
        (cfg.ckpt in ("auto", "best", "latest"), f"ckpt must be auto, best or latest, got {cfg.ckpt!r}"),
        (cfg.limit is None or cfg.limit >= 1, "limit must be >= 1 (or None: every document)"),
        (cfg.batch_size >= 1 and cfg.bootstrap_iters >= 0, "batch_size must be >= 1 and bootstrap_iters >= 0"),
        (cfg.dtype in sample.DTYPES, f"dtype must be one of {', '.join(sample.DTYPES)}, got {cfg.dtype!r}"),
        (task_names(cfg.tasks), "tasks must name at least one task (e.g. --tasks=offline)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise EvalError(msg)
    return cfg


def task_names(tasks):
    """The lm-eval names of a --tasks value, aliases expanded, in order, without repeats."""
    names = [n.strip() for n in tasks.split(",") if n.strip()]
    return list(dict.fromkeys(x for n in names for x in ALIASES.get(n, (n,))))


# ----------------------------------------------------------------------------------------------
# The model


class MirasLM(TemplateLM):
    """lm-eval's LM for a checkpoint loaded by sample.load_model (see the module doc for what it does)."""

    def __init__(self, loaded, batch_size=16, autocast=None, seed=1234):
        super().__init__()
        self.loaded, self.model, self.tok = loaded, loaded.model, loaded.tokenizer
        self._device = self.model.lm_head.weight.device
        self.batch_size = batch_size
        self.autocast = autocast or contextlib.nullcontext()
        self.generator = torch.Generator(device=self._device).manual_seed(seed)
        # full attention was trained on positions < block_size only; the recurrence carries any length
        self.max_length = loaded.config.block_size if "A" in loaded.config.layers else None
        self.stats = dict(requests=0, longest=0, past_block=0)

    # --- tokens

    @property
    def eot_token_id(self):
        if self.tok.eot is not None:
            return self.tok.eot
        if "\n" not in self.tok.stoi:
            raise EvalError("this character vocabulary has no newline to condition an empty context on; "
                            "evaluate tasks whose requests all have a context")
        return self.tok.stoi["\n"]

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.tok.encode(string)

    def _check_vocab(self, requests):
        """A character-level checkpoint can spell only its own characters: name the task that needs others."""
        stoi = getattr(self.tok, "stoi", None)
        for req in requests if stoi is not None else ():
            missing = {c for a in req.args if isinstance(a, str) for c in a} - stoi.keys()
            if missing:
                raise EvalError(f"task {req.task_name}: its text uses characters this checkpoint's vocabulary "
                                f"lacks ({''.join(sorted(missing))!r}); leave it out of --tasks, or evaluate a "
                                f"GPT-2 BPE checkpoint or one trained on those characters")

    # --- scoring

    def _count(self, ids):
        """Record a model input's length before any truncation (what stats_note reports)."""
        self.stats["requests"] += 1
        self.stats["longest"] = max(self.stats["longest"], len(ids))
        self.stats["past_block"] += len(ids) > self.loaded.config.block_size

    def _window(self, context, continuation):
        """The input ids whose last len(continuation) logits score the continuation: all of them, or (full
        attention) the last block_size."""
        ids = (context + continuation)[:-1]
        self._count(ids)
        if self.max_length is not None and len(ids) > self.max_length:
            if len(continuation) > self.max_length:
                raise EvalError(f"a continuation of {len(continuation)} tokens does not fit the attention "
                                f"model's context ({self.max_length} tokens)")
            ids = ids[-self.max_length:]
        return ids

    def _batches(self, inputs):
        """Row indices of `inputs` (input ids, longest first) in batches of at most batch_size x block_size padded
        tokens: batch_size rows of the training context, fewer (at least one) of the longer rows a recurrent
        model reads whole, so the [rows, length, vocab] logits stay bounded."""
        budget, batch = self.batch_size * self.loaded.config.block_size, []
        for i in inputs:
            if batch and (len(batch) + 1) * len(inputs[batch[0]]) > budget:
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    @torch.no_grad()
    def _score(self, rows):
        """[(log P(continuation | context), continuation is greedy)] for rows of (context ids, continuation
        ids): longest first, one forward per batch (_batches), right-padded (causal: padding never reaches a
        scored position)."""
        out = [(0.0, True)] * len(rows)  # an empty continuation: probability 1
        order = sorted((i for i, (_, cont) in enumerate(rows) if cont), key=lambda i: -sum(map(len, rows[i])))
        windows = {i: self._window(*rows[i]) for i in order}  # dicts keep the order
        for batch in self._batches(windows):
            inputs = [windows[i] for i in batch]
            idx = torch.zeros(len(batch), max(map(len, inputs)), dtype=torch.long, device=self._device)
            for j, ids in enumerate(inputs):
                idx[j, :len(ids)] = torch.tensor(ids)
            with self.autocast:
                logits = self.model(idx)[0]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            for j, i in enumerate(batch):
                cont = torch.tensor(rows[i][1], device=self._device)
                scored = logits[j, len(inputs[j]) - len(cont):len(inputs[j])]
                logp = scored.log_softmax(-1).gather(-1, cont[:, None]).sum()
                greedy = (scored[:, :self.tok.vocab_size].argmax(-1) == cont).all()
                out[i] = (float(logp), bool(greedy))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        out = self._score([(context, continuation) for _, context, continuation in requests])
        for (pair, _, _), answer in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", pair, answer)
        return out

    def loglikelihood(self, requests, disable_tqdm=False):
        self._check_vocab(requests)
        return super().loglikelihood(requests, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """Each document's total log-likelihood, its first token conditioned on eot_token_id: one window
        through the recurrence, or the harness's disjoint block_size windows (full attention)."""
        self._check_vocab(requests)
        rows, owner = [], []
        for k, req in enumerate(requests):
            ids = self.tok_encode(req.args[0])
            if self.max_length is None:
                windows = [([self.eot_token_id], ids)]
            else:
                windows = [make_disjoint_window(w) for w in
                           get_rolling_token_windows(ids, self.eot_token_id, self.max_length, context_len=1)]
            rows += windows
            owner += [k] * len(windows)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owner, self._score(rows)):
            totals[k] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation

    def generate_until(self, requests, disable_tqdm=False):
        self._check_vocab(requests)
        try:
            prompts = [sample.encode_prompt(self.tok, req.args[0]) for req in requests]
        except sample.SampleError as e:
            raise EvalError(str(e)) from None
        out = [None] * len(requests)
        for i in sorted(range(len(requests)), key=lambda i: -len(prompts[i])):
            out[i] = self._generate(prompts[i], requests[i].args[1])
            self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    def _generate(self, ids, gen_kwargs):
        unknown = set(gen_kwargs) - set(GEN_KEYS)
        if unknown:
            raise EvalError(f"generation settings {sorted(unknown)} are not supported; known: {', '.join(GEN_KEYS)}")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.get("max_gen_toks", 256))
        sampled = bool(gen_kwargs.get("do_sample", False))
        temperature = float(gen_kwargs.get("temperature", 1.0)) if sampled else 0.0
        self._count(ids)
        if self.max_length is not None:  # room for the answer inside the trained positions
            ids = ids[-max(self.max_length - max_new, 1):]
        stream, text = sample.TextStream(self.tok), ""
        for token in sample.generate_stream(self.model, ids, max_new, temperature, int(gen_kwargs.get("top_k", 0)),
                                            float(gen_kwargs.get("top_p", 1.0)), self.generator,
                                            autocast=self.autocast, vocab_limit=self.tok.vocab_size):
            if token == self.tok.eot:
                break
            text += stream.push(token)
            if any(s in text for s in until):
                break
        text += stream.flush()
        for stop in until:
            text = text.split(stop)[0]
        return text

    # --- what the harness records

    def long_context_note(self):
        cfg, name = self.loaded.config, self.loaded.model_name
        if self.max_length is not None:
            return (f"{name} has full-attention layers trained at context {cfg.block_size}: longer requests are "
                    f"left-truncated to their last {cfg.block_size} tokens (generation: {cfg.block_size} - "
                    f"max_gen_toks), rolling log-likelihood uses disjoint {cfg.block_size}-token windows")
        swa = f" and sliding-window attention over the last {cfg.window} tokens" if "S" in cfg.layers else ""
        return (f"{name} has no full-attention layers: every request's whole context runs through the "
                f"recurrence{swa}, however long (trained at context {cfg.block_size}); rolling log-likelihood is "
                f"one window per document")

    def stats_note(self):
        s, T = self.stats, self.loaded.config.block_size
        what = "left-truncated" if self.max_length is not None else "ran whole through the recurrence"
        return (f"{s['past_block']} of {s['requests']} model inputs were longer than the training context "
                f"({T}) and {what}; the longest held {s['longest']} tokens")

    def get_model_info(self):
        loaded = self.loaded
        return {"checkpoint": str(loaded.path), "model_name": loaded.model_name, "iter_num": loaded.iter_num,
                "parameters": loaded.model.num_params(False), "tokenizer": loaded.tokenizer.kind,
                "block_size": loaded.config.block_size, "long_context": self.long_context_note(),
                "long_context_stats": dict(self.stats)}


# ----------------------------------------------------------------------------------------------
# Tasks and the run


@functools.lru_cache(maxsize=2)
def task_manager(with_harness_tasks):
    """Our tasks' TaskManager, with the harness's own tasks or without: indexing its thousands of configs takes
    tens of seconds, so it happens only when a name is not ours, once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR), include_defaults=with_harness_tasks)


def load_tasks(names, online):
    """The harness's task objects for `names` (our offline tasks built first if missing); one-line errors for
    an unknown name and for a dataset that cannot be had (offline, or no network)."""
    if not prepare_eval.ready():
        print("the offline tasks' documents are not built yet: building them (data/prepare_eval.py) ...",
              file=sys.stderr, flush=True)
        prepare_eval.prepare(verbose=False)
    ours = set(task_manager(False).all_tasks)
    manager = task_manager(not set(names) <= ours)
    tasks = []
    for name in names:
        if name not in manager.all_tasks:
            raise EvalError(f"unknown task {name!r}: use lm-eval task, group or tag names (lm-eval ls tasks), "
                            f"'offline' ({', '.join(sorted(ours - {OFFLINE_TAG}))}) or 'paper' "
                            f"({', '.join(PAPER_TASKS)})")
        try:
            got = manager.load([name])  # a group stays one (its aggregate); a tag or a task gives tasks
            tasks += [got["groups"][name]] if name in got["groups"] else list(got["tasks"].values())
        except Exception as e:  # noqa: BLE001 - datasets and the hub raise many kinds
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            if name in ours:
                how = "rebuild the offline tasks' documents: python data/prepare_eval.py"
            elif online:
                how = "check the network connection to the Hugging Face Hub"
            else:
                how = ("eval.py runs offline unless --online=true: rerun with --online=true on a machine that "
                       "reaches the Hugging Face Hub, or choose offline tasks (--tasks=offline)")
            raise EvalError(f"task {name}: its dataset could not be loaded ({why}); {how}") from None
    return manager, tasks


def results_path(cfg, loaded):
    if cfg.output:
        return pathlib.Path(cfg.output)
    slug = re.sub(r"[^A-Za-z0-9_.+-]", "_", "+".join(n.strip() for n in cfg.tasks.split(",") if n.strip()))
    return loaded.path.parent / f"lm_eval_{loaded.path.stem}_{slug[:80]}.json"


def run(cfg, out=None, err=None):
    """Evaluate as configured: notes to `err` (stderr), the harness's table to `out` (stdout); returns the
    harness's results dict (also written as JSON)."""
    out, err = out or sys.stdout, err or sys.stderr
    if not cfg.online:  # before `datasets` is imported: it reads them once
        os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets
    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    if not cfg.online and not datasets.config.HF_HUB_OFFLINE:
        raise EvalError("datasets was imported online before eval.run could set offline mode: set "
                        "HF_DATASETS_OFFLINE=1 before importing it, or pass --online=true")
    device = cli.resolve_device(cfg.device, EvalError)
    dtype = cli.resolve_dtype(cfg.dtype, device, EvalError)
    loaded = sample.load_model(cfg.out_dir, cfg.ckpt, device, dtype)
    lm = MirasLM(loaded, cfg.batch_size, cli.autocast_for(device, dtype), cfg.seed)
    manager, tasks = load_tasks(task_names(cfg.tasks), cfg.online)
    print(f"{loaded.path} ({loaded.model_name}, iteration {loaded.iter_num}, "
          f"{loaded.model.num_params(False) / 1e6:.2f}M parameters, {loaded.tokenizer.kind} tokenizer) on {device}, "
          f"{dtype}: tasks {', '.join(task_names(cfg.tasks))}{'' if cfg.limit is None else f', limit {cfg.limit}'}",
          file=err, flush=True)
    print(f"long contexts: {lm.long_context_note()}", file=err, flush=True)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=cfg.limit,
                                      num_fewshot=cfg.num_fewshot, bootstrap_iters=cfg.bootstrap_iters,
                                      log_samples=False, random_seed=cfg.seed, numpy_random_seed=cfg.seed,
                                      torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
    print(make_table(results), file=out)
    if results.get("groups"):
        print(make_table(results, "groups"), file=out)
    print(f"long contexts: {lm.stats_note()}", file=err, flush=True)
    path = results_path(cfg, loaded)
    train.save_json(json.loads(json.dumps(results, default=handle_non_serializable)), path)
    print(f"wrote {path}", file=err, flush=True)
    return results


def main(argv=None):
    # EvalError, and sample.py's SampleError (checkpoint, device), are ConfigErrors
    return cli.main("eval.py", __doc__, EvalConfig(), lambda a: run(parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(main())
