"""Shared fixtures: a tiny random-weight llama GGUF written at test time, and the shared data."""

from __future__ import annotations

from pathlib import Path

import llama_cpp  # noqa: F401  (import llama_cpp before numpy: required in CUDA processes)

import numpy as np
import pytest

from tests.tiny_model import TinySpec, write_tiny_gguf

SHARED = Path(__file__).resolve().parents[2] / "shared"
POLYREFUSE = SHARED / "polyrefuse"


@pytest.fixture(scope="session")
def tiny_spec() -> TinySpec:
    return TinySpec()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tiny_spec: TinySpec) -> tuple[Path, dict[str, np.ndarray]]:
    """(path, weights) of a tiny F32 llama model (3 layers, n_embd 64)."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    weights = write_tiny_gguf(path, tiny_spec, seed=0)
    return path, weights


@pytest.fixture(scope="session")
def polyrefuse_dir() -> Path:
    if not POLYREFUSE.is_dir():
        pytest.skip(f"PolyRefuse not found at {POLYREFUSE}")
    return POLYREFUSE
