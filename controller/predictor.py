"""Step-time prediction, fitted online, and the externality of extra branches.

The step time of a batch is modelled as linear in a few batch features:

    T(batch) = w0 + w1 * n + w2 * kv + w3 * p + w4 * u        [seconds]

n: sequences in the batch; kv: KV tokens attended, counting a group's shared
prefix once per member; p: prefill tokens in the step; u: with cascade
attention, the shared-prefix tokens that the cascade reads once per group
instead (without cascade u = 0 and kv counts everything). Features are scaled
to order one (`SCALE`) so the fit stays well conditioned.

The weights are fitted by least squares with exponential forgetting (factor
lambda per step, as recursive least squares does), so the model follows drift,
with a ridge prior at the warm-start weights (a saved profile, or a default).
An upper bound adds the `upper_quantile` of recent a-priori residuals, so that
a step rarely overruns its prediction.

Externality: with the mandatory batch M always running, admitting extras E
costs  T(M + E) - T(M) = sum_{j in E} (w1 + w2 * kv_j')  where kv_j' is what j
adds to the attended KV: all of kv_j without cascade, its private suffix
kv_j - shared_j with it (its group's prefix is already read for the base).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FEATURES = ("intercept", "seqs", "kv_tokens", "prefill_tokens", "cascade_prefix_tokens")
SCALE = np.array([1.0, 64.0, 16384.0, 1024.0, 16384.0])  # feature units -> order one
# A prior for a small model on CPU (seconds): ~2.4 ms per step + ~0.13 ms per sequence.
DEFAULT_WEIGHTS = np.array([2.4e-3, 8.0e-3, 1.0e-3, 4.0e-3, 1.0e-3])


@dataclass(frozen=True, slots=True)
class StepTimeModel:
    """A fitted linear step-time model, as saved by `taper profile`."""

    weights: tuple[float, ...]  # seconds per scaled feature, in FEATURES order
    source: str = "prior"  # where the weights came from

    def to_json(self) -> str:
        return json.dumps(
            {"features": FEATURES, "scale": SCALE.tolist(), "weights": list(self.weights),
             "source": self.source},
            indent=2,
        )

    @classmethod
    def load(cls, path: str | Path) -> StepTimeModel:
        data = json.loads(Path(path).read_text())
        if tuple(data.get("features", ())) != FEATURES:
            raise ValueError(f"{path}: features {data.get('features')} are not {FEATURES}")
        if not np.allclose(data.get("scale", ()), SCALE):
            raise ValueError(f"{path}: feature scale differs from this version's")
        return cls(tuple(float(w) for w in data["weights"]), source=str(path))


def quantile(a: np.ndarray, q: float) -> float:
    """`np.quantile(a, q)` (linear method), bit for bit, without its overhead
    (about 20x slower on the few hundred values the controller keeps)."""
    v = np.sort(a)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    t = pos - lo
    a0, b0 = float(v[lo]), float(v[hi])
    d = b0 - a0
    # numpy's _lerp: from the nearer end, so that t = 1 gives b exactly
    return b0 - d * (1.0 - t) if t >= 0.5 else a0 + d * t


def features(n: int, kv: float, prefill: float, cascade_prefix: float = 0.0) -> np.ndarray:
    """Scaled feature vector of a batch (see the module docstring)."""
    return np.array([1.0, n, kv, prefill, cascade_prefix]) / SCALE


class StepTimePredictor:
    """Exponentially weighted least squares over `FEATURES`, with a ridge prior.

    After each observation the weights solve

        min_w  sum_k lambda^(t-k) (y_k - w.x_k)^2 + rho |w - w_prior|^2

    which is what recursive least squares with forgetting computes, but solved
    from the weighted normal equations (a 5x5 system) rather than by updating
    an inverse: the inverse form loses positive definiteness when some
    features (prefill tokens during pure decode) are never excited, while here
    the prior simply holds those weights where the profile put them.
    """

    def __init__(
        self,
        model: StepTimeModel | None = None,
        forgetting: float = 0.995,
        upper_quantile: float = 0.95,
        residual_window: int = 256,
        prior_strength: float = 1e-3,
    ) -> None:
        w = DEFAULT_WEIGHTS if model is None else np.asarray(model.weights, dtype=np.float64)
        self.prior = w.astype(np.float64).copy()  # seconds per scaled feature
        self._set_weights(self.prior.copy())
        k = len(FEATURES)
        self._ridge = prior_strength * np.eye(k)
        self._A = np.zeros((k, k))  # forgetting-weighted sum of x x^T
        self._b = np.zeros(k)  # forgetting-weighted sum of x y
        self.lam = forgetting
        self.quantile = upper_quantile
        self._resid = np.zeros(residual_window)
        self._n_resid = 0
        self._margin = 0.0  # seconds, the residual quantile, refreshed as residuals come
        self.observed = 0

    @property
    def w(self) -> np.ndarray:
        """Weights in seconds per scaled feature, in FEATURES order."""
        if self._stale:
            self._set_weights(
                np.linalg.solve(self._A + self._ridge, self._b + self._ridge @ self.prior)
            )
        return self._w

    @property
    def unit_costs(self) -> np.ndarray:
        """Non-negative weights in seconds per *unscaled* feature unit."""
        if self._stale:
            self.w  # noqa: B018 (solves)
        return self._unit

    def _set_weights(self, w: np.ndarray) -> None:
        self._w = w
        self._unit = np.maximum(w, 0.0) / SCALE
        self._stale = False
        self._pending = 0  # observations since the last solve

    def predict(self, x: np.ndarray) -> float:
        """Mean predicted step time, seconds, of scaled features x."""
        return float(np.maximum(self.w, 0.0) @ x)

    @property
    def upper_margin(self) -> float:
        """Seconds added to a mean prediction for an upper bound."""
        return self._margin

    def update(self, x: np.ndarray, y: float) -> None:
        """One observation: scaled features x, measured step time y (seconds)."""
        # A-priori residual, for the upper bound, against the last solved weights
        # (re-solved at least every 8 observations when no decision reads them).
        if self._pending >= 8:
            self.w  # noqa: B018 (solves)
        resid = y - float(self._w @ x)
        self._resid[self._n_resid % len(self._resid)] = resid
        self._n_resid += 1
        self._A *= self.lam
        self._A += np.outer(x, x)
        self._b *= self.lam
        self._b += x * y
        self._stale = True  # solved on the next read: steps without a decision rarely pay
        self._pending += 1
        self.observed += 1
        if self._n_resid <= 32 or self._n_resid % 8 == 0:
            filled = self._resid[: min(self._n_resid, len(self._resid))]
            self._margin = max(0.0, quantile(filled, self.quantile))

    def model(self) -> StepTimeModel:
        return StepTimeModel(tuple(float(w) for w in self.w), source="online")
