"""Hostile inputs: mutated GGUFs, run directories and CLI values end in a clean error or a success, never a
signal (an abort inside llama.cpp) or an unexpected exception type (a traceback).

The fast tests run tens of cases in CI; ``test_fuzz_large`` (marked ``slow``) runs >= 1,000 and prints the counts
(cases, clean errors, loads, crashes, tracebacks). Model loads run in child processes
(:func:`tests.gguf_mutate.load_in_subprocess`) so that an abort fails the test instead of killing pytest.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pyrefusal.cli import main
from pyrefusal.errors import PyrefusalError
from pyrefusal.runtime.validate import parse_gguf
from pyrefusal.steering.export import read_gguf_header
from tests.gguf_mutate import _FMT, load_in_subprocess, value_offset

GOLDEN_RUN = Path(__file__).parent / "golden" / "run-tiny-v0.1.0"

# --- mutated GGUFs ---------------------------------------------------------------------------------

_INTERESTING_INTS = [0, 1, 2, 3, 7, -1, 0x7FFFFFFF, 0xFFFFFFFF, 0x80000000, 1 << 62, (1 << 64) - 1, 65, 4096]
_INTERESTING_FLOATS = [0.0, -0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e-45, 1e38, 3.4e38]


def mutate_gguf(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random mutation of a GGUF's bytes: a scalar metadata value set to an edge value, a truncation, a header
    count, string length or tensor dimension made huge, or random bytes flipped in the header. Returns (what, bytes)."""
    hdr = parse_gguf_bytes_end(data)
    kind = rng.choice(["kv", "kv", "kv", "truncate", "count", "flip", "dims"])
    buf = bytearray(data)
    if kind == "kv":
        keys = [k for k in _scalar_keys(data)]
        key = rng.choice(keys)
        pos, vtype = value_offset(data, key)
        fmt = _FMT[vtype]
        if fmt in ("<f", "<d"):
            v: float = rng.choice(_INTERESTING_FLOATS)
            struct.pack_into(fmt, buf, pos, v)
        else:
            v = rng.choice(_INTERESTING_INTS)
            bits = struct.calcsize(fmt) * 8
            struct.pack_into(
                fmt.upper() if fmt != "<?" else "<B", buf, pos, v % (1 << bits) if fmt != "<?" else v % 256
            )
        return f"kv {key}={v!r}", bytes(buf)
    if kind == "truncate":
        n = rng.choice([rng.randrange(0, hdr), rng.randrange(hdr, len(data))])
        return f"truncate {n}", bytes(buf[:n])
    if kind == "count":
        off = rng.choice([8, 16])
        v = rng.choice([0, 1, 1 << 32, 1 << 63, (1 << 64) - 1, rng.randrange(1 << 20)])
        struct.pack_into("<Q", buf, off, v)
        return f"count@{off}={v}", bytes(buf)
    if kind == "dims":
        name = rng.choice(
            [b"token_embd.weight", b"blk.0.attn_q.weight", b"output_norm.weight", b"blk.2.ffn_down.weight"]
        )
        at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
        (n_dims,) = struct.unpack_from("<I", data, at)
        field = rng.choice(["ndims", "ne", "type", "offset"])
        if field == "ndims":
            v = rng.choice([0, 3, 5, 0xFFFFFFFF])
            struct.pack_into("<I", buf, at, v)
        elif field == "ne":
            v = rng.choice([0, 1, 63, 1 << 40, (1 << 64) - 1])
            struct.pack_into("<Q", buf, at + 4 + 8 * rng.randrange(n_dims), v)
        elif field == "type":
            v = rng.choice([1, 2, 8, 12, 30, 39, 250, 0xFFFFFFFF])
            struct.pack_into("<I", buf, at + 4 + 8 * n_dims, v)
        else:
            v = rng.choice([1, 32, 1 << 40, (1 << 64) - 32])
            struct.pack_into("<Q", buf, at + 8 + 8 * n_dims, v)
        return f"tensor {name.decode()} {field}={v}", bytes(buf)
    for _ in range(rng.randint(1, 8)):  # flip random header bytes
        buf[rng.randrange(4, hdr)] = rng.randrange(256)
    return "flip", bytes(buf)


def parse_gguf_bytes_end(data: bytes) -> int:
    """Offset where the tiny model's tensor data starts (the end of its header)."""
    name = b"output.weight"
    return data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4 + 16 + 4 + 8


def _scalar_keys(data: bytes) -> list[str]:
    """The tiny model's scalar (non-string, non-array) metadata keys."""
    keys = []
    for key in ("general.file_type", "llama.context_length", "llama.embedding_length", "llama.block_count",
                "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
                "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count", "llama.rope.freq_base",
                "llama.vocab_size", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token"):  # fmt: skip
        try:
            value_offset(data, key)
        except ValueError:
            continue
        keys.append(key)
    return keys


def _fuzz_ggufs(src: Path, out: Path, n: int, seed: int) -> tuple[Counter, list[str]]:
    """Mutate ``src`` ``n`` times; parse each in-process and load each in a child process. Returns the counts and
    the failures (crashes and tracebacks, with what was mutated)."""
    data = src.read_bytes()
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    what: dict[str, str] = {}
    counts: Counter = Counter()
    failures: list[str] = []
    for i in range(n):
        desc, blob = mutate_gguf(data, rng)
        p = out / f"{i}.gguf"
        p.write_bytes(blob)
        what[str(p)] = desc
        for parse in (parse_gguf, read_gguf_header):  # pyrefusal's own parser: clean error or a header
            try:
                parse(p)
            except PyrefusalError:
                pass
            except Exception as e:  # noqa: BLE001
                failures.append(f"{desc}: {parse.__name__} raised {type(e).__name__}: {e}")
                counts["parser tracebacks"] += 1
    res = load_in_subprocess([out / f"{i}.gguf" for i in range(n)], out / "log.jsonl")
    for path, r in res.items():
        counts["cases"] += 1
        counts[
            {"load": "loads", "clean": "clean errors", "crash": "crashes", "traceback": "tracebacks"}[r["outcome"]]
        ] += 1
        if r["outcome"] in ("crash", "traceback"):
            failures.append(f"{what[path]}: {r}")
    return counts, failures


def test_fuzz_gguf_sample(tiny_model, tmp_path) -> None:
    counts, failures = _fuzz_ggufs(tiny_model[0], tmp_path, 40, seed=1)
    assert not failures, failures
    assert counts["cases"] == 40 and counts["clean errors"] >= 10, counts


# --- run directories through the CLI -------------------------------------------------------------------------


def _run_dir(tmp: Path) -> Path:
    run = tmp / "run"
    shutil.copytree(GOLDEN_RUN, run)
    return run


def _edit_json(path: Path, edit) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


RUN_DIR_CASES = {
    "direction truncated": lambda r: (r / "direction.npy").write_bytes((r / "direction.npy").read_bytes()[:100]),
    "direction text": lambda r: (r / "direction.npy").write_text("not numbers"),
    "direction strings": lambda r: np.save(r / "direction.npy", np.array(["a", "b"])),
    "direction objects": lambda r: np.save(r / "direction.npy", np.array([{"x": 1}, None], dtype=object)),
    "direction 2-D": lambda r: np.save(r / "direction.npy", np.ones((2, 64), np.float32)),
    "direction NaN": lambda r: np.save(r / "direction.npy", np.full(64, np.nan, np.float32)),
    "direction empty file": lambda r: (r / "direction.npy").write_bytes(b""),
    "results not JSON": lambda r: (r / "results.json").write_text("{garbage"),
    "results list": lambda r: (r / "results.json").write_text("[1, 2]"),
    "results deep": lambda r: (r / "results.json").write_text("[" * 50_000 + "]" * 50_000),
    "results no model": lambda r: _edit_json(r / "results.json", lambda d: d.pop("model")),
    "results no config": lambda r: _edit_json(r / "results.json", lambda d: d.pop("config")),
    "results layer string": lambda r: _edit_json(r / "results.json", lambda d: d["direction"].update(layer="two")),
    "results binary": lambda r: (r / "results.json").write_bytes(b"\xff\xfe\x00garbage"),
}
SELECTION_CASES = {
    "selection not JSON": lambda r: (r / "selection.json").write_text("{garbage"),
    "selection list": lambda r: (r / "selection.json").write_text("[]"),
    "selection no rule": lambda r: _edit_json(r / "selection.json", lambda d: d.pop("rule")),
    "selection layer string": lambda r: _edit_json(r / "selection.json", lambda d: d.update(layer="two")),
    "selection scores garbled": lambda r: _edit_json(r / "selection.json", lambda d: d.update(scores=[1, 2])),
    "selection deep": lambda r: (r / "selection.json").write_text("[" * 50_000 + "]" * 50_000),
}


def _cli(args: list[str], stdin: str = "") -> tuple[int, str, BaseException | None]:
    r = CliRunner().invoke(main, args, input=stdin)
    unexpected = r.exception if r.exception is not None and not isinstance(r.exception, SystemExit) else None
    return r.exit_code, r.output, unexpected


@pytest.mark.parametrize("case", list(RUN_DIR_CASES))
def test_corrupt_run_dir_clean_errors(case, tiny_model, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PYREFUSAL_CACHE", str(tmp_path / "cache"))
    run = _run_dir(tmp_path)
    RUN_DIR_CASES[case](run)
    which = "direction.npy" if case.startswith("direction") else "results.json"
    model = str(tiny_model[0])
    for args in (
        ["export", "cvec", str(run), "--model", model],
        ["export", "lora", str(run), "--model", model],
        ["export", "merged", str(run), "--model", model, "--no-validate"],
        ["chat", str(run), "--model", model],
        ["report", str(run), "--quiet"],
    ):
        if args[0] == "report" and which == "direction.npy":
            continue  # report does not read the direction
        code, out, exc = _cli(args, stdin="/quit\n")
        assert exc is None, (case, args[:2], repr(exc))
        assert code == 2 and "error:" in out and which in out and "Traceback" not in out, (case, args[:2], out)
        assert "pyrefusal run --out" in out, (case, out)  # says how to recover


@pytest.mark.parametrize("case", list(SELECTION_CASES))
def test_corrupt_selection_clean_errors(case, tmp_path) -> None:
    run = _run_dir(tmp_path)
    SELECTION_CASES[case](run)
    code, out, exc = _cli(["report", str(run), "--quiet"])
    assert exc is None, repr(exc)
    assert code == 2 and "selection.json" in out and "pyrefusal run --out" in out, out


# --- CLI values -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "--seed", "-1"], "seed (--seed) must be a whole number >= 0"),
        (["run", "--n-ctx", "0"], "n_ctx (--n-ctx) must be a whole number >= 1"),
        (["run", "--n-seq", "0"], "n_seq_max (--n-seq)"),
        (["run", "--threads", "0"], "n_threads (--threads) must be a whole number >= 1"),
        (["run", "--n-test", "0"], "at least 1"),
        (["transfer", "--seed", "-5"], "seed (--seed) must be a whole number >= 0"),
        (["quant-sweep", "--seed", "-5"], "seed (--seed) must be a whole number >= 0"),
    ],
)
def test_bad_settings_refused_before_any_work(args, message, tmp_path) -> None:
    out = tmp_path / "out"
    code, text, exc = _cli([*args, "--out", str(out), "--model", str(tmp_path / "absent.gguf")])
    assert exc is None and code == 2 and message in text, text
    assert not (out / "config.json").exists()  # nothing saved


@pytest.mark.parametrize(
    "args",
    [
        ["chat", "RUN", "--n-ctx", "-1"],
        ["chat", "RUN", "--max-tokens", "0"],
        ["chat", "RUN", "--n-gpu-layers", "-2"],
        ["chat", "RUN", "--layer", "-1"],
        ["serve", "RUN", "--port", "70000"],
        ["serve", "RUN", "--n-ctx", "0"],
    ],
)
def test_bad_chat_options_refused(args, tmp_path) -> None:
    code, text, exc = _cli([str(tmp_path) if a == "RUN" else a for a in args])
    assert exc is None and code == 2 and "Invalid value" in text, text


def test_run_n_ctx_option_and_environment(monkeypatch) -> None:
    from pyrefusal.cli import settings_from_options  # noqa: F401  (the command's parsing, without running it)

    monkeypatch.setenv("PYREFUSAL_RUN_N_CTX", "0")
    code, text, exc = _cli(["run", "--out", "/nonexistent/x"])
    assert exc is None and code == 2 and "n_ctx (--n-ctx) must be a whole number >= 1, got 0" in text, text


# --- the large run ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fuzz_large(tiny_model, tmp_path) -> None:
    """>= 1,000 mutated GGUFs and 200 corrupted run directories through the CLI; prints the counts."""
    counts, failures = _fuzz_ggufs(tiny_model[0], tmp_path / "gguf", 1000, seed=2026)
    print("fuzz counts, GGUF files:", dict(counts))
    rng = random.Random(7)
    cases = {**RUN_DIR_CASES, **SELECTION_CASES}
    model = str(tiny_model[0])
    runs: Counter = Counter()
    for i in range(200):
        name = rng.choice(list(cases))
        run = tmp_path / f"run{i}"
        shutil.copytree(GOLDEN_RUN, run)
        cases[name](run)
        commands = [] if name.startswith("direction") else [["report", str(run), "--quiet"]]  # report: no direction
        if not name.startswith("selection"):  # exports and chat do not read selection.json
            commands += [["export", "cvec", str(run), "--model", model], ["chat", str(run), "--model", model]]
        args = rng.choice(commands)
        code, out, exc = _cli(args, stdin="/quit\n")
        runs["cases"] += 1
        if exc is not None:
            runs["tracebacks"] += 1
            failures.append(f"run dir {name} {args[:2]}: {exc!r}")
        elif code == 2 and "error:" in out:
            runs["clean errors"] += 1
        else:
            runs["other"] += 1
            failures.append(f"run dir {name} {args[:2]}: exit {code}: {out[-300:]}")
    print("fuzz counts, run directories:", dict(runs))
    assert not failures, failures[:20]
    assert counts["cases"] == 1000 and counts["crashes"] == counts["tracebacks"] == 0
    assert runs["clean errors"] == 200


# --- data files ---------------------------------------------------------------------------------------------------

DATA_CASES = {
    "lone surrogate": '[{"instruction": "tell me \\ud800 now", "category": null}]',
    "deep nesting": "[" * 50_000 + "]" * 50_000,
    "not JSON": '[{"instruction": "x",',
    "object top level": '{"instruction": "x"}',
    "number instruction": '[{"instruction": 5}]',
    "empty instruction": '[{"instruction": "  "}]',
    "record not object": '["x", 1]',
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_corrupt_data_files_caught_by_loader_and_verify(case, polyrefuse_dir, tmp_path) -> None:
    from pyrefusal.data.polyrefuse import PolyRefuse

    data = tmp_path / "data"
    data.mkdir()
    for f in polyrefuse_dir.glob("*_en.json"):
        shutil.copy(f, data / f.name)
    target = data / "harmful_test_translated_en.json"
    target.write_text(DATA_CASES[case], encoding="utf-8")
    with pytest.raises(PyrefusalError, match=r"harmful_test_translated_en\.json"):
        PolyRefuse(data).load("en", "test", "harmful")
    code, out, exc = _cli(["data", "verify", "--data-dir", str(data)])
    assert exc is None, repr(exc)
    assert code in (1, 2) and "Traceback" not in out, out


# --- exports that say what they hold --------------------------------------------------------------------------------


def test_export_lora_skip_embeddings_keeps_the_full_adapter(tiny_model, tmp_path, monkeypatch) -> None:
    """`export lora --skip-embeddings` writes its own file; the full adapter at the default path stays."""
    monkeypatch.setenv("PYREFUSAL_CACHE", str(tmp_path / "cache"))
    run = _run_dir(tmp_path)
    model = str(tiny_model[0])
    code, out, exc = _cli(["export", "lora", str(run), "--model", model])
    assert exc is None and code == 0, out
    full = run / "refusal-ablation-lora.gguf"
    before = full.read_bytes()
    code, out, exc = _cli(["export", "lora", str(run), "--model", model, "--skip-embeddings"])
    assert exc is None and code == 0, out
    skip = run / "refusal-ablation-lora-no-embd.gguf"
    assert str(skip) in out and full.read_bytes() == before  # the full adapter is untouched
    names_full, names_skip = set(_tensor_names(full)), set(_tensor_names(skip))
    assert any(n.startswith("token_embd") for n in names_full)
    assert not any(n.startswith("token_embd") for n in names_skip) and names_skip < names_full


def _tensor_names(path: Path) -> list[str]:
    import gguf

    return [t.name for t in gguf.GGUFReader(str(path)).tensors]
