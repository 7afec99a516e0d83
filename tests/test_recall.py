"""recall.py (issue 8): a micro train+eval run of the driver (every model at every lr of the grid) completes,
writes valid JSON with every field and plots, and marks one lr per model and setting as selected by validation
accuracy; a second invocation reads everything from the cache; an interrupted run resumes from its checkpoint."""
import dataclasses
import json
import math

import pytest
import torch

import recall

FIELDS = ("model", "task", "setting", "train_len", "eval_len", "depth", "num_kv_pairs", "accuracy",
          "token_accuracy", "n_params", "n_params_total", "n_embd", "n_layer", "train_steps", "train_time_s",
          "num_eval_samples", "preset", "learning_rate", "seed", "val_accuracy", "selected")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_micro_run_writes_results_and_uses_cache(tmp_path):
    out = tmp_path / "recall"
    args = ["--preset=micro", f"--out={out}", "--models=moneta,transformer,moneta_linear"]
    micro = recall.PRESETS["micro"]
    first = recall.main(args)
    assert first["runs"] == 3 * sum(len(s.runs()) for s in micro) and first["cached"] == 0
    assert all(len(s.runs()) >= 2 for s in micro)  # the selection below is exercised

    data = json.loads((out / "results.json").read_text())
    recs = data["records"]
    assert data["preset"] == "micro" and recs
    for r in recs:
        for f in FIELDS:
            assert f in r, f
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["token_accuracy"] <= 1.0
        assert r["n_params"] > 0 and math.isfinite(r["final_train_loss"])
        assert (r["depth"] is None) == (r["task"] == "mqar")
        assert (r["num_kv_pairs"] is None) == (r["task"] == "passkey")
    expected = sum(3 * len(s.runs()) * len(s.eval_lens) * (len(s.depths) if s.task == "passkey" else 1)
                   for s in micro)
    assert len(recs) == expected
    # exactly one lr per (model, setting) is selected, and it has the best validation accuracy
    for m in ("moneta", "transformer", "moneta_linear"):
        for s in micro:
            rs = [r for r in recs if r["model"] == m and r["setting"] == s.name]
            assert {r["learning_rate"] for r in rs} == set(s.lr_grid)
            chosen = {r["learning_rate"] for r in rs if r["selected"]}
            assert len(chosen) == 1
            assert max(r["val_accuracy"] for r in rs) == next(r["val_accuracy"] for r in rs if r["selected"])
    assert {r["model"] for r in recs} == {"moneta", "transformer", "moneta_linear"}
    assert {r["task"] for r in recs} == {"mqar", "passkey"}
    # evaluated beyond the training length
    assert any(r["eval_len"] > r["train_len"] for r in recs)
    # plots: accuracy vs length per task setting, a passkey heatmap per model
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == len(micro) + 3
    # per setting: the selected row and the lr-sweep row
    assert (out / "summary.md").read_text().count("| moneta |") == 2 * len(micro)
    assert not list((out / "ckpt").iterdir())  # each run's train.py out_dir is removed once the run is finished

    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    second = recall.main(args)
    assert second["runs"] == 0 and second["cached"] == first["runs"]
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == mtimes
    assert json.loads((out / "results.json").read_text())["records"] == recs


def test_resume_from_checkpoint_matches_uninterrupted(tmp_path, monkeypatch):
    s = recall.PRESETS["micro"][0]
    run_dir = tmp_path / "run"
    full, _ = recall.train_run("transformer", s, tmp_path / "full", log=lambda *a, **k: None)
    # interrupted right after writing its first checkpoint, then a new call resumes from it
    real_save = recall.train.save_checkpoint

    def save_then_stop(obj, path):
        real_save(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(recall.train, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        recall.train_run("transformer", s, run_dir, log=lambda *a, **k: None)
    monkeypatch.undo()
    assert torch.load(run_dir / "ckpt.pt", weights_only=True)["iter_num"] == s.ckpt_interval < s.steps
    said = []
    resumed, stats = recall.train_run("transformer", s, run_dir, log=lambda *a, **k: said.append(a[0]))
    assert said == [f"  resuming transformer / {s.name} at step {s.ckpt_interval}"]
    assert stats["train_steps"] == s.steps
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_extra_seeds_train_at_every_lr_tied_at_seed_0(tmp_path):
    out = tmp_path / "recall"
    args = ["--preset=micro", f"--out={out}", "--models=moneta_linear", "--tasks=mqar"]
    recall.main(args)
    tied = recall.candidate_lrs(recall.collect(out))
    res = recall.main(args + ["--extra_seeds=2,1"])
    micro = [s for s in recall.PRESETS["micro"] if s.task == "mqar"]
    assert res["runs"] == 2 * sum(len(tied[("moneta_linear", s.name)]) for s in micro)
    assert res["cached"] == sum(len(s.runs()) for s in micro)
    recs = json.loads((out / "results.json").read_text())["records"]
    best = recall.selected_lrs(recs)
    for s in micro:
        rs = [r for r in recs if r["setting"] == s.name]
        assert {r["seed"] for r in rs} == {0, 1, 2}
        assert {r["learning_rate"] for r in rs if r["seed"] > 0} == set(tied[("moneta_linear", s.name)])
        assert {r["learning_rate"] for r in rs if r["selected"]} == {best[("moneta_linear", s.name)]}
        assert {r["seed"] for r in rs if r["selected"]} == {0, 1, 2}
        assert {r["eval_seed"] for r in rs if r["seed"] == 1}.isdisjoint({r["eval_seed"] for r in rs if r["seed"] == 0})
    assert "| moneta_linear |" in (out / "summary.md").read_text()
    assert "| 3 |" in (out / "summary.md").read_text()  # the seeds column
    with pytest.raises(recall.ConfigError):
        recall.main(args + ["--extra_seeds=0"])
    with pytest.raises(recall.ConfigError):
        recall.main(args + ["--extra_seeds=one"])


def test_selection_among_seed0_ties_by_mean_over_seeds_then_loss_then_lr():
    def rec(lr, val, loss, seed=0):
        return dict(model="m", setting="s", learning_rate=lr, val_accuracy=val, final_train_loss=loss, seed=seed)
    recs = [rec(1e-3, 0.5, 0.2), rec(3e-3, 0.9, 0.3), rec(1e-2, 0.9, 0.1), rec(3e-2, 1.0, None)]
    recall.mark_selected(recs)
    assert [r["selected"] for r in recs] == [False, False, False, True]
    recs = recs[:3] + [rec(3e-2, 0.9, 0.1)]
    assert recall.candidate_lrs(recs) == {("m", "s"): [3e-3, 1e-2, 3e-2]}
    recall.mark_selected(recs)  # seed 0 only: the lowest final loss (0.1, twice), then the lower lr
    assert [r["selected"] for r in recs] == [False, False, True, False]
    # the extra seeds decide between the tied lrs: 1e-2 fails seed 1; 3e-3 and 3e-2 solve it, 3e-3 at a lower loss
    recs += [rec(1e-2, 0.0, 9.0, seed=1), rec(3e-3, 1.0, 0.2, seed=1), rec(3e-2, 1.0, 0.5, seed=1)]
    recall.mark_selected(recs)
    assert [r["selected"] for r in recs] == [False, True, False, False, False, True, False]
    # a seed of an lr that was not tied at seed 0 plays no part
    recs += [rec(1e-3, 1.0, 0.0, seed=1)]
    recall.mark_selected(recs)
    assert recall.selected_lrs(recs) == {("m", "s"): 3e-3}
    # nothing solved at seed 0: no tie to break with seeds, the lowest final loss is the one candidate
    none = [rec(1e-3, 0.0, 1.4), rec(3e-3, 0.0, 1.2), rec(5e-3, 0.0, 1.3)]
    assert recall.candidate_lrs(none) == {("m", "s"): [3e-3]} == {k: [v] for k, v in recall.selected_lrs(none).items()}


def test_extrapolating_transformer_study_models():
    """NoPE and RoPE base 5e5 beside the RoPE Transformer on passkey: the same model but for that one field
    (the SwiGLU width included: a variant without its own entry takes its model's)."""
    for s in recall.PRESETS["cpu"][2:]:
        assert s.task == "passkey" and {"transformer_nope", "transformer_rope500k"} <= set(s.models)
        rope = recall.model_config("transformer", s)
        nope, slow = recall.model_config("transformer_nope", s), recall.model_config("transformer_rope500k", s)
        assert nope.attention_rope is False and rope.attention_rope is True and rope.rope_theta == 1e4
        assert slow.rope_theta == 5e5 and rope.hidden == slow.hidden == s.mlp_hidden["transformer"]
        assert recall.dataclasses.replace(nope, attention_rope=True) == rope
        assert recall.dataclasses.replace(slow, rope_theta=1e4) == rope


def test_model_overrides_reach_their_model():
    s = recall.PRESETS["cpu"][0]
    for preset in recall.PRESETS.values():  # the studies run every model at its defaults
        assert all(not x.model_overrides for x in preset)
    for m in ("moneta", "yaad", "memora"):
        assert recall.model_config(m, s).eta_gate == recall.models.make_config(m).eta_gate
    s = recall.dataclasses.replace(s, model_overrides={"memora": dict(eta_base=0.5)})
    assert recall.model_config("memora", s).eta_base == 0.5
    assert recall.model_config("moneta", s).eta_base == recall.models.make_config("moneta").eta_base


def test_passkey_loss_targets():
    s = next(x for x in recall.PRESETS["micro"] if x.task == "passkey")
    x, y = recall.train_batch(s, 0)
    assert s.passkey_loss == "answer"
    assert ((y != -1).sum(1) == s.num_digits).all()  # the digits only
    x2, y2 = recall.train_batch(recall.dataclasses.replace(s, passkey_loss="text"), 0)
    assert torch.equal(x, x2) and (y2 != -1).all() and torch.equal(y2[:, :-1], x[:, 1:])
    assert torch.equal(y2[:, -s.num_digits:], y[:, -s.num_digits:])
    with pytest.raises(recall.ConfigError):
        recall.dataclasses.replace(s, passkey_loss="all")


def test_mqar_training_mix_of_pair_counts():
    s = next(x for x in recall.PRESETS["micro"] if x.name == "mqar_d64")
    mixed = recall.dataclasses.replace(s, num_kv_pairs=4, train_kv_pairs=(2, 4))
    x, y = recall.train_batch(mixed, 3)
    half = s.batch_size // 2
    assert x.shape == (s.batch_size, s.train_len)
    assert ((y[:half] != -1).sum(1) == 2).all() and ((y[half:] != -1).sum(1) == 4).all()
    assert torch.equal(x, recall.train_batch(mixed, 3)[0]) and not torch.equal(x, recall.train_batch(mixed, 4)[0])
    # validation and evaluation keep num_kv_pairs; the field joins a run's identity only when set
    assert ((recall.task_batch(mixed, 2, seed=0).torch()[1] != -1).sum(1) == 4).all()
    assert "train_kv_pairs" not in s.to_dict() and mixed.to_dict()["train_kv_pairs"] == [2, 4]
    with pytest.raises(recall.ConfigError, match="equal parts"):
        recall.dataclasses.replace(s, batch_size=3, train_kv_pairs=(2, 4))
    with pytest.raises(recall.ConfigError, match="mqar setting only"):
        recall.dataclasses.replace(next(x for x in recall.PRESETS["micro"] if x.task == "passkey"),
                                   train_kv_pairs=(2, 4))


def test_lrs_run_part_of_the_sweep(tmp_path):
    s = next(x for x in recall.PRESETS["micro"] if x.name == "mqar_d32")
    out = recall.main(["--preset=micro", "--settings=mqar_d32", "--models=transformer", f"--lrs={s.lr_grid[1]:g}",
                       f"--out={tmp_path}"])
    assert out["runs"] == 1 and {r["learning_rate"] for r in out["records"]} == {s.lr_grid[1]}
    with pytest.raises(recall.ConfigError, match="not in the lr grid"):
        recall.main(["--preset=micro", "--settings=mqar_d32", "--lrs=0.123", f"--out={tmp_path}"])
    # the extra seeds split by lr need the whole seed-0 sweep: which lrs tie is unknown until then
    with pytest.raises(recall.ConfigError, match="seed-0 sweep on mqar_d32 lacks lr"):
        recall.main(["--preset=micro", "--settings=mqar_d32", "--models=transformer", f"--lrs={s.lr_grid[1]:g}",
                     "--extra_seeds=1", f"--out={tmp_path}"])
    recall.main(["--preset=micro", "--settings=mqar_d32", "--models=transformer", f"--out={tmp_path}"])
    tied = recall.candidate_lrs(recall.collect(tmp_path))[("transformer", "mqar_d32")]
    others = [lr for lr in s.lr_grid if lr != tied[0]]
    out = recall.main(["--preset=micro", "--settings=mqar_d32", "--models=transformer", f"--lrs={others[0]:g}",
                       "--extra_seeds=1", f"--out={tmp_path}"])
    assert out["runs"] == int(others[0] in tied)  # only the tied lrs among --lrs get the extra seed
    out = recall.main(["--preset=micro", "--settings=mqar_d32", "--models=transformer", f"--lrs={tied[0]:g}",
                       "--extra_seeds=1", f"--out={tmp_path}"])
    assert out["runs"] == 1
    assert {(r["learning_rate"], r["seed"]) for r in out["records"] if r["seed"] == 1} >= {(tied[0], 1)}


def test_bad_arguments():
    with pytest.raises(recall.ConfigError):
        recall.main(["--preset=micro", "--models=gpt5", "--out=/nonexistent/x"])
    with pytest.raises(recall.ConfigError):
        recall.main(["--preset=micro", "--tasks=sudoku", "--out=/nonexistent/x"])
    with pytest.raises(recall.ConfigError, match="valid: mqar_d32, mqar_d64"):
        recall.main(["--preset=micro", "--tasks=mqar", "--settings=passkey", "--out=/nonexistent/x"])


def test_passkey_checkpoint_carries_its_tokenizer(tmp_path):
    """A kept passkey checkpoint names its character vocabulary, so sample.py and eval.py can read it: the
    tokenizer they rebuild encodes the task's own text to the ids the model was trained on."""
    import sample
    from data import recall_tasks
    s = next(x for x in recall.PRESETS["micro"] if x.task == "passkey")
    s = dataclasses.replace(s, learning_rate=s.lr_grid[0])
    recall.run_one("transformer", s, tmp_path, "micro", keep_ckpt=True, log=lambda *a, **k: None)
    run_dir = next((tmp_path / "ckpt").iterdir())
    loaded = sample.load_model(str(run_dir))
    assert loaded.tokenizer.kind == "char"
    batch = recall_tasks.passkey(2, context_len=s.train_len, seed=3)
    text = recall_tasks.decode(batch.inputs[0])
    assert loaded.tokenizer.encode(text) == batch.inputs[0].tolist()
    assert loaded.tokenizer.decode(batch.inputs[0]) == text


def test_runs_at_an_older_model_config_are_neither_reused_nor_reported(tmp_path, capsys):
    """A default change makes a cached run stale: the tables skip it, naming it, and the next invocation trains
    it again. Here one run was made with another alpha_init, another with one that today's range rejects."""
    out = tmp_path / "recall"
    args = ["--preset=micro", f"--out={out}", "--models=moneta_linear", "--tasks=mqar"]
    first = recall.main(args)
    runs = sorted((out / "runs").glob("*.json"))[:2]
    stale = [json.loads(p.read_text()) for p in runs]
    for run, p, alpha_init in zip(stale, runs, (0.99999, 0.5)):  # Moneta's range: [0.9995, 1]
        run["model_config"]["alpha_init"] = alpha_init
        p.write_text(json.dumps(run))
    capsys.readouterr()
    kept = recall.collect(out)
    err = capsys.readouterr().err
    assert all(f"skipping {p.name}: made at another config" in err for p in runs), err
    assert kept and not any(r in kept for run in stale for r in run["records"])
    tables = recall.main(args + ["--tables_only"])
    assert tables["runs"] == tables["cached"] == 0
    assert [{k: v for k, v in r.items() if k != "selected"} for r in tables["records"]] == kept
    again = recall.main(args)
    assert again["runs"] == 2 and again["cached"] == first["runs"] - 2
    assert all(json.loads(p.read_text())["model_config"]["alpha_init"] == 0.9999 for p in runs)
