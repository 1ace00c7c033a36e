"""Every Python snippet of README.md runs as written, on the tiny model.

The snippets are extracted from the README's ```python blocks and executed in order in one namespace, as a reader
pasting them into one session would. Only what would take hours or download a model is swapped, by exact text
substitution (each substituted text must still be in the README, so an edited snippet fails here instead of
going untested): the default model name becomes the tiny random GGUF, the paper preset's sizes become tiny ones,
and run directories go to a temporary folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct-q4_k_m"


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_the_readme_has_python_snippets() -> None:
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 2
    assert any("SteeredModel" in b for b in blocks) and any("pr.run(" in b for b in blocks)


def test_readme_python_snippets_run(
    tiny_model, tiny_spec, polyrefuse_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = str(tiny_model[0])
    substitutions = {
        f'"{DEFAULT_MODEL}"': repr(model),
        # paper sizes (128/32 train/val, 572 test, 512 tokens) would take hours: tiny ones, same code path
        'n_test=64, target_langs=("en", "de", "zh", "ja")': (
            f'n_test=2, n_train=6, n_val=4, max_new_tokens=4, kl_threshold=1e9, target_langs=("en", "de"), '
            f"model={model!r}, n_threads=1, capability=False"
        ),
        '"runs/paper"': repr(str(tmp_path / "paper")),
        '"runs/paper/direction.npy"': repr(str(tmp_path / "paper" / "direction.npy")),
        '"runs/default"': repr(str(tmp_path / "paper")),  # the run made above
        "max_new_tokens=64": "max_new_tokens=4",
        '"content": "..."': '"content": "Hi"',
    }
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    code = "\n".join(blocks)
    for old, new in substitutions.items():
        assert old in code, f"README snippet changed: {old!r} is gone; update tests/test_readme.py"
        code = code.replace(old, new)
    monkeypatch.setenv("PYREFUSAL_DATA_DIR", str(polyrefuse_dir))
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme"}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 (the README's own code)
    direction = namespace["direction"]
    assert getattr(direction, "shape", None) == (tiny_spec.n_embd,)
    assert (tmp_path / "paper" / "results.json").is_file() and os.listdir(tmp_path / "paper")
