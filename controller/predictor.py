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
With row tiles of T rows (`row_tile`), n is counted as ceil(n / T) * T, and
the j-th extra (0-based, in admission order, |M| sequences before it) costs
T * w1 when |M| + j is a multiple of T (it opens a tile) and 0 * w1 otherwise:
exact for any prefix of the order, which is what `taper` admits.

Saved profiles keep the five FEATURES and their SCALE whatever the predictor's
options: the tiling, the floor and the outlier filter act on the same weights.
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
_FLOORED = [1, 2]  # the sequence and KV weights: what an extra branch costs
# Spikes rejected in a row before the predictor takes them as the new level.
_MAX_SPIKE_RUN = 8


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

        min_w  sum_k lambda^(t-k) (y_k - w.x_k)^2 + rho_t |w - w_prior|^2

    which is what recursive least squares with forgetting computes, but solved
    from the weighted normal equations (a 5x5 system) rather than by updating
    an inverse: the inverse form loses positive definiteness when some
    features (prefill tokens during pure decode) are never excited, while here
    the prior simply holds those weights where the profile put them.

    The prior's strength follows the data's effective sample count,

        m_t   = sum_k lambda^(t-k) = lambda * m_(t-1) + 1   [observations; -> 1/(1-lambda)]
        rho_t = prior_strength + prior_weight * m_t       [pseudo-observations, each a
                                                             unit step along one scaled
                                                             feature]

    so the prior is worth `prior_weight` of the data in every direction at all
    times (0.002 * 200 = 0.4 pseudo-observations at lambda = 0.995) instead of
    vanishing next to it, as the fixed 1e-3 did: a direction along which the
    scaled features vary by less than sqrt(prior_weight) per step (0.045: about
    3 sequences or 730 KV tokens) keeps its prior weights rather than following
    the noise there, as when intercept, sequences and KV move together while
    the batch make-up is stable.

    What decisions read (`predict`, `unit_costs`, `batch_time`, `extra_costs`),
    and the residuals behind the upper bound, use the effective weights

        w_eff = max(w, floor_t)                            [seconds per scaled unit]
        floor_t = weight_floor * level_t * max(w_prior, 0)  on the sequence and KV
                  weights, 0 elsewhere
        level_t = sum_k lambda^(t-k) y_k / sum_k lambda^(t-k) w_prior.x_k
                  [dimensionless; 1 before any step]

    so an extra branch never looks cheaper than `weight_floor` of what the prior
    says it costs, however the fit drifts; `level` rescales the prior to the
    speed the engine shows now (a host running 2x slower than its profile makes
    branches about 2x dearer too, which a fit that only sees a stable batch
    would otherwise attribute to that batch's direction alone).

    `row_tile` > 0 models a GEMM that runs in tiles of that many rows (the CPU
    engine's batch-invariant kernels: 16): the sequence feature becomes
    ceil(n / row_tile) * row_tile, so the step time is a staircase in n.
    """

    def __init__(
        self,
        model: StepTimeModel | None = None,
        forgetting: float = 0.995,
        upper_quantile: float = 0.95,
        residual_window: int = 256,
        prior_strength: float = 1e-3,
        prior_weight: float = 2e-3,
        weight_floor: float = 0.25,
        outlier_factor: float = 4.0,
        outlier_warmup: int = 32,
        row_tile: int = 0,
    ) -> None:
        w = DEFAULT_WEIGHTS if model is None else np.asarray(model.weights, dtype=np.float64)
        self.prior = w.astype(np.float64).copy()  # seconds per scaled feature
        k = len(FEATURES)
        self._floor = np.zeros(k)  # seconds per scaled feature, at level 1 (class docstring)
        self._floor[_FLOORED] = weight_floor * np.maximum(self.prior[_FLOORED], 0.0)
        self._A = np.zeros((k, k))  # forgetting-weighted sum of x x^T
        self._b = np.zeros(k)  # forgetting-weighted sum of x y
        self._set_weights(self.prior.copy())
        self._rho0 = prior_strength
        self._rho_rel = prior_weight
        self._mass = 0.0  # m_t, the forgetting-weighted count of observations learnt
        self._xt = np.zeros(k)  # scratch: a feature vector with its rows tiled
        self._eye = np.eye(k)
        self._scratch = np.zeros((k, k))
        self.lam = forgetting
        self.quantile = upper_quantile
        self.outlier_factor = outlier_factor
        self.outlier_warmup = outlier_warmup
        self.row_tile = row_tile
        self._resid = np.zeros(residual_window)
        self._n_resid = 0
        self._margin = 0.0  # seconds, the residual quantile, refreshed as residuals come
        self._memo: tuple | None = None  # upper(): arguments, weights, margin, value
        self._spike_run = 0  # consecutive steps rejected as spikes
        self.observed = 0  # observations learnt from
        self.outliers_disturbed = 0  # steps not learnt: the engine flagged a pause/control
        self.outliers_spike = 0  # steps not learnt: over outlier_factor x the upper bound

    def tune(self, forgetting: float, upper_quantile: float, residual_window: int,
             prior_weight: float, weight_floor: float, outlier_factor: float,
             row_tile: int) -> None:
        """Change the fit's settings in place, keeping what it has learnt (the
        weighted sums, the recent residuals, up to `residual_window` of them).
        The weights are re-solved on the next read."""
        self.lam = forgetting
        self.quantile = upper_quantile
        self._rho_rel = prior_weight
        self.outlier_factor = outlier_factor
        self.row_tile = row_tile
        self._floor[_FLOORED] = weight_floor * np.maximum(self.prior[_FLOORED], 0.0)
        n, ring = self._n_resid, self._resid
        recent = ring[:n] if n <= len(ring) else np.roll(ring, -(n % len(ring)))  # oldest first
        recent = recent[-residual_window:]
        self._resid = np.zeros(residual_window)
        self._resid[: len(recent)] = recent
        self._n_resid = len(recent)
        if len(recent):
            self._margin = max(0.0, quantile(recent, self.quantile))
        self._stale = True

    @property
    def outliers(self) -> int:
        """Steps not learnt from, for either reason."""
        return self.outliers_disturbed + self.outliers_spike

    @property
    def w(self) -> np.ndarray:
        """Fitted weights (not clipped nor floored), seconds per scaled feature, in
        FEATURES order."""
        if self._stale:
            rho = self._rho0 + self._rho_rel * self._mass
            a = self._scratch  # A + rho I, without allocating
            np.multiply(self._eye, rho, out=a)
            a += self._A
            self._set_weights(_solve(a, self._b + rho * self.prior))
        return self._w

    @property
    def unit_costs(self) -> np.ndarray:
        """Effective (clipped, floored) weights in seconds per *unscaled* feature
        unit; with `row_tile`, the sequence weight is per tiled row."""
        if self._stale:
            self.w  # noqa: B018 (solves)
        return self._unit

    @property
    def level(self) -> float:
        """Measured over prior-predicted step time, forgetting-weighted (1 before
        any step): how much slower than its profile the engine runs now."""
        # x[0] = 1 in every step, so the first row of A and the first entry of b
        # already hold sum lambda^(t-k) x_k and sum lambda^(t-k) y_k.
        expected = float(self.prior @ self._A[0])
        return float(self._b[0]) / expected if expected > 0 else 1.0

    def _set_weights(self, w: np.ndarray) -> None:
        self._w = w
        self._eff = np.maximum(w, self._floor * self.level)  # floor >= 0: also clips
        self._unit = self._eff / SCALE
        self._stale = False
        self._pending = 0  # observations since the last solve

    def _tiled(self, x: np.ndarray) -> np.ndarray:
        """x (scaled) with the sequence count rounded up to whole row tiles."""
        if not self.row_tile:
            return x
        xt = self._xt
        xt[:] = x
        xt[1] = _tile(round(float(x[1]) * SCALE[1]), self.row_tile) / SCALE[1]
        return xt

    def predict(self, x: np.ndarray) -> float:
        """Mean predicted step time, seconds, of scaled features x."""
        if self._stale:
            self.w  # noqa: B018 (solves)
        return float(self._eff @ self._tiled(x))

    def upper(self, n: int, kv: float, prefill: float) -> float:
        """predict(features(n, kv, prefill)) + upper_margin, seconds: an upper bound.
        Remembered for the last arguments while the fit stays (the engines ask for
        the same queued prefill step after step)."""
        if self._stale:
            self.w  # noqa: B018 (solves)
        memo = self._memo
        if (memo is not None and memo[0] == (n, kv, prefill) and memo[1] is self._eff
                and memo[2] == self._margin):
            return memo[3]
        value = self.predict(features(n, kv, prefill)) + self._margin
        self._memo = ((n, kv, prefill), self._eff, self._margin, value)
        return value

    def batch_time(self, x: np.ndarray) -> float:
        """Mean predicted step time, seconds, of *unscaled* features x (n, kv, ...)."""
        u = self.unit_costs
        t = float(u @ x)
        if self.row_tile:
            t += float(u[1]) * (_tile(int(x[1]), self.row_tile) - float(x[1]))
        return t

    def extra_costs(self, base_n: int, own_kv: np.ndarray) -> np.ndarray:
        """Seconds each extra sequence adds to a batch of `base_n` sequences when the
        extras join in this order, each after those before it (a prefix of the
        order costs the sum of its entries): w_seq per sequence plus w_kv per KV
        token it adds (`own_kv`). With `row_tile` T a sequence is charged a whole
        tile, T * w_seq, when it opens one (its row index base_n + i is a
        multiple of T) and nothing while it fills one already paid for."""
        u = self.unit_costs
        if not self.row_tile:
            return u[1] + u[2] * own_kv
        opens = (base_n + np.arange(len(own_kv))) % self.row_tile == 0
        return np.where(opens, u[1] * self.row_tile, 0.0) + u[2] * own_kv

    @property
    def upper_margin(self) -> float:
        """Seconds added to a mean prediction for an upper bound."""
        return self._margin

    def update(self, x: np.ndarray, y: float, disturbed: bool = False) -> bool:
        """One observation: scaled features x, measured step time y (seconds).

        Not learnt (and counted in `outliers`): a step the engine flags as
        `disturbed` (it spanned a pause or a control request), and, once
        `outlier_warmup` steps were learnt, one over `outlier_factor` times the
        upper bound (prediction + margin), unless `_MAX_SPIKE_RUN` steps in a row
        were: a run that long is a level shift to follow, not a spike, and such
        steps are then learnt until one falls under the bound again. Returns
        whether the step was learnt."""
        if disturbed:
            self.outliers_disturbed += 1
            return False
        # A-priori residual, for the upper bound, against the last solved weights
        # (re-solved at least every 8 observations when no decision reads them),
        # clipped and floored as the decisions read them.
        if self._pending >= 8:
            self.w  # noqa: B018 (solves)
        x = self._tiled(x)
        pred = float(self._eff @ x)
        if y > self.outlier_factor * (pred + self._margin) and self.observed >= self.outlier_warmup:
            # Past a run of _MAX_SPIKE_RUN the run is not reset: the high steps are
            # learnt until the fit has caught up with the new level.
            if self._spike_run < _MAX_SPIKE_RUN:
                self.outliers_spike += 1
                self._spike_run += 1
                return False
        else:
            self._spike_run = 0
        self._resid[self._n_resid % len(self._resid)] = y - pred
        self._n_resid += 1
        self._A *= self.lam
        self._A += x[:, None] * x  # np.outer(x, x), without its dispatch
        self._b *= self.lam
        self._b += x * y
        self._mass = self.lam * self._mass + 1.0
        self._stale = True  # solved on the next read: steps without a decision rarely pay
        self._pending += 1
        self.observed += 1
        if self._n_resid <= 32 or self._n_resid % 8 == 0:
            filled = self._resid[: min(self._n_resid, len(self._resid))]
            self._margin = max(0.0, quantile(filled, self.quantile))
        return True

    def update_many(self, x: np.ndarray, y: np.ndarray, disturbed: np.ndarray) -> None:
        """Observations in order, in one go: rows of scaled features `x`, measured
        step times `y` (seconds), and which were `disturbed` (counted, not learnt).

        The weighted sums, the mass and the counts come out as from `update` on
        each row in turn (to rounding). Cheaper, and two things coarser: every
        a-priori residual is taken against the weights solved before the batch
        (`update` re-solves every 8 observations when nothing reads the fit), the
        spike test of every row is against that fit and the margin before the
        batch (so a step `update` would reject after a shrinking margin can be
        learnt here), and the upper margin is refreshed once, at the end. A batch
        in which a step is a spike by that test goes through `update` row by row
        instead."""
        self.outliers_disturbed += int(np.count_nonzero(disturbed))
        if disturbed.any():
            x, y = x[~disturbed], y[~disturbed]
        k = len(y)
        if not k:
            return
        if self._stale:
            self.w  # noqa: B018 (solves)
        if self.row_tile:
            x = x.copy()
            n = np.rint(x[:, 1] * SCALE[1]).astype(np.int64)
            x[:, 1] = -(-n // self.row_tile) * self.row_tile / SCALE[1]
        pred = x @ self._eff
        warm = self.observed + np.arange(k) >= self.outlier_warmup
        if (warm & (y > self.outlier_factor * (pred + self._margin))).any():
            for xi, yi in zip(x, y.tolist()):  # the spike rules are sequential
                self.update(xi, yi)
            return
        self._spike_run = 0
        decay = self.lam ** np.arange(k - 1, -1, -1)  # lambda^(k-1-i): row i's weight now
        lam_k = self.lam ** k
        xw = x * decay[:, None]
        self._A *= lam_k
        self._A += xw.T @ x
        self._b *= lam_k
        self._b += xw.T @ y
        self._mass = lam_k * self._mass + float(decay.sum())
        ring, resid = self._resid, y - pred
        if k > len(ring):  # only the last window's worth is kept
            self._n_resid += k - len(ring)
            resid = resid[-len(ring):]
        ring[(self._n_resid + np.arange(len(resid))) % len(ring)] = resid
        self._n_resid += len(resid)
        self._stale = True
        self._pending += k
        self.observed += k
        self._margin = max(0.0, quantile(ring[: min(self._n_resid, len(ring))], self.quantile))

    def model(self) -> StepTimeModel:
        return StepTimeModel(tuple(float(w) for w in self.w), source="online")


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """np.linalg.solve(a, b), bit for bit, for the fit's small system: the LAPACK
    routine it calls, without its checks and dispatch (most of its cost at 5x5).
    A system that does not solve (never, with the ridge prior: a is positive
    definite) goes through np.linalg.solve, which raises."""
    if _SOLVE1 is not None:
        w = _SOLVE1(a, b, signature="dd->d")
        if w[0] == w[0]:  # a failed solve is all NaN
            return w
    return np.linalg.solve(a, b)


try:  # numpy's private module: np.linalg.solve's own routine, where this numpy has it
    from numpy.linalg import _umath_linalg

    _SOLVE1 = _umath_linalg.solve1
except (ImportError, AttributeError):  # pragma: no cover
    _SOLVE1 = None


def _tile(n: int, tile: int) -> int:
    """n rounded up to a whole number of tiles."""
    return -(-n // tile) * tile
