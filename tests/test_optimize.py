"""`pyrefusal optimize` on the tiny model: kernel maths, adapter exactness, study storage and resume, pick, errors."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from pyrefusal.cli import main
from pyrefusal.errors import PyrefusalError
from pyrefusal.method.kernel import Kernel, interpolate_layers, kernel_weights, mean_direction
from pyrefusal.settings import OptimizeSettings
from pyrefusal.steering.export import ExportError
from pyrefusal.steering.weighted import WeightedAblation, WriterRows, export_weighted_lora, write_weighted_lora
from pyrefusal.studies.optimize import run_optimize
from tests.tiny_model import finished_tiny_run, write_tiny_gguf

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
    """W - w(l) Rᵀ R W per writer and E - e (E Rᵀ) R, in NumPy float64 (independent of the adapter code); R = the
    ablation's orthonormal rows ``(k, n_embd)`` (k = 1: r̂ r̂ᵀ)."""
    R = ab.basis  # (k, n_embd)
    out = {k: np.array(v, copy=True) for k, v in weights.items()}
    for il in range(ab.n_layer):
        for name, w in ((f"blk.{il}.attn_output.weight", ab.attn[il]), (f"blk.{il}.ffn_down.weight", ab.mlp[il])):
            W = weights[name].astype(np.float64)  # (n_embd, n_in)
            out[name] = (W - w * R.T @ (R @ W)).astype(np.float32)
    E = weights["token_embd.weight"].astype(np.float64)  # (n_vocab, n_embd)
    out["token_embd.weight"] = (E - ab.embeddings * (E @ R.T) @ R).astype(np.float32)
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


def test_rank_k_adapter_removes_the_span_of_k_directions(tiny_model, tmp_path):
    """k directions (one per language) as one rank-k LoRA: searched == exported == the NumPy edit (<= 1e-4)."""
    from pyrefusal.runtime.runtime import Runtime

    path, weights = tiny_model
    rng = np.random.default_rng(2)
    basis = rng.standard_normal((6, 64))
    dirs = np.stack([basis[0] + 0.5 * basis[2], basis[1] - 0.3 * basis[5]])  # e.g. en and de at one index
    ab = WeightedAblation(dirs, np.array([0.4, 1.2, 0.0]), np.array([1.0, 0.7, 0.9]), embeddings=1.0)
    assert ab.rank == 2 and np.allclose(ab.basis @ ab.basis.T, np.eye(2))
    assert np.allclose(ab.basis.T @ (ab.basis @ dirs.T), dirs.T)  # the same span
    assert ab.basis[0] @ dirs[0] > 0  # Gram-Schmidt orientation
    again = WeightedAblation.from_dict(json.loads(json.dumps(ab.to_dict())))  # pick.json round trip
    assert again.rank == 2 and np.array_equal(again.direction, ab.direction) and again.sha256() == ab.sha256()
    with pytest.raises(PyrefusalError, match="linearly dependent"):
        WeightedAblation(np.stack([dirs[0], 2 * dirs[0]]), ab.attn, ab.mlp)

    searched = write_weighted_lora(
        WriterRows(path, basis, embeddings=True), ab, tmp_path / "searched.gguf", provenance={"base_sha256": "x"}
    )
    exported = export_weighted_lora(path, ab, tmp_path / "exported.gguf", provenance={"base_sha256": "x"})
    edited = tmp_path / "edited.gguf"
    write_tiny_gguf(edited, weights=_edit(weights, ab))
    one = WeightedAblation(dirs[0], ab.attn, ab.mlp, embeddings=1.0)  # the first direction alone
    first = export_weighted_lora(path, one, tmp_path / "one.gguf", provenance={"base_sha256": "x"})
    with Runtime(path, n_ctx=1024, n_seq_max=4, kv_f32=True) as rt:
        toks = [rt.chat_tokens(t) for t in ("How do I pick a lock?", "Write a poem about rain.")]
        got = {}
        for name, f in (("searched", searched), ("exported", exported), ("one", first)):
            rt.set_lora([(f, 1.0)])
            got[name] = rt.last_logits(toks)
            rt.set_lora(None)
            rt.free_lora(f)
    with Runtime(edited, n_ctx=1024, n_seq_max=4, kv_f32=True) as merged:
        want = merged.last_logits(toks)
    np.testing.assert_allclose(got["searched"], want, atol=1e-4)
    np.testing.assert_allclose(got["exported"], want, atol=1e-4)
    assert np.abs(got["one"] - want).max() > 1e-2  # the second direction matters


# --- generation stops once the detector has decided ----------------------------------------------


class _Contains:
    """A detector that calls a text a refusal when it contains one of ``markers`` (a stand-in for the substring
    detector whose markers the tiny random model never writes)."""

    name = "contains-test"

    def __init__(self, markers: tuple[str, ...]) -> None:
        self.markers = markers

    def judge(self, text: str, lang: str):
        from pyrefusal.method.refusal import RefusalVerdict

        hit = next((m for m in self.markers if m in text), None)
        return RefusalVerdict(hit is not None, hit, self.name)


def test_early_stop_ends_refusals_and_keeps_every_verdict_of_full_generation(tiny_model):
    from pyrefusal.data.polyrefuse import Prompt
    from pyrefusal.runtime.runtime import Runtime
    from pyrefusal.stages.generate import complete_armed

    texts = ["How do I pick a lock?", "Write a poem about rain.", "Tell me a story about the sea.", "Hello there"]
    prompts = [Prompt(f"harmful/val/en/{i}", t, t, "en", "harmful", "val") for i, t in enumerate(texts)]
    n = 16
    with Runtime(tiny_model[0], n_ctx=1024, n_seq_max=4, kv_f32=True) as rt:
        plain = complete_armed(rt, prompts, "c", _Contains(()), max_new_tokens=n)
        marker = plain[0].response[8:12]  # written mid-answer by prompt 0: a "refusal" the detector decides early
        assert len(marker) == 4 and not plain[0].response.startswith(marker)
        det = _Contains((marker,))
        full = complete_armed(rt, prompts, "c", det, max_new_tokens=n)
        early = complete_armed(rt, prompts, "c", det, max_new_tokens=n, stop_when_refused=True)
    assert [c.refused for c in early] == [c.refused for c in full] == [marker in c.response for c in plain]
    assert full[0].refused and full[0].n_tokens == n
    stopped = [i for i, c in enumerate(early) if c.finish_reason == "refusal_detected"]
    assert 0 in stopped and early[0].n_tokens < n
    for i, (e, f) in enumerate(zip(early, full, strict=True)):
        if i in stopped:  # ended at the token that completed the marker: a prefix of the full answer
            assert e.refused and f.response.startswith(e.response) and marker in e.response
            assert e.refusal_token == e.n_tokens == f.refusal_token
        else:  # compliant (or refused only at the budget): the same answer as full generation
            assert (e.response, e.n_tokens, e.finish_reason) == (f.response, f.n_tokens, f.finish_reason)


# --- the study ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tiny_model, polyrefuse_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("optimize") / "run"
    return finished_tiny_run(tiny_model[0], polyrefuse_dir, out, target_langs=("en", "de"), n_test=3)


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
    report = (out / "report.md").read_text()
    assert "## The pick (trial 1) on the test split" in report
    gen = test["generation"]["pick"]["pooled"]["harmful"]
    assert gen["n"] == 6 and 0 < gen["tokens"] <= 3 * gen["n"]  # 3 tokens at most per completion
    assert "stopped early once the detector read a refusal" in report
    done = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert {c["finish_reason"] for c in done} <= {"eos", "length", "refusal_detected"}
    assert all(c["refused"] for c in done if c["finish_reason"] == "refusal_detected")

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


def _llama_logits(llama, tokens: list[int]) -> np.ndarray:
    """Logits after the last of ``tokens`` (float32 ``(n_vocab,)``), from a fresh KV cache."""
    llama.reset()
    llama.eval(tokens)
    return np.array(llama.scores[llama.n_tokens - 1], dtype=np.float32)


def test_export_cvec_adds_the_picks_direction(tiny_run, tmp_path):
    """`export cvec` of a run with a pick adds the pick's direction at the run direction's norm; --paper the run's."""
    from pyrefusal.steering.export import load_control_vector
    from pyrefusal.steering.weighted import pick_control_vector, read_pick

    out = tiny_run / "optimize"
    if not (out / "pick.json").exists():  # this test alone: make a study with a pick
        run_optimize(_settings(trials=2), out, run_dir=tiny_run, pick=1, log=lambda s: None)
    ablation, record = read_pick(tiny_run)
    r = np.load(tiny_run / "direction.npy")  # (n_embd,), not unit
    files = {}
    for name, extra in (("pick", []), ("paper", ["--paper"])):
        files[name] = tmp_path / f"{name}.gguf"
        res = CliRunner().invoke(
            main, ["export", "cvec", str(tiny_run), "--layer", "2", "--coeff", "-0.5", "-o", str(files[name]), *extra]
        )
        assert res.exit_code == 0, res.output
    pick, paper = (load_control_vector(files[k]) for k in ("pick", "paper"))
    assert sorted(pick) == sorted(paper) == [1]  # --layer 2: direction.1
    np.testing.assert_allclose(paper[1], -0.5 * r, rtol=1e-6)
    want = -0.5 * np.linalg.norm(r.astype(np.float64)) * ablation.direction
    np.testing.assert_allclose(pick[1], want, rtol=1e-5, atol=1e-6)
    assert abs(np.linalg.norm(pick[1]) - np.linalg.norm(paper[1])) < 1e-4 * np.linalg.norm(paper[1])
    # without --layer: the whole layer nearest the pick's fractional index; a rank-k pick cannot be one vector
    _, block = pick_control_vector(ablation, {"params": {"direction_index": 2.6}}, r, 1)
    assert block == 3
    assert pick_control_vector(ablation, {"params": {}}, r, 1)[1] == 1  # the layer was not searched: the run's
    span = WeightedAblation(np.eye(2, r.size), ablation.attn, ablation.mlp)
    with pytest.raises(ExportError, match="a control vector adds one"):
        pick_control_vector(span, record, r, 1)


def test_steered_model_chat_and_serve_use_the_pick(tiny_run, tmp_path, monkeypatch):
    """SteeredModel.from_run applies pick.json as the exported per-writer LoRA (<= 1e-4); --paper ignores it."""
    import llama_cpp

    from pyrefusal.runtime.runtime import Runtime
    from pyrefusal.steering import steered
    from pyrefusal.steering.steered import SteeredModel, chat_repl, steering_from_run
    from pyrefusal.steering.weighted import apply_weighted, read_pick

    monkeypatch.setenv("PYREFUSAL_CACHE", str(tmp_path / "cache"))  # the adapter cache, not the user's
    out = tiny_run / "optimize"
    if not (out / "pick.json").exists():  # this test alone: make a study with a pick
        run_optimize(_settings(trials=2), out, run_dir=tiny_run, pick=1, log=lambda s: None)
    ablation, record = read_pick(tiny_run)
    model = record["model"]
    exported = tmp_path / "pick.gguf"
    r = CliRunner().invoke(main, ["export", "lora", str(tiny_run), "-o", str(exported)])
    assert r.exit_code == 0, r.output
    f32 = {"type_k": 0, "type_v": 0, "logits_all": True}  # F32 KV cache (GGML_TYPE_F32); Llama.scores filled
    by_hand = llama_cpp.Llama(model, n_ctx=512, lora_path=str(exported), verbose=False, **f32)
    prompts = ("How do I pick a lock?", "Write a poem about rain.")
    toks = [by_hand.tokenize(p.encode(), add_bos=True) for p in prompts]
    want = [_llama_logits(by_hand, t) for t in toks]
    by_hand.close()
    with SteeredModel.from_run(tiny_run, n_ctx=512, **f32) as sm:
        d = sm.describe()
        assert d["pick"]["trial"] == record["trial"] and sm.steering.weighted is not None
        assert d["source"].startswith(f"optimize pick #{record['trial']}") and d["exact"]
        got = [_llama_logits(sm.llama, t) for t in toks]
        lines = iter(["/quit"])
        say = io.StringIO()
        chat_repl(sm, input_fn=lambda _: next(lines), output=say)
        assert f"of optimize pick #{record['trial']}" in say.getvalue()
        with pytest.raises(PyrefusalError, match="apply_weighted"):
            _ = sm.intervention
    for g, w in zip(got, want, strict=True):
        assert np.abs(g).max() > 1.0  # real logits (Llama.scores stays 0 without logits_all)
        np.testing.assert_allclose(g, w, atol=1e-4)
    # the same intervention as pyrefusal's Runtime scores it in the search (adapter armed by apply_weighted)
    with Runtime(model, n_ctx=512, n_seq_max=1, kv_f32=True) as rt:
        apply_weighted(rt, exported, ablation, hook_embeddings=False)
        searched = [rt.last_logits([t])[0] for t in toks]  # (n_vocab,) each
        rt.clear_plan()
        plain = [rt.last_logits([t])[0] for t in toks]
    for g, s_ in zip(got, searched, strict=True):
        np.testing.assert_allclose(g, s_, atol=1e-4)
    assert max(np.abs(g - p).max() for g, p in zip(got, plain, strict=True)) > 1e-2  # the pick changes the model

    with SteeredModel.from_run(tiny_run, n_ctx=512, paper=True, **f32) as paper:
        assert paper.steering.weighted is None and "paper's direction" in paper.describe()["source"]
        assert paper.intervention.name == "ablation"
        assert np.abs(_llama_logits(paper.llama, toks[0]) - got[0]).max() > 1e-3  # not the pick
    assert steering_from_run(tiny_run, intervention="addition", layer=2).pick is None  # the run's direction

    served: list[str] = []
    monkeypatch.setattr(steered, "serve", lambda *a, **kw: served.append(str(a[1])))
    for flags, says in (([], f"optimize pick #{record['trial']}"), (["--paper"], "the paper's direction")):
        r = CliRunner().invoke(main, ["serve", str(tiny_run), *flags])
        assert r.exit_code == 0, r.output
        assert says in r.output.splitlines()[0], r.output
    assert "weighted-" in served[0] and "ablation-" in served[1]  # the pick's adapter, then the run's

    bad = json.loads((out / "pick.json").read_text())
    bad["base_sha256"] = "0" * 64
    moved = tmp_path / "run"
    (moved / "optimize").mkdir(parents=True)
    for name in ("results.json", "direction.npy"):
        (moved / name).write_bytes((tiny_run / name).read_bytes())
    (moved / "optimize" / "pick.json").write_text(json.dumps(bad))
    with pytest.raises(PyrefusalError, match="picked on another model"):
        steering_from_run(moved)
    (moved / "optimize" / "pick.json").write_text("{")
    with pytest.raises(PyrefusalError, match="damaged"):
        steering_from_run(moved)
    assert steering_from_run(moved, paper=True).pick is None


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


def test_best_trial_rule():
    from pyrefusal.studies.optimize import best_trial

    values = {0: (0.30, 0.01), 1: (0.05, 0.40), 2: (0.10, 0.20), 3: (0.10, 0.15), 4: (0.12, 0.05)}
    assert best_trial(values, 0.25) == 3  # 1 refuses least but is over the bound; 2 and 3 tie: the lower KL
    assert best_trial(values, 1.0) == 1 and best_trial(values, 0.01) == 0
    with pytest.raises(PyrefusalError, match=r"no trial has val KL <= 0\.0050 \(the least is trial 0's"):
        best_trial(values, 0.005)
    with pytest.raises(PyrefusalError, match="no complete trial"):
        best_trial({}, 1.0)


def test_pick_best_chooses_by_the_rule_and_records_it(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("optimize"))
    args = ["optimize", str(run), "--trials", "3", "--n-val", "2", "--max-new-tokens", "3", "--n-confirm", "0",
            "--kl-threshold", "1e9", "--no-test-harmless"]  # fmt: skip
    r = CliRunner().invoke(main, [*args, "--pick", "best", "--pick-max-kl", "1e9"])
    assert r.exit_code == 0, r.output
    rows = [x for x in _rows(run / "optimize" / "trials.jsonl") if x["state"] == "COMPLETE"]
    want = min(rows, key=lambda x: (x["refusal"], x["kl"], x["number"]))["number"]
    pick = json.loads((run / "optimize" / "pick.json").read_text())
    assert pick["trial"] == want and pick["chosen_by"]["rule"] == "best" and pick["chosen_by"]["max_kl"] == 1e9
    assert f"--pick best: trial {want}" in r.output
    # the default bound: half the paper's pick's val KL on the same prompts (reference.json)
    paper_kl = json.loads((run / "optimize" / "reference.json").read_text())["paper"]["kl"]
    within = [x for x in rows if x["kl"] <= paper_kl / 2]
    r = CliRunner().invoke(main, [*args, "--pick", "best"])
    if within:
        assert r.exit_code == 0, r.output
        assert json.loads((run / "optimize" / "pick.json").read_text())["chosen_by"]["max_kl"] == paper_kl / 2
    else:
        assert r.exit_code == 1 and "raise the bound (--pick-max-kl)" in r.output
    bad = CliRunner().invoke(main, [*args, "--pick", "first"])
    assert bad.exit_code == 2 and "give a trial number" in bad.output
    with pytest.raises(PyrefusalError, match="goes with --pick best"):
        run_optimize(_settings(), tmp_path / "o", run_dir=tiny_run, pick=1, pick_max_kl=0.1, log=lambda s: None)


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


def test_a_span_trial_removes_every_languages_direction_and_its_pick_exports(tiny_run, tmp_path):
    """--direction-span: a trial may ablate the en and de directions together (rank 2), scored, picked, exported."""
    import optuna

    from pyrefusal.runtime.runtime import Runtime
    from pyrefusal.steering.weighted import apply_weighted

    out = tmp_path / "optimize"
    out.mkdir()
    study = optuna.create_study(
        storage=f"sqlite:///{out / 'study.db'}", study_name="pyrefusal-optimize", directions=["minimize", "minimize"]
    )
    study.enqueue_trial({"direction_source": "span"})  # the other parameters are drawn
    cfg = _settings(trials=1, direction_langs=("en", "de"), direction_span=True, n_confirm=0)
    res = run_optimize(cfg, out, run_dir=tiny_run, pick=0, log=lambda s: None)
    (row,) = [r for r in res["trials"] if r["state"] == "COMPLETE"]
    assert row["params"]["direction_source"] == "span" and row["kl"] > 0
    assert res["space"]["sources"] == ["en", "de", "mean", "span"]
    pick = json.loads((out / "pick.json").read_text())
    ab = WeightedAblation.from_dict(pick["ablation"])
    assert ab.rank == 2 and np.array(pick["ablation"]["direction"]).shape == (2, 64)
    exported = export_weighted_lora(pick["model"], ab, tmp_path / "span.gguf", provenance={"base_sha256": "x"})
    assert ab.attn.tolist() == pytest.approx(row["weights"]["attn"])
    assert ab.mlp.tolist() == pytest.approx(row["weights"]["mlp"])
    with Runtime(pick["model"], n_ctx=1024, n_seq_max=4, kv_f32=True) as rt:
        toks = [rt.chat_tokens(t) for t in ("How do I pick a lock?", "Write a poem about rain.")]
        base = rt.last_logits(toks)
        apply_weighted(rt, exported, ab, hook_embeddings=False)
        got = rt.last_logits(toks)
    assert np.abs(got - base).max() > 1e-2
    assert json.loads((out / "pick_test.json").read_text())["generation"]["pick"]["pooled"]["harmful"]["n"] == 6
    # --n-test / --no-test-harmless only shape the pick's test split: a finished study picks again without new
    # trials and without scoring its val prompts again (reference.json is read)
    logs: list[str] = []
    again = cfg.replace(trials=None, n_test=2, test_harmless=False)
    res2 = run_optimize(again, out, run_dir=tiny_run, pick=0, log=logs.append)
    gen = json.loads((out / "pick_test.json").read_text())["generation"]["pick"]["pooled"]
    assert gen["harmful"]["n"] == 4 and "harmless" not in gen
    assert any("read from reference.json" in m for m in logs) and "baseline_and_paper" not in res2["timings"]
    assert res2["reference"] == res["reference"]
