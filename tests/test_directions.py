"""Difference-in-means maths on synthetic data with a planted direction."""

from __future__ import annotations

import numpy as np
import pytest

from pyrefusal.errors import PyrefusalError
from pyrefusal.method.directions import Candidates, cosine_matrix, mean_difference, random_like, unit


def test_mean_difference_recovers_planted_direction(tmp_path):
    rng = np.random.default_rng(0)
    d = 32
    planted = rng.standard_normal(d)
    harmless = rng.standard_normal((200, 2, 3, d))
    harmful = rng.standard_normal((150, 2, 3, d)) + 3.0 * planted  # planted everywhere
    c = mean_difference(harmful.astype(np.float32), harmless.astype(np.float32), (-2, -1))
    assert c.vectors.shape == (2, 3, d) and c.vectors.dtype == np.float64
    for p in (-2, -1):
        for layer in range(3):
            cos = float(unit(c.get(p, layer)) @ unit(planted))
            assert cos > 0.97
    np.testing.assert_allclose(c.vectors, harmful.mean(0) - harmless.mean(0), atol=1e-5)
    c.save(tmp_path / "c.npz")
    back = Candidates.load(tmp_path / "c.npz")
    np.testing.assert_array_equal(back.vectors, c.vectors)
    assert back.positions == (-2, -1) and back.n_harmful == 150


def test_mean_difference_errors():
    with pytest.raises(PyrefusalError, match="shapes differ"):
        mean_difference(np.zeros((2, 1, 1, 4)), np.zeros((2, 1, 1, 5)), (-1,))
    with pytest.raises(PyrefusalError, match="at least one"):
        mean_difference(np.zeros((0, 1, 1, 4)), np.zeros((2, 1, 1, 4)), (-1,))
    with pytest.raises(PyrefusalError, match="NaN"):
        mean_difference(np.full((1, 1, 1, 4), np.nan), np.zeros((2, 1, 1, 4)), (-1,))


def test_cosine_and_random_control():
    v = np.arange(1.0, 9.0)
    names, m = cosine_matrix({"a": v, "b": 2 * v, "c": -v})
    assert names == ["a", "b", "c"]
    np.testing.assert_allclose(m, [[1, 1, -1], [1, 1, -1], [-1, -1, 1]], atol=1e-9)
    r = random_like(v, seed=1)
    assert np.isclose(np.linalg.norm(r), np.linalg.norm(v))
    assert abs(unit(r) @ unit(v)) < 0.9


def test_projecting_out_the_harmless_mean():
    """A difference that is partly a rescaling of the common (harmless) mean loses exactly that part."""
    rng = np.random.default_rng(1)
    d = 16
    common = 5.0 * rng.standard_normal(d)  # what every prompt shares
    planted = rng.standard_normal(d)
    planted -= (planted @ unit(common)) * unit(common)  # orthogonal to the common part
    harmless = common + 0.1 * rng.standard_normal((400, 1, 2, d))
    harmful = 1.3 * common + planted + 0.1 * rng.standard_normal((400, 1, 2, d))  # scaled common + planted
    c = mean_difference(harmful, harmless, (-1,))
    p = c.project_out_harmless()
    for layer in range(2):
        raw, proj = c.get(-1, layer), p.get(-1, layer)
        h = unit(c.harmless_mean[0, layer])
        assert abs(raw @ h) > 1.0  # the raw difference has a large harmless-mean component
        assert abs(proj @ h) < 1e-9  # gone after projection
        np.testing.assert_allclose(proj, raw - (raw @ h) * h)
        assert float(unit(proj) @ unit(planted)) > 0.99  # what is left is the planted direction
    np.testing.assert_array_equal(p.harmless_mean, c.harmless_mean)
    assert (p.n_harmful, p.n_harmless, p.positions) == (c.n_harmful, c.n_harmless, c.positions)
