"""Cross-lingual transfer mechanics: refusal tokens, per-language directions, transfer matrix, geometry, plots.

Pure logic is tested on synthetic values (a fake runtime for :func:`derive_refusal_tokens`); the
model-driven stages run once on the tiny random model (seconds), including resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pyrefusal.data.polyrefuse import PolyRefuse, Prompt
from pyrefusal.errors import PyrefusalError
from pyrefusal.method.directions import Candidates
from pyrefusal.method.refusal import SubstringDetector
from pyrefusal.method.selection import CandidateScore, Selection, SelectionRule
from pyrefusal.reporting import plots
from pyrefusal.runtime.runtime import Generation, Runtime
from pyrefusal.stages.generate import read_jsonl, wilson_interval
from pyrefusal.studies.transfer import (
    LanguageDirection,
    RefusalTokens,
    TransferConfig,
    TransferResult,
    condition_name,
    cosine_by_layer,
    count_first_tokens,
    derive_refusal_tokens,
    load_language_directions,
    pca_activations,
    pick_refusal_tokens,
    projection_on,
    run_transfer,
    sample_test_prompts,
    selected_cosines,
    train_activations_at,
    write_transfer_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# -- refusal tokens: counting logic on synthetic generations ------------------------------


def test_count_and_pick_planted_most_frequent_first_token():
    gens = [[7, 1], [7, 2], [5], [7], [5, 9], [3], [8, 8], []]
    refused = [True, True, True, True, True, True, False, True]
    counts = count_first_tokens(gens, refused)
    assert counts == {7: 3, 5: 2, 3: 1}  # [8, 8] is compliant, [] has no first token
    assert pick_refusal_tokens(counts, top_k=3, min_count=2) == [7, 5]
    assert pick_refusal_tokens(counts, top_k=1, min_count=2) == [7]
    assert pick_refusal_tokens({4: 2, 2: 2}, top_k=3) == [2, 4]  # ties: smaller id first
    with pytest.raises(PyrefusalError, match="verdict"):
        count_first_tokens([[1]], [True, False])


class _FakeRuntime:
    """Runtime stand-in: prompt ``p{i}`` generates ``outputs[i]`` = (token ids, text)."""

    n_seq_max = 3

    def __init__(self, outputs: list[tuple[list[int], str]], vocab: dict[int, str]) -> None:
        self.outputs, self.vocab = outputs, vocab

    def clear_plan(self) -> None:
        pass

    def chat_tokens(self, text: str, system: str | None = None) -> list[int]:
        return [int(text[1:])]

    def generate(self, prompts, max_new_tokens):
        return [Generation(*self.outputs[p[0]], "length") for p in prompts]

    def detokenize(self, ids) -> str:
        return "".join(self.vocab[i] for i in ids)

    def tokenize(self, text: str) -> list[int]:
        return [next(i for i, s in self.vocab.items() if text.startswith(s))]


def _prompts(n: int, lang: str) -> list[Prompt]:
    return [Prompt(f"harmful/train/{lang}/{i}", f"p{i}", None, lang, "harmful", "train") for i in range(n)]


VOCAB = {1: "Ich", 2: "Es", 3: "Hier", 4: "Leider", 5: "Sure", 6: " kann", 7: " ist"}


def test_derive_refusal_tokens_picks_planted_tokens():
    outs = [
        ([2, 7], "Es tut mir leid, ich kann nicht helfen."),
        ([2, 7], "Es tut mir leid, aber das kann ich nicht."),
        ([2, 7], "Es tut mir leid."),
        ([1, 6], "Ich kann Ihnen dabei nicht helfen."),
        ([1, 6], "Ich kann dabei nicht helfen."),
        ([4], "Leider kann ich Ihnen nicht helfen."),  # a refusal, but its first token occurs once
        ([3], "Hier ist eine Anleitung"),  # compliance: does not vote
        ([3], "Hier ist eine Anleitung"),
        ([3], "Hier ist eine Anleitung"),
    ]
    rt = _FakeRuntime(outs, VOCAB)
    det = SubstringDetector()
    assert [det.judge(t, "de").refused for _, t in outs] == [True] * 6 + [False] * 3  # the setup is right
    toks = derive_refusal_tokens(rt, _prompts(len(outs), "de"), "de", detector=det)
    assert toks.method == "derived"
    assert toks.ids == [2, 1] and toks.strings == ["Es", "Ich"]
    assert toks.counts == {2: 3, 1: 2, 4: 1}
    assert (toks.n_prompts, toks.n_refusals, toks.detector) == (9, 6, det.name)
    again = RefusalTokens.from_dict(json.loads(json.dumps(toks.to_dict())))
    assert again == toks


def test_derive_refusal_tokens_fallbacks():
    det = SubstringDetector()
    comply = [([3], "Hier ist eine Anleitung")] * 4
    rt = _FakeRuntime(comply, VOCAB)
    # too few refusals in a language of the table -> the table (tokenized openings)
    toks = derive_refusal_tokens(rt, _prompts(4, "de"), "de", detector=det)
    assert toks.method == "table" and toks.strings == ["Es", "Ich"]
    assert "table fallback" in toks.note and toks.n_refusals == 0
    # no table entry: rare derived tokens, else a clear error
    one = [([4], "Leider kann ich Ihnen nicht helfen."), *comply]
    toks = derive_refusal_tokens(_FakeRuntime(one, VOCAB), _prompts(5, "xx"), "xx", detector=det, min_refusals=1)
    assert toks.method == "derived-weak" and toks.ids == [4]
    with pytest.raises(PyrefusalError, match="explicit openings"):
        derive_refusal_tokens(rt, _prompts(4, "xx"), "xx", detector=det)


# -- geometry and plots on synthetic values ------------------------------------------------


def _selection(n_layers: int = 4, pos: int = -1, layer: int = 1) -> Selection:
    scores = []
    for p in (-2, -1):
        for lay in range(n_layers):
            s = CandidateScore(p, lay, refusal_score=float(-lay - p))
            if lay == 1:
                s.kl = 0.05
            scores.append(s)
    scores[0].refusal_score = None  # a blank cell
    return Selection(pos, layer, -3.0, 0.05, None, 1.0, [1], SelectionRule(), "lazy", scores)


def _direction(lang: str, vectors: np.ndarray, acts: bool = True) -> LanguageDirection:
    cands = Candidates(vectors, (-2, -1), vectors, np.zeros_like(vectors), 3, 3)
    rng = np.random.default_rng(0)
    n_pos, n_layers, d = vectors.shape
    a = {k: rng.standard_normal((3, n_pos, n_layers, d)).astype(np.float16) for k in ("harmful", "harmless")}
    toks = RefusalTokens(lang, [1], ["I"], "table")
    return LanguageDirection(lang, cands, _selection(n_layers), toks, {}, a if acts else None)


def test_cosine_of_identical_directions_is_one():
    rng = np.random.default_rng(1)
    v = rng.standard_normal((2, 4, 8))  # (n_pos, n_layers, n_embd)
    v[:, 0] = 0.0  # block input 0: zero vectors -> NaN, not a fake 0 or 1
    w = rng.standard_normal((2, 4, 8))
    w[:, 0] = 0.0
    dirs = {"en": _direction("en", v), "de": _direction("de", v.copy()), "zh": _direction("zh", w)}
    names, pos, cos = cosine_by_layer(dirs)
    assert names == ["en", "de", "zh"] and pos == -1  # the English selection's position
    assert cos.shape == (3, 3, 4)
    np.testing.assert_allclose(cos[0, 1, 1:], 1.0)
    np.testing.assert_allclose(cos[2, 2, 1:], 1.0)
    assert np.isnan(cos[:, :, 0]).all()
    np.testing.assert_allclose(cos, cos.transpose(1, 0, 2))
    _, sel = selected_cosines(dirs)
    np.testing.assert_allclose(np.diag(sel), 1.0)
    assert sel[0, 1] == pytest.approx(1.0)
    with pytest.raises(PyrefusalError, match="same model"):
        cosine_by_layer({"en": dirs["en"], "x": _direction("x", np.ones((2, 5, 8)))})


def test_pca_and_projection():
    rng = np.random.default_rng(2)
    r = np.zeros(6)
    r[0] = 1.0
    acts = {
        lang: {"harmful": rng.standard_normal((5, 6)) + 4 * r, "harmless": rng.standard_normal((4, 6))}
        for lang in ("en", "de")
    }
    pca = pca_activations(acts, layer=3, position=-1)
    assert pca.coords["de"]["harmless"].shape == (4, 2) and pca.components.shape == (2, 6)
    assert 0 < pca.explained[1] <= pca.explained[0] < 1
    proj = projection_on(3 * r, acts)  # normalised inside
    assert proj["en"]["harmful"]["mean"] == pytest.approx(acts["en"]["harmful"][:, 0].mean())
    assert proj["de"]["harmless"]["n"] == 4
    assert proj["en"]["harmful"]["mean"] > proj["en"]["harmless"]["mean"]
    dirs = {"en": _direction("en", rng.standard_normal((2, 4, 8)))}
    at = train_activations_at(dirs, -1, 2)
    assert at["en"]["harmful"].shape == (3, 8) and at["en"]["harmful"].dtype == np.float64


def test_plots_write_png_files(tmp_path):
    rng = np.random.default_rng(3)
    sel = _selection()
    tr = TransferResult(
        "ablation",
        "substring-multilingual",
        ["en", "de"],
        ["en", "de", "zh"],
        {"en": {"en": 0.0, "de": 0.25, "zh": 0.5}, "de": {"en": 0.5, "de": 0.0, "zh": float("nan")}},
        {"en": 1.0, "de": 0.75, "zh": 0.5},
        {},
        {},
        "completions.jsonl",
    )
    cos = rng.uniform(-1, 1, (3, 3, 5))
    pca = pca_activations({"en": {"harmful": rng.standard_normal((4, 6)), "harmless": rng.standard_normal((4, 6))}})
    proj = {"en": {"harmful": {"mean": 2.0, "std": 0.5, "n": 4}, "harmless": {"mean": -1.0, "std": 0.3, "n": 4}}}
    paths = [
        plots.plot_selection_heatmaps(sel, tmp_path / "sel.png", title="en"),
        plots.plot_transfer_matrix(tr, tmp_path / "tm.png"),
        plots.plot_transfer_matrix(tr.to_dict(), tmp_path / "sub" / "tm2.png"),
        plots.plot_cosine_matrix(["a", "b", "c"], cos[:, :, 0], tmp_path / "cos.png"),
        plots.plot_cosine_by_layer(["a", "b", "c"], cos, tmp_path / "cbl.png", position=-1),
        plots.plot_pca(pca, tmp_path / "pca.png"),
        plots.plot_projections(proj, tmp_path / "proj.png"),
        plots.plot_run_refusal(
            {
                "en": {"baseline": {"refusal_rate": 0.5, "harmless": {"refusal_rate": 0.0}}},
                "zh": {"baseline": {"refusal_rate": 0.25, "harmless": None}},  # no harmless file
            },
            ["baseline", "ablation"],  # a condition without numbers stays blank
            tmp_path / "run.png",
            title="tiny",
        ),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC, p
    positions, n_layers, refusal, kl = plots.selection_grids(sel)
    assert positions == [-2, -1] and n_layers == 4 and refusal.shape == kl.shape == (2, 4)
    assert np.isnan(refusal[0, 0]) and np.isnan(kl[0, 0]) and kl[1, 1] == 0.05


# -- the model-driven stages on the tiny model ---------------------------------------------


def _config(model: Path, data: Path, **kw) -> TransferConfig:
    base = {
        "model": str(model),
        "data_dir": str(data),
        "sources": ("en", "de"),
        "targets": ("en", "de"),
        "n_train": 6,
        "n_val": 4,
        "n_test": 2,
        "max_new_tokens": 3,
        "kl_threshold": 1e9,  # random weights: every KL is large
        "n_token_probe": 4,
        "token_max_new_tokens": 3,
        "n_ctx": 2048,
        "n_seq_max": 8,
        "n_threads": 1,  # a tiny model gains nothing from a second thread on a shared box
    }
    base.update(kw)
    return TransferConfig(**base)


@pytest.fixture(scope="module")
def tiny_run(tiny_model, polyrefuse_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer")
    res = run_transfer(_config(tiny_model[0], polyrefuse_dir), out, log=lambda s: None)
    return out, res


def test_run_transfer_outputs(tiny_run):
    out, res = tiny_run
    for name in ("config.json", "transfer.json", "report.md", "completions.jsonl", "transfer_matrix.png"):
        assert (out / name).exists(), name
    for lang in ("en", "de"):
        for name in (
            "candidates.npz",
            "selection.json",
            "refusal_tokens.json",
            "direction.npy",
            "prompts.json",
            "activations.npz",
        ):
            assert (out / "directions" / lang / name).exists(), (lang, name)
    tr = res["transfer"]
    assert set(tr["rates"]) == {"en", "de"} and all(set(v) == {"en", "de"} for v in tr["rates"].values())
    assert set(tr["baseline"]) == {"en", "de"} and tr["detector"] == "substring-multilingual"
    assert tr["counts"]["baseline"]["de"][1] == 2
    # same rows in every target language
    rows = {lang: [i.rsplit("/", 1)[1] for i in ids] for lang, ids in tr["prompt_ids"].items()}
    assert rows["en"] == rows["de"]
    lines = (out / "completions.jsonl").read_text().splitlines()
    assert len(lines) == 4 * 2 * 2  # (baseline + 2 sources + random control) x targets x n_test
    assert {c.condition for c in read_jsonl(out / "completions.jsonl")} == {
        "baseline",
        condition_name("ablation", "en"),
        condition_name("ablation", "de"),
        condition_name("ablation", "random"),
    }
    assert set(tr["control"]) == {"en", "de"} and tr["counts"]["random"]["de"] == [
        sum(
            c.refused
            for c in read_jsonl(out / "completions.jsonl")
            if c.condition == "ablation:random" and c.lang == "de"
        ),
        2,
    ]
    report = (out / "report.md").read_text()
    assert "| r_de |" in report and "substring-multilingual" in report
    assert f"| random direction (control, norm of r_{tr['sources'][0]}) |" in report
    k, n = tr["counts"]["baseline"]["de"]
    lo, hi = wilson_interval(k, n)
    row = next(x for x in report.splitlines() if x.startswith("| baseline |"))
    assert f"[{100 * lo:.0f}%, {100 * hi:.0f}%]" in row  # the interval of each cell
    for fig in res["figures"].values():
        assert f"]({fig})" in report and (out / fig).read_bytes()[:8] == PNG_MAGIC
    assert json.loads((out / "transfer.json").read_text())["transfer"] == tr
    geo = res["geometry"]
    assert np.asarray(geo["cosine_by_layer"], dtype=float).shape == (2, 2, 3)  # tiny model: 3 layers
    assert write_transfer_report(res, out) == out / "report.md"


def test_directions_shapes_and_round_trip(tiny_run):
    out, res = tiny_run
    dirs = load_language_directions(out / "directions")
    assert list(dirs) == ["de", "en"]
    en = dirs["en"]
    assert en.candidates.vectors.shape == (5, 3, 64)  # 5 eoi positions, 3 block inputs, n_embd 64
    assert en.activations is not None and en.activations["harmful"].shape == (6, 5, 3, 64)
    np.testing.assert_allclose(np.load(out / "directions" / "en" / "direction.npy"), en.direction, rtol=1e-6)
    assert res["directions"]["en"]["layer"] == en.selection.layer
    assert en.refusal_tokens.method in ("derived", "table")
    # save -> load is lossless
    en.save(out / "copy")
    again = LanguageDirection.load(out / "copy", "en")
    np.testing.assert_array_equal(again.candidates.vectors, en.candidates.vectors)
    assert json.dumps(again.selection.to_dict()) == json.dumps(en.selection.to_dict())  # NaN-safe
    assert again.refusal_tokens == en.refusal_tokens
    assert again.prompts == en.prompts
    np.testing.assert_array_equal(again.activations["harmless"], en.activations["harmless"])


def test_resume_skips_finished_work(tiny_run, tiny_model, polyrefuse_dir, monkeypatch):
    out, res = tiny_run
    before = (out / "completions.jsonl").read_text().splitlines()

    def boom(*a, **k):
        raise AssertionError("finished work was recomputed")

    # everything is on disk: no capture, no scoring, no generation
    for name in ("capture", "last_logits", "generate"):
        monkeypatch.setattr(Runtime, name, boom)
    again = run_transfer(_config(tiny_model[0], polyrefuse_dir), out, log=lambda s: None, plots=False)
    assert again["transfer"] == res["transfer"]
    assert (out / "completions.jsonl").read_text().splitlines() == before
    monkeypatch.undo()
    # a new target: only its completions are generated (4 rows x 2 prompts)
    calls = []
    real = Runtime.generate
    monkeypatch.setattr(Runtime, "generate", lambda self, p, n, **k: calls.append(len(p)) or real(self, p, n, **k))
    more = run_transfer(_config(tiny_model[0], polyrefuse_dir, targets=("en", "de", "zh")), out, log=lambda s: None)
    assert sum(calls) == 4 * 2
    assert set(more["transfer"]["baseline"]) == {"en", "de", "zh"}
    assert more["transfer"]["rates"]["en"]["en"] == res["transfer"]["rates"]["en"]["en"]
    # other settings in the same directory are refused, not mixed
    with pytest.raises(PyrefusalError, match="other settings"):
        run_transfer(_config(tiny_model[0], polyrefuse_dir, n_test=3), out, log=lambda s: None)


def test_sample_test_prompts_match_pipeline_rows(polyrefuse_dir):
    from pyrefusal.stages.sample import sample_prompts

    data = PolyRefuse(polyrefuse_dir)
    mine = sample_test_prompts(data, ["en", "de", "ja"], 5, seed=3)
    theirs = sample_prompts(
        data, "en", ("en", "de", "ja"), n_train=1, n_val=1, n_test=5, seed=3, log=lambda s: None
    ).test
    for lang in ("en", "de", "ja"):
        assert [p.id for p in mine[lang]] == [p.id for p in theirs[lang]["harmful"]]


def test_run_transfer_errors(tiny_model, polyrefuse_dir, tmp_path):
    path = tiny_model[0]
    with pytest.raises(PyrefusalError, match="condition"):
        run_transfer(_config(path, polyrefuse_dir, condition="nope"), tmp_path / "a", log=lambda s: None)
    with pytest.raises(PyrefusalError, match="'xx'"):
        run_transfer(_config(path, polyrefuse_dir, sources=("xx",)), tmp_path / "b", log=lambda s: None)
