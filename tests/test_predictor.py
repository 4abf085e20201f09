"""The step-time predictor: recovery of a known model, drift, upper bound."""

from __future__ import annotations

import numpy as np
import pytest

from controller.predictor import (
    FEATURES,
    SCALE,
    StepTimeModel,
    StepTimePredictor,
    features,
)

# Seconds per unit of: intercept, sequence, KV token, prefill token.
TRUE = np.array([3.0e-3, 1.5e-4, 2.0e-8, 5.0e-6])


def sample(rng: np.random.Generator, w: np.ndarray, noise: float = 0.02):
    n = int(rng.integers(1, 257))
    kv = float(rng.integers(0, 200) * n)
    prefill = float(rng.integers(0, 2048)) if rng.random() < 0.3 else 0.0
    x = features(n, kv, prefill)
    y = float(w @ np.array([1.0, n, kv, prefill])) * (1 + noise * rng.standard_normal())
    return x, y


def rel_errors(p: StepTimePredictor, rng: np.random.Generator, w: np.ndarray) -> list[float]:
    """Relative prediction errors on 200 fresh noise-free samples."""
    return [abs(p.predict(x) - y) / y for x, y in (sample(rng, w, 0) for _ in range(200))]


def test_recovers_a_known_linear_model_within_5_percent():
    rng = np.random.default_rng(0)
    p = StepTimePredictor(forgetting=0.999)
    for _ in range(3000):
        p.update(*sample(rng, TRUE))
    got = p.unit_costs[:4]
    np.testing.assert_allclose(got, TRUE, rtol=0.05)


def test_adapts_after_a_drift():
    rng = np.random.default_rng(1)
    p = StepTimePredictor(forgetting=0.99)
    for _ in range(1500):
        p.update(*sample(rng, TRUE))
    drifted = TRUE * np.array([1.3, 2.0, 1.5, 1.0])
    errors_before = rel_errors(p, rng, drifted)
    for _ in range(800):
        p.update(*sample(rng, drifted))
    errors_after = rel_errors(p, rng, drifted)
    assert np.median(errors_before) > 0.2  # the drift was real
    assert np.median(errors_after) < 0.05
    assert max(errors_after) < 0.10


def test_upper_bound_is_rarely_exceeded():
    rng = np.random.default_rng(2)
    p = StepTimePredictor(upper_quantile=0.95)
    for _ in range(2000):
        p.update(*sample(rng, TRUE, noise=0.05))
    over = 0
    for _ in range(2000):
        x, y = sample(rng, TRUE, noise=0.05)
        over += y > p.predict(x) + p.upper_margin
        p.update(x, y)
    assert over / 2000 < 0.08
    assert p.upper_margin > 0


def test_model_round_trip(tmp_path):
    m = StepTimeModel(weights=(1e-3, 2e-3, 3e-3, 4e-3, 0.0), source="test")
    path = tmp_path / "m.json"
    path.write_text(m.to_json())
    loaded = StepTimeModel.load(path)
    assert loaded.weights == m.weights
    p = StepTimePredictor(loaded)
    assert p.predict(features(64, 16384, 0)) == pytest.approx(1e-3 + 2e-3 + 3e-3)


def test_model_with_other_features_is_refused(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('{"features": ["a"], "scale": [1], "weights": [1]}')
    with pytest.raises(ValueError, match="features"):
        StepTimeModel.load(path)
    assert len(FEATURES) == len(SCALE)
