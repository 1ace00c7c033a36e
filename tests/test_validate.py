"""GGUF files with impossible hyper-parameters or corrupt headers: clean errors, never an abort or a traceback.

Loads run in a child process (:func:`tests.gguf_mutate.load_in_subprocess`): without the validator, llama.cpp
aborts the process on several of these files (block_count 0 or 0xffffffff: SIGABRT in its loader).
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from pyrefusal.errors import ModelError
from pyrefusal.runtime.validate import GGUFFileError, parse_gguf, validate_model_file
from pyrefusal.steering.export import ExportError, read_gguf_header
from tests.gguf_mutate import load_in_subprocess, patch_kv, value_offset

CASES = [
    ("llama.block_count", 0, "llama.block_count = 0 is impossible"),
    ("llama.block_count", 0xFFFFFFFF, "llama.block_count = 4294967295 is impossible"),
    ("llama.block_count", 0x7FFFFFFF, "llama.block_count = 2147483647 is impossible"),
    ("llama.block_count", 2, "block_count = 2 but the file has tensors for blocks 0..2"),
    ("llama.attention.layer_norm_rms_epsilon", float("nan"), "layer_norm_rms_epsilon = nan is impossible"),
    ("llama.attention.layer_norm_rms_epsilon", -1.0, "layer_norm_rms_epsilon = -1.0 is impossible"),
    ("llama.embedding_length", 0, "embedding_length = 0 is impossible"),
    ("llama.embedding_length", 96, "embedding_length = 96 but token_embd.weight has rows of 64"),
    ("llama.attention.head_count", 0, "head_count = 0 is impossible"),
    ("llama.attention.head_count", 5, "head_count = 5 does not divide"),
    ("llama.attention.head_count_kv", 3, "head_count_kv = 3 does not divide head_count = 4"),
    ("llama.context_length", 0, "context_length = 0 is impossible"),
    ("llama.rope.freq_base", float("inf"), "rope.freq_base = inf is impossible"),
    ("general.alignment", 0, "general.alignment = 0 is not a positive power of two"),
]


def _with_alignment(src: Path, dst: Path, align: int) -> Path:
    """``src`` rewritten with a ``general.alignment`` key (tiny files have none) whose value is then patched."""
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), vtype)
    writer.add_uint32("general.alignment", 32)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data).reshape(tuple(reversed(t.shape.tolist()))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return patch_kv(dst, dst, "general.alignment", align)


@pytest.fixture(scope="module")
def mutated(tiny_model: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, str]]:
    src = tiny_model[0]
    d = tmp_path_factory.mktemp("mutated")
    out = []
    for i, (key, value, message) in enumerate(CASES):
        if key == "general.alignment":
            out.append((_with_alignment(src, d / f"{i}.gguf", value), message))
        else:
            out.append((patch_kv(src, d / f"{i}.gguf", key, value), message))
    return out


def test_validator_names_key_value_and_fix(mutated: list[tuple[Path, str]], tiny_model: tuple[Path, dict]) -> None:
    validate_model_file(tiny_model[0])  # the intact file passes
    for path, message in mutated:
        with pytest.raises(GGUFFileError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
            validate_model_file(path)
        assert str(path) in str(info.value) and ("re-convert" in str(info.value) or "re-download" in str(info.value))


def test_impossible_models_never_abort(mutated: list[tuple[Path, str]], tiny_model: tuple[Path, dict], tmp_path: Path):
    paths = [tiny_model[0], *(p for p, _ in mutated)]
    res = load_in_subprocess(paths, tmp_path / "log.jsonl")
    assert res[str(tiny_model[0])]["outcome"] == "load"
    for path, message in mutated:
        r = res[str(path)]
        assert r["outcome"] == "clean" and r["type"] == "GGUFFileError" and message in r["message"], r


def _header_cases(src: Path, d: Path) -> dict[str, Path]:
    data = src.read_bytes()
    cases: dict[str, Path] = {}

    def put(name: str, blob: bytes) -> None:
        cases[name] = d / f"{name}.gguf"
        cases[name].write_bytes(blob)

    put("truncated-header", data[:300])
    put("truncated-data", data[: len(data) // 2])
    put("empty", b"")
    put("huge-tensor-count", data[:8] + struct.pack("<Q", 1 << 63) + data[16:])
    put("huge-kv-count", data[:16] + struct.pack("<Q", (1 << 64) - 1) + data[24:])
    pos, _ = value_offset(data, "general.architecture")  # string length of the architecture name
    put("huge-string", data[:pos] + struct.pack("<Q", 1 << 62) + data[pos + 8 :])
    pos, _ = value_offset(data, "tokenizer.ggml.tokens")  # array: element type, then count
    put("huge-array", data[: pos + 4] + struct.pack("<Q", (1 << 64) - 1) + data[pos + 12 :])
    put("bad-type", data[: pos - 4] + struct.pack("<I", 99) + data[pos:])
    return cases


def test_header_parser_corrupt_files(tiny_model: tuple[Path, dict], tmp_path: Path) -> None:
    cases = _header_cases(tiny_model[0], tmp_path)
    for name, path in cases.items():
        if name == "truncated-data":  # the header is intact: the data check finds it
            read_gguf_header(path)
            with pytest.raises(GGUFFileError, match="beyond the file"):
                validate_model_file(path)
            continue
        with pytest.raises(ExportError, match=str(path)):
            read_gguf_header(path)
        with pytest.raises(ModelError):
            parse_gguf(path)
    aligned0 = _with_alignment(tiny_model[0], tmp_path / "a0.gguf", 0)
    with pytest.raises(ExportError, match=r"general\.alignment = 0"):
        read_gguf_header(aligned0)
    res = load_in_subprocess(list(cases.values()), tmp_path / "log.jsonl")
    assert {r["outcome"] for r in res.values()} == {"clean"}, res


def test_unknown_tensor_type_without_gguf_version(
    tiny_model: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = bytearray(tiny_model[0].read_bytes())
    name = b"token_embd.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 250)  # type code 250: unknown
    path = tmp_path / "t.gguf"
    path.write_bytes(bytes(data))
    monkeypatch.delattr(gguf, "__version__", raising=False)
    with pytest.raises(ExportError, match="type 250, unknown to gguf"):
        read_gguf_header(path)
    with pytest.raises(GGUFFileError, match="type 250 unknown"):
        validate_model_file(path)


@pytest.mark.parametrize(
    "template,kind",
    [
        ("{% for m in messages %}{{ m.content }", "TemplateSyntaxError"),
        ("{{ messages[0].content + undefined_thing.x }}", "UndefinedError"),
        ("{{ raise_exception('System role not supported') }}", "ValueError"),
        ("{% for i in range(10**9) %}x{% endfor %}", "OverflowError"),
        # each range within the sandbox's bound, their product not: would run for hours
        ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "RenderTimeout"),
    ],
)
def test_broken_chat_templates_name_the_model_and_the_fix(template: str, kind: str, monkeypatch) -> None:
    from pyrefusal.runtime import chat as chat_module
    from pyrefusal.runtime.chat import ChatPrompts

    monkeypatch.setattr(chat_module, "RENDER_SECONDS", 0.5)

    chat = ChatPrompts(
        template,
        file_name="broken.gguf",
        tokenize=lambda text: [1],
        special_text=lambda token: "<s>",
        bos=1,
        eos=2,
        add_bos=True,
    )
    with pytest.raises(ModelError, match=f"broken.gguf's chat template .* does not render: {kind}") as info:
        chat.format_chat("hello", system="be brief")
    assert "--system-prompt" in str(info.value) and "--prompt-format" in str(info.value)
    assert "--chat-template-file" in str(info.value)
