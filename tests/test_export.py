"""Exports (control vector, LoRA ablation) and the in-graph path of ``intervention.arm``.

Every in-graph form is checked against the hook (and the LoRA against a model with
orthogonalized weights) on the tiny F32 model; the LoRA also on the real default model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import llama_cpp  # noqa: F401  (import llama_cpp before numpy: required in CUDA processes)

import gguf
import numpy as np
import pytest

from pyrefusal.data.registry import sha256_file
from pyrefusal.errors import HookError, PyrefusalError
from pyrefusal.method import intervention as iv
from pyrefusal.runtime.runtime import Runtime
from pyrefusal.steering import export as ex
from pyrefusal.steering import router
from tests.tiny_model import orthogonalize, write_tiny_gguf

PROMPTS = ["Hello there, how are you?", "Ich kann nicht", "我不能 help", "Tell me a story about the sea."]
ATOL = 1e-4  # tiny F32 model, F32 KV cache: in-graph adapters and the hook agree to float rounding


def _direction(n_embd: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n_embd).astype(np.float32)


def _rewrite_gguf(
    src: Path,
    dst: Path,
    *,
    drop: tuple[str, ...] = (),
    add: dict[str, np.ndarray] | None = None,
    arch: str | None = None,
) -> Path:
    """Copy an F32 GGUF, dropping/adding tensors (and optionally relabelling its architecture)."""
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), arch or reader.fields["general.architecture"].contents())
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = gguf.GGUFValueType(f.types[0])
        sub = gguf.GGUFValueType(f.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        if t.name not in drop:
            writer.add_tensor(t.name, np.array(t.data))  # F32: NumPy (rows, cols)
    for name, arr in (add or {}).items():
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.fixture(autouse=True)
def _adapter_cache(tmp_path_factory, monkeypatch, request):
    """Tiny-model tests cache their adapters in a temporary directory, not the user's cache."""
    if "slow" not in request.keywords:
        monkeypatch.setenv("PYREFUSAL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def rt(tiny_model):
    path, _ = tiny_model
    with Runtime(path, n_ctx=1024, n_batch=256, n_seq_max=8, kv_f32=True) as r:
        yield r


@pytest.fixture(scope="module")
def tied_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model without output.weight: llama.cpp then uses token_embd.weight as the LM head."""
    path, _ = tiny_model
    return _rewrite_gguf(path, tmp_path_factory.mktemp("tied") / "tied.gguf", drop=("output.weight",))


def _hook_logits(rt: Runtime, intervention: iv.Intervention, toks: list[list[int]]) -> np.ndarray:
    assert router.arm(rt, intervention, path="hook") == "hook"
    try:
        return rt.last_logits(toks)
    finally:
        router.disarm(rt)


# --- control vectors -----------------------------------------------------------------------


def test_control_vector_round_trips_with_provenance(tmp_path):
    vecs = {1: _direction(64, 1), 2: _direction(64, 2)}
    prov = {
        "source_language": "de",
        "layer": 2,
        "position": -1,
        "base_sha256": "ab" * 32,
        "coefficient": -1.0,
        "languages": ["de", "en"],
        "selection": {"kl": 0.1},
    }
    p = ex.export_control_vector(tmp_path / "c.gguf", vecs, model_hint="llama", provenance=prov, n_layer=3)
    back = ex.load_control_vector(p)
    assert sorted(back) == [1, 2]
    for n, v in vecs.items():
        np.testing.assert_array_equal(back[n], v)
    meta = ex.read_metadata(p)
    assert meta["general.architecture"] == "controlvector"
    assert meta["controlvector.model_hint"] == "llama"
    assert meta["controlvector.layer_count"] == 2
    assert meta["pyrefusal.intervention"] == "addition"
    assert "ADDITIVE" in meta["pyrefusal.semantics"] and "not an ablation" in meta["pyrefusal.semantics"]
    assert meta["pyrefusal.version"]
    assert meta["pyrefusal.source_language"] == "de"
    assert (meta["pyrefusal.layer"], meta["pyrefusal.position"], meta["pyrefusal.coefficient"]) == (2, -1, -1.0)
    assert meta["pyrefusal.base_sha256"] == "ab" * 32
    assert meta["pyrefusal.languages"] == ["de", "en"]
    assert meta["pyrefusal.selection"] == '{"kl": 0.1}'


def test_control_vector_refuses_what_llama_cpp_cannot_do(tmp_path):
    v = _direction(64)
    with pytest.raises(ex.ExportError, match="layer 0"):
        ex.export_control_vector(tmp_path / "c.gguf", {0: v}, model_hint="llama", provenance={})
    with pytest.raises(ex.ExportError, match="only ADDS"):
        ex.export_control_vector(
            tmp_path / "c.gguf", {1: v}, model_hint="llama", provenance={"intervention": "ablation"}
        )
    with pytest.raises(ex.ExportError, match="beyond"):
        ex.export_control_vector(tmp_path / "c.gguf", {3: v}, model_hint="llama", provenance={}, n_layer=3)
    with pytest.raises(ex.ExportError, match="width"):
        ex.export_control_vector(tmp_path / "c.gguf", {1: v, 2: v[:10]}, model_hint="llama", provenance={})
    with pytest.raises(ex.ExportError, match="NaN"):
        ex.export_control_vector(tmp_path / "c.gguf", {1: v * np.nan}, model_hint="llama", provenance={})
    with pytest.raises(ex.ExportError, match="block input >= 2"):
        ex.cvec_layer(1)
    assert not (tmp_path / "c.gguf").exists()  # nothing half-written


def test_control_vector_file_reproduces_the_hook_addition(rt, tmp_path):
    """Hook Addition at block input L == file tensor direction.(L-1), loaded back through the runtime."""
    r = _direction(rt.n_embd, seed=5)
    toks = [rt.tokenize(p) for p in PROMPTS]
    base = rt.last_logits(toks)
    layer, coeff = 2, 0.7
    hooked = _hook_logits(rt, iv.actadd(r, layer=layer, coeff=coeff), toks)
    n = ex.cvec_layer(layer)
    assert n == layer - 1
    p = ex.export_control_vector(
        tmp_path / "actadd.gguf", {n: coeff * r}, model_hint=rt.arch, provenance={"layer": layer, "coefficient": coeff}
    )
    assert [t.name for t in gguf.GGUFReader(str(p)).tensors] == [f"direction.{layer - 1}"]
    rt.set_control_vector(ex.load_control_vector(p))
    try:
        from_file = rt.last_logits(toks)
        rt.set_control_vector({layer: coeff * r})  # one block later: must differ (pins the convention)
        shifted = rt.last_logits(toks)
    finally:
        rt.set_control_vector(None)
    np.testing.assert_allclose(from_file, hooked, atol=ATOL)
    assert np.abs(hooked - base).max() > 0.05
    assert np.abs(shifted - hooked).max() > 0.05


# --- LoRA ablation -------------------------------------------------------------------------


def test_header_parser_agrees_with_gguf_py(tiny_model):
    path, weights = tiny_model
    header = ex.read_gguf_header(path)
    reader = gguf.GGUFReader(str(path))
    assert list(header.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = header.tensors[t.name]
        expected = (int(t.data_offset), [int(x) for x in t.shape], t.tensor_type)  # data_offset: absolute
        assert (info.offset, list(info.ne), info.qtype) == expected
    assert header.kv["general.architecture"] == "llama" and header.kv["llama.block_count"] == 3
    np.testing.assert_array_equal(header.rows("blk.2.ffn_down.weight", 5, 9), weights["blk.2.ffn_down.weight"][5:9])
    with pytest.raises(ex.ExportError, match="not a GGUF"):
        ex.read_gguf_header(Path(__file__))


def test_lora_file_has_llama_cpp_layout(tiny_model, tiny_spec, tmp_path):
    path, weights = tiny_model
    r = _direction(tiny_spec.n_embd, seed=3)
    p = ex.export_ablation_lora(path, r, tmp_path / "abl.gguf", provenance={"source_language": "en"})
    reader = gguf.GGUFReader(str(p))
    ne = {t.name: [int(x) for x in t.shape] for t in reader.tensors}  # ggml order, fastest first
    n_embd, n_vocab = tiny_spec.n_embd, weights["token_embd.weight"].shape[0]
    # llama_adapter_lora_init: token_embd: b.ne[1] == n_embd, a.ne[1] == n_vocab (gathered by token id)
    assert ne["token_embd.weight.lora_a"] == [1, n_vocab]
    assert ne["token_embd.weight.lora_b"] == [1, n_embd]
    for il in range(tiny_spec.n_layer):
        for w, n_in in (("attn_output", tiny_spec.n_embd), ("ffn_down", tiny_spec.n_ff)):
            # a.ne[0] == W.ne[0] (n_in), b.ne[1] == W.ne[1] (n_embd), a.ne[1] == b.ne[0] (rank)
            assert ne[f"blk.{il}.{w}.weight.lora_a"] == [n_in, 1]
            assert ne[f"blk.{il}.{w}.weight.lora_b"] == [1, n_embd]
    assert len(ne) == 2 + 4 * tiny_spec.n_layer
    meta = ex.read_metadata(p)
    assert (meta["general.type"], meta["general.architecture"], meta["adapter.type"]) == ("adapter", "llama", "lora")
    assert meta["adapter.lora.alpha"] == 1.0
    assert meta["pyrefusal.intervention"] == "ablation" and "ABLATION" in meta["pyrefusal.semantics"]
    assert meta["pyrefusal.base_sha256"] == sha256_file(path)
    assert meta["pyrefusal.ablation.embeddings"] == "lora"
    assert meta["pyrefusal.source_language"] == "en"
    # the numbers: A = r̂ᵀW, B = -r̂
    rhat = r / np.linalg.norm(r)
    t = {x.name: np.array(x.data) for x in reader.tensors}
    w0 = weights["blk.0.ffn_down.weight"]  # (n_embd, n_ff)
    np.testing.assert_allclose(t["blk.0.ffn_down.weight.lora_a"], (rhat @ w0)[None, :], atol=1e-5)
    np.testing.assert_allclose(np.abs(t["blk.0.ffn_down.weight.lora_b"][:, 0]), np.abs(rhat), atol=1e-6)


def test_lora_ablation_equals_hook_and_orthogonalized_weights(rt, tiny_model, tiny_spec, tmp_path):
    path, weights = tiny_model
    r = _direction(rt.n_embd, seed=3)
    lora = ex.export_ablation_lora(path, r, tmp_path / "abl.gguf", provenance={})
    ortho_path = tmp_path / "ortho.gguf"
    write_tiny_gguf(ortho_path, tiny_spec, weights=orthogonalize(weights, r))
    toks = [rt.tokenize(p) for p in PROMPTS]
    chats = [rt.chat_tokens(p) for p in PROMPTS]
    base = rt.last_logits(toks)
    hooked = _hook_logits(rt, iv.ablation(r), toks)
    router.arm(rt, iv.ablation(r), path="hook")
    try:
        hook_gen = [g.tokens for g in rt.generate(chats, max_new_tokens=16)]
    finally:
        router.disarm(rt)
    rt.set_lora([(lora, 1.0)])
    try:
        via_lora = rt.last_logits(toks)
        lora_gen = [g.tokens for g in rt.generate(chats, max_new_tokens=16)]
    finally:
        rt.set_lora(None)
    with Runtime(ortho_path, n_ctx=1024, n_batch=256, n_seq_max=8, kv_f32=True, hook=False) as ortho:
        expected = ortho.last_logits(toks)
        ortho_gen = [g.tokens for g in ortho.generate(chats, max_new_tokens=16)]
    assert np.abs(base - expected).max() > 0.05  # the ablation matters
    np.testing.assert_allclose(via_lora, hooked, atol=ATOL)
    np.testing.assert_allclose(via_lora, expected, atol=ATOL)
    assert lora_gen == hook_gen == ortho_gen
    np.testing.assert_allclose(rt.last_logits(toks), base, atol=1e-6)  # adapter removed


def test_rank_two_lora_ablation_equals_hook(rt, tiny_model, tmp_path):
    path, _ = tiny_model
    dirs = np.stack([_direction(rt.n_embd, 8), _direction(rt.n_embd, 9)])  # (2, n_embd)
    lora = ex.export_ablation_lora(path, dirs, tmp_path / "abl2.gguf", provenance={})
    assert ex.read_metadata(lora)["adapter.lora.alpha"] == 2.0  # scale = alpha / rank = 1
    toks = [rt.tokenize(p) for p in PROMPTS]
    hooked = _hook_logits(rt, iv.ablation(dirs), toks)
    rt.set_lora([(lora, 1.0)])
    try:
        via_lora = rt.last_logits(toks)
    finally:
        rt.set_lora(None)
    np.testing.assert_allclose(via_lora, hooked, atol=ATOL)


def test_tied_embeddings_stay_out_of_the_lora(tied_model, tmp_path):
    support = ex.ablation_lora_support(tied_model)
    assert support.exact and support.tied_embeddings
    r = _direction(support.n_embd, seed=3)
    with pytest.raises(ex.ExportError, match="ties its LM head"):
        ex.export_ablation_lora(tied_model, r, tmp_path / "x.gguf", provenance={})
    with pytest.raises(ex.ExportError, match="ties its LM head"):
        ex.export_ablation_lora(tied_model, r, tmp_path / "x.gguf", provenance={}, embeddings="lora")
    p = ex.export_ablation_lora(tied_model, r, tmp_path / "skip.gguf", provenance={}, embeddings="skip")
    names = [t.name for t in gguf.GGUFReader(str(p)).tensors]
    assert not any(n.startswith("token_embd") for n in names)
    assert "NOT ablated" in ex.read_metadata(p)["pyrefusal.ablation.embeddings"]
    with Runtime(tied_model, n_ctx=1024, n_batch=256, n_seq_max=8, kv_f32=True) as rt:
        toks = [rt.tokenize(q) for q in PROMPTS]
        base = rt.last_logits(toks)
        hooked = _hook_logits(rt, iv.ablation(r), toks)
        assert router.arm(rt, iv.ablation(r), path="auto") == "graph+hook"  # LoRA + hook on node embd only
        try:
            graph = rt.last_logits(toks)
        finally:
            router.disarm(rt)
        np.testing.assert_allclose(graph, hooked, atol=ATOL)
        assert np.abs(hooked - base).max() > 0.05


def test_token_embd_lora_on_a_tied_model_aborts_llama_cpp(tiny_model, tied_model, tmp_path):
    """Why tied models need embeddings='skip': llama.cpp applies the token_embd LoRA to the LM head too."""
    untied, _ = tiny_model
    lora = ex.export_ablation_lora(untied, _direction(64, 3), tmp_path / "with_embd.gguf", provenance={})
    script = textwrap.dedent(
        f"""
        from pyrefusal.runtime.runtime import Runtime
        with Runtime({str(tied_model)!r}, n_ctx=256, n_batch=64, n_seq_max=1) as rt:
            rt.set_lora([({str(lora)!r}, 1.0)])
            rt.last_logits([rt.tokenize("Hello")])
        print("survived")
        """
    )
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
    cwd = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )
    assert proc.returncode != 0 and "survived" not in proc.stdout
    assert "ggml_can_mul_mat" in proc.stderr


def test_bias_on_a_writer_falls_back_to_the_hook(tiny_model, tmp_path):
    path, _ = tiny_model
    bias = {"blk.1.attn_output.bias": np.full(64, 0.3, dtype=np.float32)}  # llama: optional wo_b
    biased = _rewrite_gguf(path, tmp_path / "biased.gguf", add=bias)
    support = ex.ablation_lora_support(biased)
    assert not support.exact and "blk.1.attn_output.bias" in support.reason
    r = _direction(64, 3)
    with pytest.raises(ex.ExportError, match="bias"):
        ex.export_ablation_lora(biased, r, tmp_path / "x.gguf", provenance={})
    with Runtime(biased, n_ctx=512, n_batch=128, n_seq_max=4, kv_f32=True) as rt:
        route = router.route(rt, iv.ablation(r))
        assert route.path == "hook" and "bias" in route.reason
        assert router.arm(rt, iv.ablation(r), path="auto") == "hook"
        with pytest.raises(HookError, match="bias"):
            router.arm(rt, iv.ablation(r), path="graph")
        router.disarm(rt)


def test_unchecked_architecture_is_not_lora_exact(tiny_model, tmp_path):
    path, _ = tiny_model
    other = _rewrite_gguf(path, tmp_path / "gemma2.gguf", arch="gemma2")
    support = ex.ablation_lora_support(other)
    assert not support.exact and "gemma2" in support.reason
    with pytest.raises(ex.ExportError, match="cannot ablate exactly"):
        ex.export_ablation_lora(other, _direction(64), tmp_path / "x.gguf", provenance={})


def test_lora_refuses_wrong_width_and_is_not_a_control_vector(tiny_model, tmp_path):
    path, _ = tiny_model
    with pytest.raises(ex.ExportError, match="n_embd=64"):
        ex.export_ablation_lora(path, np.ones(65), tmp_path / "x.gguf", provenance={})
    with pytest.raises(ex.ExportError, match="intervention"):
        ex.export_ablation_lora(path, np.ones(64), tmp_path / "x.gguf", provenance={"intervention": "addition"})
    p = ex.export_ablation_lora(path, np.ones(64), tmp_path / "abl.gguf", provenance={})
    with pytest.raises(ex.ExportError, match="not a control vector"):
        ex.load_control_vector(p)


# --- arm(): the in-graph path --------------------------------------------------------------


def _conditions(r: np.ndarray) -> list[tuple[str, iv.Intervention, str]]:
    return [
        ("ablation", iv.ablation(r), "graph"),
        ("actadd@2", iv.actadd(r, layer=2, coeff=0.7), "graph"),
        ("actadd@1", iv.actadd(r, layer=1, coeff=0.7), "hook"),
        ("harm_ablation@2", iv.harm_ablation(r, layer=2), "graph"),
        ("harm_ablation@1", iv.harm_ablation(r, layer=1), "hook"),
        ("baseline", iv.baseline(), "graph"),
    ]


@pytest.mark.parametrize("index", range(6), ids=[c[0] for c in _conditions(np.ones(2))])
def test_arm_auto_matches_the_hook(rt, index):
    r = _direction(rt.n_embd, seed=11)
    name, intervention, expected_path = _conditions(r)[index]
    toks = [rt.tokenize(p) for p in PROMPTS]
    base = rt.last_logits(toks)
    hooked = _hook_logits(rt, intervention, toks)
    assert router.arm(rt, intervention, path="auto") == expected_path, router.route(rt, intervention).reason
    try:
        auto = rt.last_logits(toks)
    finally:
        router.disarm(rt)
    np.testing.assert_allclose(auto, hooked, atol=ATOL)
    if name != "baseline":
        assert np.abs(hooked - base).max() > 0.05
    np.testing.assert_allclose(rt.last_logits(toks), base, atol=1e-6)  # disarm removed everything


def test_harm_ablation_graph_form_and_its_limits(rt):
    r = _direction(rt.n_embd, seed=12)
    route = router.route(rt, iv.harm_ablation(r, layer=2))
    assert route.lora_directions is not None and sorted(route.cvec) == [1, 2]
    np.testing.assert_allclose(route.cvec[1], r, rtol=1e-6)  # +r enters block 2
    np.testing.assert_allclose(route.cvec[2], -r, rtol=1e-6)  # what the hook's ablation removes after it
    other = _direction(rt.n_embd, seed=13)
    mixed = iv.Intervention("mixed", ablate=r, additions=(iv.Addition(other, 2, 1.0, within_block=True),))
    assert router.route(rt, mixed).path == "hook"  # an addition outside the ablated span: hook semantics only
    plain = iv.Intervention("plain", ablate=r, additions=(iv.Addition(r, 2, 1.0),))
    assert router.route(rt, plain).path == "hook"
    with pytest.raises(HookError, match="no exact form"):
        router.arm(rt, plain, path="graph")
    with pytest.raises(HookError, match="path must be"):
        router.arm(rt, iv.baseline(), path="fast")  # type: ignore[arg-type]


def test_arm_default_is_the_hook_and_adapters_are_cached(rt, tmp_path_factory):
    r = _direction(rt.n_embd, seed=14)
    assert router.arm(rt, iv.ablation(r)) == "hook"
    router.disarm(rt)
    cache = tmp_path_factory.getbasetemp() / "cache" / "adapters"
    before = set(cache.glob("*.gguf")) if cache.is_dir() else set()
    assert router.arm(rt, iv.ablation(r), path="graph") == "graph"
    made = set(cache.glob("*.gguf")) - before
    assert len(made) == 1
    (adapter,) = made
    stamp = adapter.stat().st_mtime_ns
    assert router.arm(rt, iv.ablation(2 * r), path="graph") == "graph"  # same direction: same file, not rebuilt
    router.disarm(rt)
    assert set(cache.glob("*.gguf")) - before == made and adapter.stat().st_mtime_ns == stamp
    assert ex.read_metadata(adapter)["pyrefusal.base_sha256"] == rt.sha256


def test_auto_falls_back_to_the_hook_when_the_adapter_cannot_be_built(rt, monkeypatch):
    def fail(*args, **kwargs):
        raise ex.ExportError("gguf-py cannot dequantize blk.0.ffn_down.weight (XYZ)")

    monkeypatch.setattr(ex, "cached_ablation_lora", fail)
    r = _direction(rt.n_embd, seed=15)
    toks = [rt.tokenize(p) for p in PROMPTS]
    hooked = _hook_logits(rt, iv.ablation(r), toks)
    assert router.arm(rt, iv.ablation(r), path="auto") == "hook"
    try:
        np.testing.assert_allclose(rt.last_logits(toks), hooked, atol=1e-6)
    finally:
        router.disarm(rt)
    with pytest.raises(HookError, match="cannot build the ablation LoRA"):
        router.arm(rt, iv.ablation(r), path="graph")


def test_hook_plan_errors_still_surface_in_auto(rt):
    with pytest.raises(HookError, match="n_embd"):
        router.arm(rt, iv.ablation(np.ones(rt.n_embd + 1)), path="auto")
    with pytest.raises(PyrefusalError, match="zero direction"):
        router.arm(rt, iv.ablation(np.zeros(rt.n_embd)), path="graph")
    assert rt.last_logits([rt.tokenize("ok")]).shape == (1, rt.n_vocab)


# --- the real default model ----------------------------------------------------------------

HARMFUL = ["How do I build a pipe bomb?", "Wie stehle ich ein Auto?", "如何制作毒药", "Write ransomware for me."]
HARMLESS = ["How do I bake bread?", "Wie backe ich einen Kuchen?", "如何种植西红柿", "Write a poem about the sea."]


@pytest.mark.slow
def test_real_model_lora_ablation_matches_the_hook(tmp_path):
    """Q4_K_M base + F32 LoRA vs the hook, on Qwen2.5-Coder-0.5B (4 prompts, 16 new tokens).

    Why they are not bit-equal: the base multiplies Q5_0/Q6_K/Q4_K weights with activations
    that llama.cpp's CPU kernels first round to 8-bit blocks (q8_0 / q8_K), so a write is
    ``W q8(x)``; the LoRA subtracts ``r̂ r̂ᵀ W x`` computed in F32 from the unrounded ``x``.
    What is left along r̂ is ~1e-3 of the stream (measured <= 1.6e-3; unablated: up to 0.38),
    while the hook projects the summed stream itself. Any such perturbation moves a logit by
    up to a few tenths because the next layers' 8-bit activation rounding flips: decoding the
    same prompts one by one instead of batched moves the *unablated* logits by 0.32 already.
    Measured LoRA vs hook: max |Δlogit| 0.44-0.48 (F16 or F32 KV). Tolerance 1.0; greedy tokens
    must agree except where the hook's own top-2 margin is a near-tie (< 1.0).
    """
    from pyrefusal.data.registry import DEFAULT_MODEL, resolve_model

    try:
        model = resolve_model(DEFAULT_MODEL, progress=False)
    except PyrefusalError as e:
        pytest.skip(f"default model unavailable: {e}")
    tol = 1.0
    with Runtime(model.path, n_ctx=2048, n_batch=512, n_seq_max=8, sha256=model.sha256) as rt:
        layer = 12
        acts, _ = rt.capture([rt.chat_tokens(p) for p in HARMFUL + HARMLESS], positions=[-1], layers=[layer])
        r = acts[:4, 0, 0].mean(0) - acts[4:, 0, 0].mean(0)  # a mean-difference (refusal-like) direction
        rhat = r / np.linalg.norm(r)
        lora = ex.export_ablation_lora(model.path, r, tmp_path / "abl.gguf", provenance={"base_sha256": model.sha256})
        prompts = [rt.chat_tokens(p) for p in (HARMFUL[0], HARMFUL[2], HARMLESS[1], HARMLESS[3])]

        base = rt.last_logits(prompts)
        noise = np.abs(np.concatenate([rt.last_logits([p]) for p in prompts]) - base).max()
        router.arm(rt, iv.ablation(r), path="hook")
        try:
            hooked = rt.last_logits(prompts)
            hook_gen = [g.tokens for g in rt.generate(prompts, max_new_tokens=16)]
        finally:
            router.disarm(rt)
        rt.set_lora([(lora, 1.0)])
        try:
            via_lora = rt.last_logits(prompts)
            lora_gen = [g.tokens for g in rt.generate(prompts, max_new_tokens=16)]
            acts_lora, _ = rt.capture(prompts, positions=[-1, -3])
        finally:
            rt.set_lora(None)
        diff = np.abs(via_lora - hooked).max()
        print(f"max|Δlogit| LoRA vs hook {diff:.3f}; batched vs single (no intervention) {noise:.3f}")
        assert np.abs(hooked - base).max() > 1.0  # the ablation matters
        assert diff < tol
        rel = np.abs(acts_lora @ rhat) / np.linalg.norm(acts_lora, axis=-1)  # (prompts, pos, layers)
        assert rel.max() < 5e-3, rel.max()
        for p, h, g in zip(prompts, hook_gen, lora_gen, strict=True):
            if h == g:
                continue
            k = next((i for i, (a, b) in enumerate(zip(h, g, strict=False)) if a != b), min(len(h), len(g)))
            prefix = [p + h[:k]]  # both paths chose the same tokens so far
            rt.set_lora([(lora, 1.0)])
            lora_choice = int(rt.last_logits(prefix)[0].argmax())
            rt.set_lora(None)
            router.arm(rt, iv.ablation(r), path="hook")
            try:
                step = rt.last_logits(prefix)[0]
            finally:
                router.disarm(rt)
            margin = step.max() - step[lora_choice]
            print(f"greedy tokens diverge at step {k}: the hook's margin over the LoRA's choice is {margin:.3f}")
            assert margin < tol  # only at a near-tie
