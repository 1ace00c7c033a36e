"""SteeredModel, chat_repl and serve: llama-cpp-python's own objects with the direction applied.

Greedy outputs of the steered ``Llama`` (ablation LoRA, control vector) are compared token for
token with pyrefusal's hook on the tiny model. Both sides use llama.cpp's default f16 KV cache.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import llama_cpp  # noqa: F401  (import llama_cpp before numpy: required in CUDA processes)

import numpy as np
import pytest

from pyrefusal.data.registry import cached_sha256
from pyrefusal.method import intervention as iv
from pyrefusal.runtime.runtime import Runtime
from pyrefusal.steering import router
from pyrefusal.steering.steered import (
    SteeredModel,
    SteeringError,
    build_app,
    chat_repl,
    plan_steering,
    serve,
    steering_from_run,
)
from tests.test_export import _rewrite_gguf

PROMPTS = ["Hello there, how are you?", "Tell me a story about the sea.", "Ich kann nicht"]
N_NEW = 8
LAYER, COEFF = 2, -1.0


@pytest.fixture(autouse=True)
def _adapter_cache(tmp_path_factory, monkeypatch):
    """Adapters are cached in a temporary directory, not the user's cache."""
    monkeypatch.setenv("PYREFUSAL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def rt(tiny_model):
    path, _ = tiny_model
    with Runtime(path, n_ctx=512, n_batch=256, n_seq_max=4) as r:  # default f16 KV, like Llama
        yield r


@pytest.fixture(scope="module")
def r(rt) -> np.ndarray:
    return np.random.default_rng(3).standard_normal(rt.n_embd).astype(np.float32)


def _hook_texts(rt: Runtime, intervention: iv.Intervention) -> list[str]:
    """Greedy replies (exact detokenized text) under pyrefusal's hook."""
    chats = [rt.chat_tokens(p) for p in PROMPTS]
    router.arm(rt, intervention, path="hook")
    try:
        return [rt.detokenize(g.tokens) for g in rt.generate(chats, N_NEW)]
    finally:
        router.disarm(rt)


def _chat(model: SteeredModel, prompt: str, **kw) -> str:
    out = model.create_chat_completion([{"role": "user", "content": prompt}], temperature=0, max_tokens=N_NEW, **kw)
    return out["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def ablated(tiny_model, r, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYREFUSAL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        model = SteeredModel(tiny_model[0], direction=r, n_ctx=512)
    with model:
        yield model


@pytest.fixture(scope="module")
def added(tiny_model, r):
    with SteeredModel(tiny_model[0], direction=r, intervention="addition", layer=LAYER, coeff=COEFF, n_ctx=512) as m:
        yield m


def test_ablation_lora_equals_the_hook_ablation(ablated, rt, r):
    base = _hook_texts(rt, iv.baseline())
    hooked = _hook_texts(rt, iv.ablation(r))
    assert [_chat(ablated, p) for p in PROMPTS] == hooked
    assert hooked != base  # the ablation changes the greedy replies
    d = ablated.describe()
    assert d["intervention"] == "ablation" and d["path"] == "lora" and d["exact"] is True
    assert Path(d["file"]).is_file() and d["layer"] is None
    assert ablated.intervention.name == "ablation" and ablated.exact


def test_addition_control_vector_equals_the_hook_addition(added, rt, r):
    hooked = _hook_texts(rt, iv.actadd(r, LAYER, COEFF))
    assert [_chat(added, p) for p in PROMPTS] == hooked
    assert hooked != _hook_texts(rt, iv.baseline())
    d = added.describe()
    assert (d["path"], d["layer"], d["cvec_layers"], d["coefficient"], d["exact"]) == ("cvec", 2, [1], -1.0, True)
    assert d["file"] is None
    assert added.intervention.additions[0].layer == LAYER


def test_completion_on_the_formatted_prompt_and_reset_keep_the_steering(added, rt, r):
    hooked = _hook_texts(rt, iv.actadd(r, LAYER, COEFF))
    # A str prompt would get a BOS (the tiny model sets add_bos_token); the chat path adds none.
    prompt = added.tokenize(rt.format_chat(PROMPTS[0]), add_bos=False, special=True)
    assert prompt == rt.chat_tokens(PROMPTS[0])
    assert added.create_completion(prompt, temperature=0, max_tokens=N_NEW)["choices"][0]["text"] == hooked[0]
    added.reset()  # llama-cpp-python keeps its context (and so the control vector)
    assert added(prompt, temperature=0, max_tokens=N_NEW)["choices"][0]["text"] == hooked[0]
    added.load_state(added.save_state())  # a saved state does not hold the control vector; the context does
    assert _chat(added, PROMPTS[0]) == hooked[0]
    ctx = added.llama.ctx
    added._cvec_ctx = None  # as if llama-cpp-python had made a new context: set again, same result
    assert _chat(added, PROMPTS[0]) == hooked[0] and added._cvec_ctx == ctx


def test_streaming_chunks_concatenate_to_the_reply(ablated):
    full = _chat(ablated, PROMPTS[1])
    chunks = list(
        ablated.create_chat_completion(
            [{"role": "user", "content": PROMPTS[1]}], temperature=0, max_tokens=N_NEW, stream=True
        )
    )
    pieces = [c["choices"][0]["delta"].get("content") or "" for c in chunks]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == full


def test_no_direction_is_the_plain_model(tiny_model, rt):
    with SteeredModel(tiny_model[0], n_ctx=512) as plain:
        assert plain.describe()["path"] == "none"
        assert plain.intervention.name == "baseline"
        assert [_chat(plain, p) for p in PROMPTS] == _hook_texts(rt, iv.baseline())


def _fake_run(run_dir: Path, model: Path, direction: np.ndarray, *, sha256: str | None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "model": {"path": str(model), "sha256": sha256, "name": "tiny"},
        "direction": {"layer": LAYER, "position": -1, "source_lang": "en"},
        "config": {},
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    np.save(run_dir / "direction.npy", direction)
    return run_dir


def test_from_run_reads_the_model_direction_and_layer(tiny_model, r, rt, tmp_path):
    path = tiny_model[0]
    run = _fake_run(tmp_path / "run", path, r, sha256=cached_sha256(path))
    hooked = _hook_texts(rt, iv.actadd(r, LAYER, COEFF))
    with SteeredModel.from_run(run, intervention="addition", n_ctx=512) as m:
        assert m.describe()["layer"] == LAYER
        assert m.provenance["run_dir"] == str(run) and m.provenance["source_language"] == "en"
        assert _chat(m, PROMPTS[0]) == hooked[0]
    st = steering_from_run(run)  # ablation: the cached LoRA
    assert st.path == "lora" and st.describe()["provenance"]["selected_layer"] == LAYER

    bad = _fake_run(tmp_path / "bad", path, r, sha256="0" * 64)
    with pytest.raises(SteeringError, match="is not the model of"):
        steering_from_run(bad)
    with pytest.raises(SteeringError, match=r"no results\.json"):
        steering_from_run(tmp_path / "empty")
    with pytest.raises(SteeringError, match="model_path="):
        steering_from_run(_fake_run(tmp_path / "moved", tmp_path / "gone.gguf", r, sha256=None))


def test_tied_embeddings_need_allow_inexact(tiny_model, r, tmp_path):
    tied = _rewrite_gguf(tiny_model[0], tmp_path / "tied.gguf", drop=("output.weight",))
    with pytest.raises(SteeringError, match="allow_inexact=True"):
        SteeredModel(tied, direction=r)
    with SteeredModel(tied, direction=r, allow_inexact=True, n_ctx=512) as m:
        d = m.describe()
        assert d["exact"] is False and "ties its LM head" in d["note"] and d["path"] == "lora"
        assert isinstance(_chat(m, PROMPTS[0]), str)  # loads and runs: no token_embd LoRA on the LM head


def test_errors_say_how_to_fix(tiny_model, r, tmp_path):
    path = tiny_model[0]
    with pytest.raises(SteeringError, match="block input >= 2"):
        plan_steering(path, r, intervention="addition", layer=1)
    with pytest.raises(SteeringError, match="needs layer="):
        plan_steering(path, r, intervention="addition")
    with pytest.raises(SteeringError, match="another model"):
        plan_steering(path, np.ones(r.shape[0] + 1, np.float32))
    with pytest.raises(SteeringError, match="zero"):
        plan_steering(path, np.zeros_like(r))
    with pytest.raises(SteeringError, match="lora_path"):
        SteeredModel(path, direction=r, lora_path="x.gguf")
    bias = {"blk.1.attn_output.bias": np.full(r.shape[0], 0.3, dtype=np.float32)}  # the LoRA cannot remove it
    biased = _rewrite_gguf(path, tmp_path / "biased.gguf", add=bias)
    with pytest.raises(SteeringError, match=r"bias.*Runtime"):
        plan_steering(biased, r)
    relabelled = _rewrite_gguf(path, tmp_path / "odd.gguf", arch="gemma2")  # llama.* keys under another arch
    with pytest.raises(SteeringError, match="block_count"):
        plan_steering(relabelled, r)


def test_chat_repl_streams_and_resets(ablated):
    expected = _chat(ablated, "Hi again")
    lines = iter(["Hello", "", "/reset", "Hi again", "/nope", "/quit", "never read"])
    out = io.StringIO()
    history = chat_repl(ablated, input_fn=lambda _prompt: next(lines), output=out, max_tokens=N_NEW, temperature=0)
    assert history == [{"role": "user", "content": "Hi again"}, {"role": "assistant", "content": expected}]
    text = out.getvalue()
    assert "ablation" in text and "(conversation cleared)" in text and "unknown command /nope" in text
    assert expected in text
    assert next(lines) == "never read"

    def eof(_prompt: str) -> str:
        raise EOFError

    assert chat_repl(ablated, system="Be brief.", input_fn=eof, output=io.StringIO()) == [
        {"role": "system", "content": "Be brief."}
    ]


def test_serve_without_the_extras_says_what_to_install(tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    with pytest.raises(SteeringError, match=r"pyrefusal\[serve\]"):
        serve(tiny_model[0])


@pytest.mark.parametrize("kind", ["ablation", "addition"])
def test_server_chat_completion_is_the_steered_reply(kind, tiny_model, r, ablated, added):
    pytest.importorskip("fastapi")
    pytest.importorskip("sse_starlette")
    pytest.importorskip("starlette_context")
    testclient = pytest.importorskip("fastapi.testclient")  # needs httpx
    model = ablated if kind == "ablation" else added
    st = model.steering
    app = build_app(st.model_path, st.lora_path, control_vector=st.control_vector, n_ctx=512, describe=st.describe())
    with testclient.TestClient(app) as client:
        resp = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": PROMPTS[0]}], "temperature": 0, "max_tokens": N_NEW},
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == _chat(model, PROMPTS[0])
        info = client.get("/pyrefusal/steering").json()
        assert info["path"] == ("lora" if kind == "ablation" else "cvec")


def test_server_refuses_bad_requests_and_bounds_generation(tiny_model, ablated):
    """Client errors are 400/422 with a message and no server path; generation is bounded by max_tokens."""
    pytest.importorskip("fastapi")
    pytest.importorskip("sse_starlette")
    pytest.importorskip("starlette_context")
    testclient = pytest.importorskip("fastapi.testclient")
    st = ablated.steering
    app = build_app(st.model_path, st.lora_path, n_ctx=256, describe=st.describe())
    url = "/v1/chat/completions"
    user = [{"role": "user", "content": PROMPTS[0]}]
    bad: list[tuple[dict | bytes, int, str]] = [
        (b"{not json", 400, "not valid JSON"),
        (b'{"messages": "\xff\xfe"}', 400, "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "not valid JSON"),
        ({"messages": "hi"}, 422, "`messages` must be a non-empty list"),
        ({"messages": []}, 422, "`messages` must be a non-empty list"),
        ({"messages": [{"role": "user", "content": None}]}, 422, "messages[0].content must be a string"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 422, "messages[0].role must be one of"),
        ({"messages": ["hi"]}, 422, "messages[0] must be an object"),
        ({"messages": user, "max_tokens": "many"}, 422, "`max_tokens` must be an integer in 1..256"),
        ({"messages": user, "max_tokens": -1}, 422, "`max_tokens` must be an integer in 1..256"),
        ({"messages": user, "max_tokens": 0}, 422, "`max_tokens` must be an integer in 1..256"),
        ({"messages": user, "max_tokens": 10**12}, 422, "`max_tokens` must be an integer in 1..256"),
        ({"messages": user, "temperature": "hot"}, 422, "`temperature` must be a finite number"),
        ([1, 2], 422, "must be a JSON object"),
    ]
    with testclient.TestClient(app, raise_server_exceptions=False) as client:
        for body, status, message in bad:
            if isinstance(body, bytes):
                resp = client.post(url, content=body, headers={"content-type": "application/json"})
            else:
                resp = client.post(url, json=body)
            assert resp.status_code == status, (body if len(str(body)) < 200 else "deep", resp.text)
            assert message in resp.json()["error"]["message"]
            assert str(Path(st.model_path).parent) not in resp.text
        resp = client.post("/v1/completions", json={"prompt": {"x": 1}})
        assert resp.status_code == 422 and "`prompt` must be" in resp.text
        # no max_tokens: bounded (llama-cpp-python would generate until the context is full)
        resp = client.post(url, json={"messages": user, "temperature": 0})
        assert resp.status_code == 200, resp.text
        assert 0 < resp.json()["usage"]["completion_tokens"] <= 256
        resp = client.post(url, json={"messages": user, "temperature": 0, "max_tokens": 3})
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] <= 3
        models = client.get("/v1/models")  # other routes pass through untouched
        assert models.status_code == 200
        ids = [m["id"] for m in models.json()["data"]]
        assert ids and all("/" not in i for i in ids), ids  # the file's name, not its path on the server


def test_chat_repl_refuses_unbounded_replies(ablated):
    with pytest.raises(SteeringError, match="max_tokens must be a whole number >= 1"):
        chat_repl(ablated, max_tokens=0, input_fn=lambda _: "/quit", output=io.StringIO())


def test_serve_says_what_it_serves(tiny_model, r, tmp_path, monkeypatch):
    """`pyrefusal serve` names the run, the model file, the intervention and its path before it listens."""
    from click.testing import CliRunner

    from pyrefusal.cli import main
    from pyrefusal.steering import steered

    path = tiny_model[0]
    run = _fake_run(tmp_path / "run", path, r, sha256=cached_sha256(path))
    served: dict = {}
    monkeypatch.setattr(steered, "serve", lambda *a, **kw: served.update(args=a, kwargs=kw))
    result = CliRunner().invoke(main, ["serve", str(run), "--port", "8123"])
    assert result.exit_code == 0, result.output
    assert served["args"][0] == path and served["kwargs"]["port"] == 8123
    line = result.output.strip().splitlines()[0]
    assert f"serving {run} on http://127.0.0.1:8123/v1" in line and path.name in line
    assert "intervention ablation by lora" in line and "NOT exact" not in line
