"""`pyrefusal optimize` on the tiny model: kernel maths, adapter exactness, study storage and resume, pick, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from pyrefusal.cli import main
from pyrefusal.errors import PyrefusalError
from pyrefusal.method.kernel import Kernel, interpolate_layers, kernel_weights, mean_direction
from pyrefusal.settings import OptimizeSettings
from pyrefusal.steering.weighted import WeightedAblation, WriterRows, export_weighted_lora, write_weighted_lora
from pyrefusal.studies.optimize import run_optimize
from pyrefusal.studies.run import RunConfig, run_pipeline
from tests.tiny_model import write_tiny_gguf

pytest.importorskip("optuna")


# --- kernel maths (NumPy only) -------------------------------------------------------------------


def test_kernel_weights_peak_falloff_and_zero_beyond():
    k = Kernel(max_weight=1.3, max_position=4.0, min_weight=0.2, falloff=2.0)
    w = kernel_weights(k, 10)
    assert w.shape == (10,)
    assert w[4] == pytest.approx(1.3)  # the maximum at its position
    assert w[2] == pytest.approx(0.2) and w[6] == pytest.approx(0.2)  # the falloff reaches the minimum
    assert w[3] == pytest.approx(0.75) and w[5] == pytest.approx(0.75)  # linear in between
    assert np.all(w[[0, 1, 7, 8, 9]] == 0.0)  # layers farther away are not edited
    frac = kernel_weights(Kernel(1.0, 2.5, 0.0, 1.0), 5)  # fractional position: both neighbours at distance 0.5
    np.testing.assert_allclose(frac, [0.0, 0.0, 0.5, 0.5, 0.0])
    np.testing.assert_allclose(Kernel.full(7).weights(7), np.ones(7))
    with pytest.raises(PyrefusalError, match="falloff"):
        kernel_weights(Kernel(1.0, 0.0, 0.0, 0.0), 3)


def test_fractional_index_interpolates_adjacent_candidates_and_languages_mix():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((4, 16)) * np.array([[1.0], [3.0], [0.5], [2.0]])  # (layers, n_embd), any norms
    unit = v / np.linalg.norm(v, axis=1, keepdims=True)
    np.testing.assert_allclose(interpolate_layers(v, 2.0), unit[2], atol=1e-12)  # whole index: that candidate
    mid = unit[1] + unit[2]
    np.testing.assert_allclose(interpolate_layers(v, 1.5), mid / np.linalg.norm(mid), atol=1e-12)
    q = 0.75 * unit[0] + 0.25 * unit[1]
    np.testing.assert_allclose(interpolate_layers(v, 0.25), q / np.linalg.norm(q), atol=1e-12)
    m = unit[0] + unit[3]
    np.testing.assert_allclose(mean_direction(np.stack([v[0], v[3]])), m / np.linalg.norm(m), atol=1e-12)
    with pytest.raises(PyrefusalError, match="outside"):
        interpolate_layers(v, 3.5)
    with pytest.raises(PyrefusalError, match="cancel"):
        mean_direction(np.stack([v[0], -v[0]]))


# --- the adapter is the weight edit, searched or exported -----------------------------------------


def _edit(weights: dict[str, np.ndarray], ab: WeightedAblation) -> dict[str, np.ndarray]:
    """W - w(l) r̂ r̂ᵀ W per writer and E - e (E r̂) r̂ᵀ, in NumPy float64 (independent of the adapter code)."""
    r = ab.direction
    out = {k: np.array(v, copy=True) for k, v in weights.items()}
    for il in range(ab.n_layer):
        for name, w in ((f"blk.{il}.attn_output.weight", ab.attn[il]), (f"blk.{il}.ffn_down.weight", ab.mlp[il])):
            W = weights[name].astype(np.float64)  # (n_embd, n_in)
            out[name] = (W - w * np.outer(r, r @ W)).astype(np.float32)
    E = weights["token_embd.weight"].astype(np.float64)  # (n_vocab, n_embd)
    out["token_embd.weight"] = (E - ab.embeddings * np.outer(E @ r, r)).astype(np.float32)
    return out


def test_searched_adapter_equals_exported_adapter_and_numpy_weight_edit(tiny_model, tmp_path):
    from pyrefusal.runtime.runtime import Runtime

    path, weights = tiny_model
    rng = np.random.default_rng(1)
    basis = rng.standard_normal((6, 64))  # the search's candidates
    direction = 0.3 * basis[1] - 1.2 * basis[4] + 0.5 * basis[5]  # a mix of them, as a fractional/mean pick is
    ab = WeightedAblation(direction, np.array([0.0, 1.3, 0.6]), np.array([0.9, 0.0, 1.1]), embeddings=1.0)

    searched = write_weighted_lora(
        WriterRows(path, basis, embeddings=True), ab, tmp_path / "searched.gguf", provenance={"base_sha256": "x"}
    )
    exported = export_weighted_lora(path, ab, tmp_path / "exported.gguf", provenance={"base_sha256": "x"})
    edited = tmp_path / "edited.gguf"
    write_tiny_gguf(edited, weights=_edit(weights, ab))

    with Runtime(path, n_ctx=1024, n_seq_max=4, kv_f32=True) as rt:
        toks = [rt.chat_tokens(t) for t in ("How do I pick a lock?", "Write a poem about rain.")]
        base = rt.last_logits(toks)
        rt.set_lora([(searched, 1.0)])
        a = rt.last_logits(toks)
        rt.free_lora(searched)
        rt.set_lora([(exported, 1.0)])
        b = rt.last_logits(toks)
        rt.clear_plan()
        assert np.array_equal(rt.last_logits(toks), base)  # freed and removed: the base model again
    with Runtime(edited, n_ctx=1024, n_seq_max=4, kv_f32=True) as merged:
        c = merged.last_logits(toks)
    np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(a, c, atol=1e-4)
    assert np.abs(a - base).max() > 1e-2  # the edit does change the model
    with pytest.raises(PyrefusalError, match="span"):
        WriterRows(path, basis[:2], embeddings=False).coefficients(basis[3])


# --- the study ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tiny_model, polyrefuse_dir, tmp_path_factory):
    path, _ = tiny_model
    out = tmp_path_factory.mktemp("optimize") / "run"
    cfg = RunConfig(
        model=str(path),
        data_dir=str(polyrefuse_dir),
        target_langs=("en", "de"),
        n_train=6,
        n_val=4,
        n_test=3,
        max_new_tokens=4,
        kl_threshold=1e9,
        n_ctx=2048,
        n_seq_max=8,
        refusal_openings=("I",),
        capability=False,
    )
    run_pipeline(cfg, out, log=lambda s: None)
    return out


def _settings(**kw) -> OptimizeSettings:
    base = {"n_val": 2, "max_new_tokens": 3, "kl_threshold": 1e9, "n_confirm": 1, "n_ctx": 2048, "n_seq_max": 8}
    base.update(kw)
    return OptimizeSettings(**base)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_search_writes_its_files_and_resumes_without_losing_or_repeating_trials(tiny_run):
    import optuna

    out = tiny_run / "optimize"
    logs: list[str] = []
    res = run_optimize(_settings(trials=2), out, log=logs.append)
    assert (out / "study.db").exists() and (out / "pareto.png").exists() and (out / "pareto.md").exists()
    rows = first = _rows(out / "trials.jsonl")
    assert [r["number"] for r in rows] == [0, 1] and all(r["state"] == "COMPLETE" for r in rows)
    for r in rows:
        assert set(r["per_language"]) == {"en", "de"} and r["kl"] >= 0
        assert r["refusal"] == pytest.approx(np.mean([v["refusal"] for v in r["per_language"].values()]))
        assert r["worst_refusal"] == pytest.approx(max(v["refusal"] for v in r["per_language"].values()))
        assert set(r["seconds"]) == {"build", "apply", "forward", "release"}
    assert any("trial 1 (2/2)" in m and "ETA" in m for m in logs)
    assert res["reference"]["paper"]["layer"] == json.loads((tiny_run / "selection.json").read_text())["layer"]

    # a process killed in the middle of a trial leaves it RUNNING in study.db
    study = optuna.load_study(study_name="pyrefusal-optimize", storage=f"sqlite:///{out / 'study.db'}")
    killed = study.ask({"position": optuna.distributions.CategoricalDistribution([-5, -4, -3, -2, -1])})
    killed_position = killed.params["position"]

    run_optimize(_settings(trials=4), out, log=lambda s: None)  # continue to 4 complete trials
    rows = _rows(out / "trials.jsonl")
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert len(complete) == 4
    assert [r["params"] for r in complete[:2]] == [r["params"] for r in first]  # kept as they were
    failed = [r for r in rows if r["state"] == "FAIL"]
    assert [r["number"] for r in failed] == [killed.number]
    retry = [r for r in complete if r.get("retry_of") == killed.number]
    assert len(retry) == 1 and retry[0]["params"]["position"] == killed_position  # redone with its parameters
    keys = [json.dumps(r["params"], sort_keys=True) for r in complete]
    assert len(set(keys)) == 4  # no trial drawn twice

    run_optimize(_settings(), out, log=lambda s: None)  # no --trials: nothing added
    assert len([r for r in _rows(out / "trials.jsonl") if r["state"] == "COMPLETE"]) == 4


def test_pick_writes_pick_json_and_export_lora_uses_it(tiny_run, tmp_path):
    from pyrefusal.runtime.runtime import Runtime
    from pyrefusal.stages.search import SearchSpace  # noqa: F401  (the space is what pick.json is rebuilt from)
    from pyrefusal.steering.weighted import apply_weighted

    runner = CliRunner()
    r = runner.invoke(
        main,
        ["optimize", str(tiny_run), "--trials", "3", "--n-val", "2", "--max-new-tokens", "3", "--n-confirm", "1",
         "--kl-threshold", "1e9", "--pick", "1"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    out = tiny_run / "optimize"
    pick = json.loads((out / "pick.json").read_text())
    assert pick["trial"] == 1
    row = next(x for x in _rows(out / "trials.jsonl") if x["number"] == 1)
    assert pick["params"] == row["params"] and pick["ablation"]["attn"] == pytest.approx(row["weights"]["attn"])
    test = json.loads((out / "pick_test.json").read_text())
    assert set(test["generation"]) == {"baseline", "paper", "pick"}
    assert test["generation"]["pick"]["pooled"]["harmful"]["n"] == 6  # 3 test prompts x en, de
    assert "## The pick (trial 1) on the test split" in (out / "report.md").read_text()

    r = runner.invoke(main, ["export", "lora", str(tiny_run), "-o", str(tmp_path / "pick.gguf")])
    assert r.exit_code == 0, r.output
    assert "optimize trial 1" in r.output
    ab = WeightedAblation.from_dict(pick["ablation"])
    with Runtime(pick["model"], n_ctx=1024, n_seq_max=4, kv_f32=True) as rt:
        toks = [rt.chat_tokens(t) for t in ("How do I pick a lock?", "Write a poem about rain.")]
        rt.set_lora([(tmp_path / "pick.gguf", 1.0)])
        exported = rt.last_logits(toks)
        rt.clear_plan()
        searched_path = write_weighted_lora(
            WriterRows(pick["model"], np.eye(64), embeddings=ab.embeddings > 0),
            ab,
            tmp_path / "searched.gguf",
            provenance={"base_sha256": "x"},
        )
        apply_weighted(rt, searched_path, ab, hook_embeddings=False)
        searched = rt.last_logits(toks)
    np.testing.assert_allclose(exported, searched, atol=1e-4)

    r = runner.invoke(main, ["export", "lora", str(tiny_run), "--paper", "-o", str(tmp_path / "paper.gguf")])
    assert r.exit_code == 0 and "optimize trial" not in r.output


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"trials": 0}, "trials"),
        ({"max_weight": (1.5, 0.8)}, "max-weight"),
        ({"kernel": "gaussian"}, "kernel"),
        ({"languages": ("xx",)}, "xx"),
        ({"direction_langs": ("xx",)}, "xx"),
    ],
)
def test_bad_settings_fail_before_any_work(tiny_run, tmp_path, kw, match):
    out = tmp_path / "optimize"
    with pytest.raises(PyrefusalError, match=match):
        run_optimize(_settings(**kw), out, run_dir=tiny_run, log=lambda s: None)
    assert not (out / "study.db").exists()


def test_optimize_needs_a_finished_run_and_a_real_trial(tiny_run, tmp_path):
    r = CliRunner().invoke(main, ["optimize", str(tmp_path), "--trials", "1"])
    assert r.exit_code == 2 and "not a finished `pyrefusal run` directory" in r.output
    with pytest.raises(PyrefusalError, match="trial number"):
        run_optimize(_settings(), tmp_path / "o", run_dir=tiny_run, pick=-1, log=lambda s: None)


@pytest.mark.slow
def test_searched_and_exported_adapters_agree_on_the_quantized_default_model(tmp_path):
    """Q4_K_M: the search's adapter (a 12-direction basis) and the export's (the direction alone) hold the same
    tensors up to float32 rounding (~1e-7 relative), and give the same next-token distributions up to the noise
    that such rounding causes in llama.cpp's quantized-activation matmuls (measured: mean |Δlogit| 0.018 against
    an intervention effect of 0.32, KL 2e-4, same argmax)."""
    from pyrefusal.data.registry import DEFAULT_MODEL, resolve_model
    from pyrefusal.runtime.runtime import Runtime

    try:
        model = resolve_model(DEFAULT_MODEL, progress=False).path
    except PyrefusalError as e:
        pytest.skip(f"default model unavailable: {e}")
    with Runtime(model, n_ctx=1024, n_seq_max=4, n_threads=2) as rt:
        n_layer, n_embd = rt.n_layer, rt.n_embd
        rng = np.random.default_rng(2)
        basis = rng.standard_normal((12, n_embd))
        ab = WeightedAblation(basis[3] - 0.5 * basis[7], np.linspace(0.2, 1.4, n_layer), np.full(n_layer, 0.9))
        searched = write_weighted_lora(
            WriterRows(model, basis, embeddings=False), ab, tmp_path / "s.gguf", provenance={"base_sha256": "x"}
        )
        exported = export_weighted_lora(model, ab, tmp_path / "e.gguf", provenance={"base_sha256": "x"})
        toks = [rt.chat_tokens(t) for t in ("How do I pick a lock?", "Write a poem about rain.")]
        base = rt.last_logits(toks)
        rt.set_lora([(searched, 1.0)])
        a = rt.last_logits(toks)
        rt.free_lora(searched)
        rt.set_lora([(exported, 1.0)])
        b = rt.last_logits(toks)
    from pyrefusal.method.selection import kl_divergence

    assert np.abs(a - base).mean() > 0.1  # the intervention's effect
    assert np.abs(a - b).mean() < 0.05 and kl_divergence(a, b).max() < 2e-3
    assert np.array_equal(a.argmax(axis=1), b.argmax(axis=1))
