"""`pyrefusal run` mechanics on the tiny model: outputs, resume, configuration guard, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from pyrefusal.cli import main
from pyrefusal.errors import DataError, PyrefusalError
from pyrefusal.studies.run import RunConfig, run_pipeline


def _config(model, data, **kw) -> RunConfig:
    base = {
        "model": str(model),
        "data_dir": str(data),
        "target_langs": ("en", "de"),
        "n_train": 6,
        "n_val": 4,
        "n_test": 3,
        "max_new_tokens": 6,
        "kl_threshold": 1e9,
        "n_ctx": 2048,
        "n_seq_max": 8,
        "refusal_openings": ("I",),
    }
    base.update(kw)
    return RunConfig(**base)


def test_run_writes_every_output_and_resumes(tiny_model, polyrefuse_dir, tmp_path):
    path, _ = tiny_model
    out = tmp_path / "run"
    res = run_pipeline(_config(path, polyrefuse_dir), out, log=lambda s: None)
    for name in (
        "results.json",
        "direction.npy",
        "candidates.npy",
        "completions.jsonl",
        "report.md",
        "selection.json",
        "refusal.png",
    ):
        assert (out / name).exists(), name
    report = (out / "report.md").read_text()
    assert res["figure"] == "refusal.png" and "](refusal.png)" in report
    ppl = res["capability"]["ablation"]["intervention_ppl"]
    assert "## Side effects on harmless text" in report and f"| ablation | {ppl:.2f} |" in report
    assert "## All languages pooled (95% Wilson interval)" in report
    cands = np.load(out / "candidates.npy")
    assert cands.shape == (5, 3, 64) and cands.dtype == np.float32  # 5 eoi positions, 3 layers, n_embd 64
    d = res["direction"]
    np.testing.assert_allclose(
        np.load(out / "direction.npy"), cands[[-5, -4, -3, -2, -1].index(d["position"]), d["layer"]]
    )
    assert set(res["evaluation"]) == {"en", "de"}
    assert res["evaluation"]["en"]["baseline"]["n"] == 3
    assert res["model"]["n_layer"] == 3 and len(res["model"]["sha256"]) == 64
    p_r = res["evaluation"]["en"]["ablation"]["first_token_refusal_prob"]
    assert 0.0 <= p_r <= 1.0
    cap = res["capability"]["ablation"]
    assert cap["baseline_ppl"] > 1 and cap["ppl_ratio"] != 1.0 and cap["first_token_kl"] > 0
    lines = (out / "completions.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 2 * 2 * 3  # langs x conditions x kinds x n_test
    # resume: a finished run re-run generates nothing new and gives the same numbers
    again = run_pipeline(_config(path, polyrefuse_dir), out, log=lambda s: None)
    assert (out / "completions.jsonl").read_text().splitlines() == lines
    assert again["evaluation"] == res["evaluation"]
    # an interrupted run (half the completions lost) continues where it stopped
    (out / "completions.jsonl").write_text("\n".join(lines[:5]) + "\n")
    run_pipeline(_config(path, polyrefuse_dir), out, log=lambda s: None)
    assert len((out / "completions.jsonl").read_text().splitlines()) == len(lines)
    # first-token and capability metrics are kept in metrics.json and not recomputed on a re-run
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["first_token"]) == {"en", "de"} and set(metrics["capability"]) == {"ablation"}
    metrics["first_token"]["en"]["baseline"] = 0.123
    (out / "metrics.json").write_text(json.dumps(metrics))
    again = run_pipeline(_config(path, polyrefuse_dir), out, log=lambda s: None)
    assert again["evaluation"]["en"]["baseline"]["first_token_refusal_prob"] == 0.123
    assert again["capability"] == res["capability"]
    # each resumed invocation keeps what the earlier ones cost (capture and selection ran only in the first)
    assert len(again["timings_previous"]) == 3 and "selection" in again["timings_previous"][0]
    assert "selection" not in again["timings"]
    # `pyrefusal report` recomputes the completion-derived numbers without a model and keeps the rest
    rows = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    target = next(i for i, r in enumerate(rows) if r["lang"] == "en" and r["kind"] == "harmful")
    rows[target] |= {"response": "the sun is the sun, " * 8, "refused": True, "refusal_token": 2}
    (out / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(main, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert "## Repetition loops (all languages pooled)" in result.output
    rendered = json.loads((out / "results.json").read_text())
    entry = rendered["evaluation"]["en"][rows[target]["condition"]]
    assert entry["degenerate_rate"] == pytest.approx(1 / 3)
    assert entry["refusal_rate"] == pytest.approx(
        sum(
            r["refused"]
            for r in rows
            if r["lang"] == "en" and r["kind"] == "harmful" and r["condition"] == rows[target]["condition"]
        )
        / 3
    )
    assert rendered["evaluation"]["en"]["baseline"]["first_token_refusal_prob"] == 0.123
    assert rendered["capability"] == res["capability"] and rendered["timings"] == again["timings"]
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["report", str(empty)])
    assert result.exit_code == 2 and "pyrefusal run --out" in result.output
    # another configuration in the same directory is refused, not mixed
    with pytest.raises(PyrefusalError, match="other settings"):
        run_pipeline(_config(path, polyrefuse_dir, n_test=4), out, log=lambda s: None)


def test_run_extends_to_more_languages_and_conditions(tiny_model, polyrefuse_dir, tmp_path):
    """Added target languages and conditions only generate their own completions; the rest is reused."""
    path, _ = tiny_model
    out = tmp_path / "run"
    first = run_pipeline(_config(path, polyrefuse_dir, capability=False), out, log=lambda s: None)
    lines = (out / "completions.jsonl").read_text().splitlines()
    cfg = _config(
        path,
        polyrefuse_dir,
        capability=False,
        target_langs=("en", "de", "fr"),
        conditions=("baseline", "ablation", "induce"),
    )
    logs: list[str] = []
    res = run_pipeline(cfg, out, log=logs.append)
    assert any("reusing candidates" in m for m in logs)
    grown = (out / "completions.jsonl").read_text().splitlines()
    assert grown[: len(lines)] == lines  # nothing regenerated
    # new: fr under 3 conditions + en/de under induce, 2 kinds x 3 prompts each
    assert len(grown) - len(lines) == (3 + 2) * 2 * 3
    assert res["direction"] == first["direction"]
    for lang in ("en", "de"):
        for cond in ("baseline", "ablation"):
            assert res["evaluation"][lang][cond] == first["evaluation"][lang][cond]
    assert set(res["evaluation"]["fr"]) == {"baseline", "ablation", "induce"}
    assert json.loads((out / "config.json").read_text())["target_langs"] == ["en", "de", "fr"]
    # the same test rows in every language, also in the added one
    ids = json.loads((out / "prompts.json").read_text())["test"]
    assert [i.split("/")[-1] for i in ids["fr"]["harmful"]] == [i.split("/")[-1] for i in ids["en"]["harmful"]]
    # budget curves end at the plain rate; narrowing back reports only the configured conditions
    for by_cond in res["evaluation"].values():
        for e in by_cond.values():
            assert list(e["refusal_by_budget"]) == ["6"] and e["refusal_by_budget"]["6"] == e["refusal_rate"]
    narrow = run_pipeline(_config(path, polyrefuse_dir, capability=False), out, log=lambda s: None)
    assert narrow["evaluation"] == first["evaluation"]
    assert "induce" not in (out / "report.md").read_text()


def test_projected_direction_is_orthogonal_to_the_harmless_mean(tiny_model, polyrefuse_dir, tmp_path):
    path, _ = tiny_model
    out = tmp_path / "projected"
    kw = {"conditions": ("baseline", "ablation"), "capability": False, "target_langs": ("en",)}
    res = run_pipeline(_config(path, polyrefuse_dir, direction_projection="harmless", **kw), out, log=lambda s: None)
    z = np.load(out / "candidates.npz")
    i, layer = list(z["positions"]).index(res["direction"]["position"]), res["direction"]["layer"]
    h = z["harmless_mean"][i, layer]
    r = np.load(out / "direction.npy").astype(np.float64)
    assert abs(r @ h) / (np.linalg.norm(r) * np.linalg.norm(h)) < 1e-5
    raw = z["harmful_mean"][i, layer] - h
    assert abs(raw @ h) / (np.linalg.norm(raw) * np.linalg.norm(h)) > 1e-3  # the plain one is not
    with pytest.raises(PyrefusalError, match="direction_projection"):
        run_pipeline(_config(path, polyrefuse_dir, direction_projection="mean", **kw), tmp_path / "x", log=print)
    # a run directory written before this setting existed resumes as "none"
    cfg = _config(path, polyrefuse_dir, **kw)
    old = tmp_path / "old"
    run_pipeline(cfg, old, log=lambda s: None)
    saved = json.loads((old / "config.json").read_text())
    del saved["direction_projection"]
    (old / "config.json").write_text(json.dumps(saved))
    logs: list[str] = []
    run_pipeline(cfg, old, log=logs.append)
    assert any("reusing selection" in m for m in logs)
    with pytest.raises(PyrefusalError, match="direction_projection"):
        run_pipeline(_config(path, polyrefuse_dir, direction_projection="harmless", **kw), old, log=print)


def test_run_judges_back_translated_responses(tiny_model, polyrefuse_dir, tmp_path):
    """--judge with --judge-translator: non-English responses are translated (cached) before judging."""
    path, _ = tiny_model
    out = tmp_path / "judged"
    logs: list[str] = []
    kw = {"conditions": ("baseline",), "capability": False}
    first = run_pipeline(_config(path, polyrefuse_dir, **kw), out, log=logs.append)
    assert "judge" not in first["evaluation"]["de"]["baseline"]
    generated = (out / "completions.jsonl").read_text()
    # judging is added to the finished run: nothing is generated again
    kw |= {"judge": "wildguard", "judge_model": str(path)}
    cfg = _config(path, polyrefuse_dir, judge_translator="self", **kw)
    res = run_pipeline(cfg, out, log=logs.append)
    assert (out / "completions.jsonl").read_text() == generated
    rows = [json.loads(x) for x in (out / "back_translations.jsonl").read_text().splitlines()]
    completions = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    de = {c["response"] for c in completions if c["lang"] == "de" and c["kind"] == "harmful"}
    assert {r["record"]["response"] for r in rows} == de  # German harmful responses only, each once
    assert all(r["record"]["lang"] == "de" and r["record"]["translator"].startswith("llama:") for r in rows)
    j_de, j_en = res["evaluation"]["de"]["baseline"]["judge"], res["evaluation"]["en"]["baseline"]["judge"]
    assert (
        j_de["n"] == 3 and j_de["back_translation"]["translated"] == 3 and j_en["back_translation"]["translated"] == 0
    )
    assert 0.0 <= j_de["paper_substring_refusal_rate"] <= 1.0 and "note" not in j_de
    # the random model answers no WildGuard format: every verdict is unparsed and counts as "no" (the paper's rule)
    assert j_de["flagged"] == 3 and j_de["refusal_rate"] == 0.0 and j_de["compliance_rate"] == 1.0
    # the judge read the translations: its cache holds one verdict per distinct (prompt, English text)
    assert len((out / "judge_cache.jsonl").read_text().splitlines()) == 6
    report = (out / "report.md").read_text()
    assert "Guard-model judge (judge-wildguard:" in report and "back-translated to English by `llama:" in report
    # a re-run translates and judges nothing again
    logs.clear()
    assert run_pipeline(cfg, out, log=logs.append)["evaluation"] == res["evaluation"]
    assert any("back-translation" in x and ": 0 new" in x for x in logs)
    assert any("judge" in x and ": 0 new" in x for x in logs)
    # without a translator the run says that responses were judged as generated
    plain = run_pipeline(_config(path, polyrefuse_dir, **kw), tmp_path / "plain", log=lambda s: None)
    assert "not back-translated" in plain["evaluation"]["de"]["baseline"]["judge"]["note"]

    def keys(d):
        return {json.loads(x)["key"] for x in (d / "judge_cache.jsonl").read_text().splitlines()}

    assert len(keys(out) & keys(tmp_path / "plain")) == 3  # same English pairs; the German ones differ


def test_run_errors_are_clear(tiny_model, polyrefuse_dir, tmp_path):
    path, _ = tiny_model
    with pytest.raises(DataError, match="no PolyRefuse files"):
        run_pipeline(_config(path, tmp_path / "empty"), tmp_path / "r1", log=lambda s: None)
    with pytest.raises(DataError, match="language 'xx'"):
        run_pipeline(_config(path, polyrefuse_dir, target_langs=("xx",)), tmp_path / "r2", log=lambda s: None)
    with pytest.raises(PyrefusalError, match="unknown condition"):
        run_pipeline(_config(path, polyrefuse_dir, conditions=("nope",)), tmp_path / "r3", log=lambda s: None)
    # impossible sizes are refused before any work (no run directory is written)
    for kw, msg in (
        ({"n_test": 0}, "n_test"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"conditions": ()}, "at least one condition"),
        ({"prune_fraction": 0.0}, "prune_fraction"),
        ({"kl_threshold": -1.0}, "kl_threshold"),
    ):
        with pytest.raises(PyrefusalError, match=msg):
            run_pipeline(_config(path, polyrefuse_dir, **kw), tmp_path / "r4", log=lambda s: None)
    assert not (tmp_path / "r4").exists()


def test_cli_run_and_doctor(tiny_model, polyrefuse_dir, tmp_path):
    path, _ = tiny_model
    runner = CliRunner()
    r = runner.invoke(main, ["doctor"])
    assert r.exit_code == 0 and "llama-cpp-python" in r.output
    args = [
        "run",
        "--model",
        str(path),
        "--data-dir",
        str(polyrefuse_dir),
        "--target-langs",
        "en",
        "--n-train",
        "4",
        "--n-val",
        "2",
        "--n-test",
        "2",
        "--max-new-tokens",
        "4",
        "--kl-threshold",
        "1e9",
        "--refusal-openings",
        "I",
        "--out",
        str(tmp_path / "cli"),
    ]
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert res["direction"]["source_lang"] == "en"
    # every option lands in its config field (renamed, comma-separated and flag options included)
    expected = _config(
        path, polyrefuse_dir, target_langs=("en",), n_train=4, n_val=2, n_test=2, max_new_tokens=4, n_seq_max=16
    )
    expected = {**expected.to_dict(), "n_ctx": RunConfig().n_ctx}
    assert json.loads((tmp_path / "cli" / "config.json").read_text()) == json.loads(json.dumps(expected))
    assert (tmp_path / "cli" / "selection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "selection.png" in (tmp_path / "cli" / "report.md").read_text()
    # --preset paper: the paper's sizes, except what is given explicitly
    paper = [
        "run",
        "--model",
        str(path),
        "--data-dir",
        str(polyrefuse_dir),
        "--target-langs",
        "en",
        "--n-test",
        "2",
        "--max-new-tokens",
        "4",
        "--kl-threshold",
        "1e9",
        "--refusal-openings",
        "I",
        "--out",
        str(tmp_path / "p"),
    ]
    r = runner.invoke(main, [*paper, "--preset", "paper", "--conditions", "baseline", "--no-capability"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert (cfg["n_train"], cfg["n_val"], cfg["n_test"], cfg["max_new_tokens"]) == (128, 32, 2, 4)
    assert cfg["prompt_format"] == "paper" and cfg["conditions"] == ["baseline"]
    r = runner.invoke(
        main,
        [
            "run",
            "--model",
            str(tmp_path / "missing.gguf"),
            "--data-dir",
            str(polyrefuse_dir),
            "--out",
            str(tmp_path / "cli2"),
        ],
    )
    assert r.exit_code == 2 and "not found" in r.output


def test_export_cli_files_reproduce_the_hook(tiny_model, polyrefuse_dir, tmp_path):
    """`pyrefusal export lora|cvec RUN_DIR` files, loaded back through llama.cpp, equal the hook path."""
    from pyrefusal.method import intervention as iv
    from pyrefusal.runtime.runtime import Runtime
    from pyrefusal.steering import router
    from pyrefusal.steering.export import load_control_vector

    path, _ = tiny_model
    out = tmp_path / "run"
    res = run_pipeline(_config(path, polyrefuse_dir, target_langs=("en",), capability=False), out, log=lambda s: None)
    runner = CliRunner()
    r = runner.invoke(main, ["export", "lora", str(out), "-o", str(tmp_path / "abl.gguf")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        main, ["export", "cvec", str(out), "--layer", "2", "--coeff", "-1", "-o", str(tmp_path / "c.gguf")]
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["export", "cvec", str(out), "--layer", "1"])
    assert r.exit_code == 2 and "block input 1" in r.output  # a control vector cannot steer block input 1
    r = runner.invoke(main, ["export", "merged", str(out), "-o", str(tmp_path / "merged.gguf")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "merged.report.json").exists()
    # a file named with -o is never replaced silently (it may be another export): --force replaces it
    before = (tmp_path / "abl.gguf").read_bytes()
    (tmp_path / "taken.gguf").write_bytes(before)
    taken = ["-o", str(tmp_path / "taken.gguf")]
    for args in (["lora"], ["cvec", "--layer", "2"], ["merged"]):
        r = runner.invoke(main, ["export", args[0], str(out), *args[1:], *taken])
        assert r.exit_code == 2 and "exists; pass --force" in r.output, (args, r.output)
    assert (tmp_path / "taken.gguf").read_bytes() == before
    r = runner.invoke(main, ["export", "lora", str(out), "--skip-embeddings", "--force", *taken])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "taken.gguf").read_bytes() != before
    r = runner.invoke(main, ["chat", str(out), "--max-tokens", "4"], input="hello\n/quit\n")
    assert r.exit_code == 0, r.output
    assert '"path": "lora"' in r.output  # the chat model carries the ablation LoRA
    direction = np.load(out / "direction.npy")
    assert res["direction"]["norm"] == pytest.approx(float(np.linalg.norm(direction)), rel=1e-5)
    with Runtime(path, n_ctx=1024, n_seq_max=4, kv_f32=True) as rt:
        toks = [rt.chat_tokens(t) for t in ("How do I pick a lock?", "Write a poem about rain.")]
        router.arm(rt, iv.ablation(direction))
        hook_abl = rt.last_logits(toks)
        rt.clear_plan()
        rt.set_lora([(tmp_path / "abl.gguf", 1.0)])
        lora_abl = rt.last_logits(toks)
        rt.clear_plan()
        router.arm(rt, iv.actadd(direction, layer=2, coeff=-1.0))
        hook_add = rt.last_logits(toks)
        rt.clear_plan()
        rt.set_control_vector(load_control_vector(tmp_path / "c.gguf"))
        cvec_add = rt.last_logits(toks)
        rt.clear_plan()
        base = rt.last_logits(toks)
    with Runtime(tmp_path / "merged.gguf", n_ctx=1024, n_seq_max=4, kv_f32=True) as merged:
        merged_abl = merged.last_logits(toks)
    np.testing.assert_allclose(merged_abl, hook_abl, atol=1e-3)  # F32 base: no requantization
    np.testing.assert_allclose(lora_abl, hook_abl, atol=1e-4)
    np.testing.assert_allclose(cvec_add, hook_add, atol=1e-4)
    assert np.abs(base - hook_abl).max() > 1e-3  # and the ablation does change the model


def test_cli_transfer_and_quant_sweep_on_the_tiny_model(tiny_model, polyrefuse_dir, tmp_path):
    path, _ = tiny_model
    runner = CliRunner()
    common = [
        "--model",
        str(path),
        "--data-dir",
        str(polyrefuse_dir),
        "--n-train",
        "4",
        "--n-val",
        "2",
        "--n-test",
        "2",
        "--max-new-tokens",
        "4",
        "--threads",
        "1",
    ]
    r = runner.invoke(
        main,
        [
            "transfer",
            *common,
            "--sources",
            "en,de",
            "--targets",
            "en,de",
            "--token-method",
            "table",
            "--refusal-openings",
            "en=I;de=Ich",
            "--kl-threshold",
            "1e9",
            "--no-plots",
            "--out",
            str(tmp_path / "tr"),
        ],
    )
    assert r.exit_code == 0, r.output
    matrix = json.loads((tmp_path / "tr" / "transfer.json").read_text())
    assert "en" in json.dumps(matrix) and (tmp_path / "tr" / "report.md").exists()
    assert set(matrix["transfer"]["control"]) == {"en", "de"}  # the random-direction row is on by default
    assert json.loads((tmp_path / "tr" / "config.json").read_text())["refusal_openings"] == {"en": ["I"], "de": ["Ich"]}
    r = runner.invoke(
        main,
        [
            "quant-sweep",
            *common,
            "--types",
            "q8_0,q4_0",
            "--work-dir",
            str(tmp_path / "w"),
            "--out",
            str(tmp_path / "qs"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "qs" / "quant_sweep.json").exists()


def test_run_survives_damaged_files_and_guards_its_directory(tiny_model, polyrefuse_dir, tmp_path):
    """Short data files, a cut or doubled completions line, a second process, another model file."""
    path, _ = tiny_model
    data = tmp_path / "data"
    data.mkdir()
    for f in polyrefuse_dir.iterdir():
        if f.name != "harmless_test_translated_de.json":
            (data / f.name).symlink_to(f)
    full = json.loads((polyrefuse_dir / "harmless_test_translated_de.json").read_text())
    (data / "harmless_test_translated_de.json").write_text(json.dumps(full[:50]))
    quiet = {"log": lambda s: None}
    cfg = _config(path, data, target_langs=("de", "en"), capability=False)
    out = tmp_path / "run"
    res = run_pipeline(cfg, out, **quiet)
    # the test rows come from the English file's size, whatever the order of the target languages
    other = run_pipeline(_config(path, data, target_langs=("en", "de"), capability=False), tmp_path / "o", **quiet)
    ids = json.loads((out / "prompts.json").read_text())["test"]
    assert json.loads((tmp_path / "o" / "prompts.json").read_text())["test"]["en"] == ids["en"]
    n_short = len(ids["de"]["harmless"])
    assert n_short < 3 and res["short_test_files"] == [f"de/harmless_test ({n_short} of 3 drawn rows)"]
    assert (
        "Short test files" in (out / "report.md").read_text() and other["evaluation"]["en"] == res["evaluation"]["en"]
    )
    # a line cut by an interrupted write and a line written twice: repaired, counted once
    lines = (out / "completions.jsonl").read_text().splitlines()
    (out / "completions.jsonl").write_text("\n".join([*lines, lines[0]]) + "\n" + lines[1][:40])
    again = run_pipeline(cfg, out, **quiet)
    assert again["evaluation"] == res["evaluation"]
    assert (out / "completions.jsonl").read_text().endswith("\n")
    # a second live process on the same directory is refused; a lock left by a dead one is taken over
    (out / ".lock").write_text("1")  # pid 1 is alive
    with pytest.raises(PyrefusalError, match="in use by another pyrefusal process"):
        run_pipeline(cfg, out, **quiet)
    (out / ".lock").write_text("999999999")
    run_pipeline(cfg, out, **quiet)
    assert not (out / ".lock").exists()
    # another model file behind the same --model is refused, not mixed in
    (out / "model.json").write_text(json.dumps({"sha256": "0" * 64}))
    with pytest.raises(PyrefusalError, match="mix two models"):
        run_pipeline(cfg, out, **quiet)
    # the settings guard names the option to use
    with pytest.raises(PyrefusalError, match=r"--n-test \(n_test\): 3 there, 4 now"):
        run_pipeline(_config(path, data, target_langs=("de", "en"), capability=False, n_test=4), out, **quiet)
    # judge options that cannot work are refused before any work
    for kw, msg in (({"judge": "wildguard"}, "needs --judge-model"), ({"judge_model": "g.gguf"}, "add --judge")):
        with pytest.raises(PyrefusalError, match=msg):
            run_pipeline(_config(path, data, **kw), tmp_path / "r5", **quiet)
    assert not (tmp_path / "r5").exists()


def test_yoruba_source_keeps_every_val_prompt(tiny_model, polyrefuse_dir, tmp_path):
    """The paper does not filter val prompts for yo/yi sources (docs/method.md §1.4)."""
    path, _ = tiny_model
    logs: list[str] = []
    cfg = _config(path, polyrefuse_dir, source_lang="yo", target_langs=("yo",), capability=False, n_test=2)
    res = run_pipeline(cfg, tmp_path / "yo", log=logs.append)
    assert any("val prompts not filtered" in m for m in logs)
    kept = res["prompts"]
    assert len(kept["harmful_val"]) == len(kept["harmless_val"]) == cfg.n_val
