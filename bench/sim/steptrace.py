"""A live server's step trace (`TAPER_STEP_TRACE=PATH` on `taper serve`), read
and taken apart for the simulator's fidelity: what a request's time per output
token is made of, live, against the cost model the simulator runs on.

Per decode step: its own time (launch to result), the cycle to the next
decode step's launch (the step, the scheduler's gap, and any prefill between:
what a running request waits per token), and the cost model's prediction at
the step's (sequences, KV tokens), its gap included (against the cycles where
one decode step follows another). Per prefill step: its time against the
model's. Between steps: the scheduler's gap (idle stretches left out).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IDLE_S = 0.5  # a gap longer than this between two steps is the server idling


@dataclass
class Trace:
    kind: np.ndarray  # "d" or "p"
    launch: np.ndarray
    end: np.ndarray
    size: np.ndarray  # decode: sequences; prefill: new tokens
    count: np.ndarray  # decode: KV tokens; prefill: requests
    context: np.ndarray  # prefill: the requests' whole prompts (cached included); decode: 0

    @classmethod
    def read(cls, path: str | Path, t0: float = -np.inf, t1: float = np.inf) -> Trace:
        """The steps launched in [t0, t1) (scheduler monotonic seconds, which on
        Linux is the client's time.monotonic() too), in launch order."""
        return cls.read_windows(path, [(t0, t1)])

    @classmethod
    def read_windows(cls, path: str | Path, windows: list[tuple[float, float]]) -> Trace:
        """The steps launched in any of the windows [t0, t1), in launch order.
        Windows further apart than IDLE_S read as idling between them (fits and
        cycles leave that gap out); closer ones would join into one stretch.
        A path ending in .gz is read gzipped."""
        rows = []
        path = Path(path)
        text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" \
            else path.read_text()
        for i, line in enumerate(text.splitlines()):
            parts = line.split(",")
            if parts[0] == "kind":  # a header (each server that appended wrote one)
                continue
            if len(parts) not in (5, 6) or parts[0] not in ("d", "p"):
                raise ValueError(f"{path}:{i + 1}: not a step line: {line!r}")
            rows.append((parts[0], float(parts[1]), float(parts[2]), int(parts[3]),
                         int(parts[4]), int(parts[5]) if len(parts) == 6 else 0))
        rows = sorted((r for r in rows if any(t0 <= r[1] < t1 for t0, t1 in windows)),
                      key=lambda r: r[1])
        if not rows:
            return cls(*(np.array([]) for _ in range(6)))
        cols = list(zip(*rows))
        return cls(np.array(cols[0]), *(np.array(c, dtype=float) for c in cols[1:]))


def _pct(x: np.ndarray) -> dict:
    if not len(x):
        return {"n": 0}
    return {"n": int(len(x)), "mean": float(x.mean()), "p50": float(np.percentile(x, 50)),
            "p90": float(np.percentile(x, 90)), "p99": float(np.percentile(x, 99))}


def _decode_pairs(tr: Trace) -> tuple[np.ndarray, np.ndarray]:
    """The decode steps a decode step follows without idling: their indices and
    the time from their launch to the next one's (the cycle a running request
    sees)."""
    if len(tr.kind) < 2:
        return np.zeros(0, dtype=int), np.zeros(0)
    dec = tr.kind == "d"
    i = np.flatnonzero(dec[:-1] & dec[1:] & (tr.launch[1:] - tr.end[:-1] < IDLE_S))
    return i, tr.launch[i + 1] - tr.launch[i]


def _over_model(tr: Trace, cost, i: np.ndarray, cycle: np.ndarray) -> np.ndarray:
    """Decode cycles (`_decode_pairs`) over the model's decode step and gap at
    their steps' (sequences, KV): the simulator's time from launch to launch."""
    g = getattr(cost, "gap", 0.0)
    model = np.array([cost.decode(int(n), float(kv)) + g
                      for n, kv in zip(tr.size[i], tr.count[i])])
    return cycle / np.maximum(model, 1e-9)


def _cycle_bins(tr: Trace, cost, t0: float, bin_s: float):
    """The decode cycles' ratios to the model (`_over_model`) and the `bin_s`
    bin from `t0` each was launched in (empty arrays without any cycle)."""
    i, cycle = _decode_pairs(tr)
    ratio = _over_model(tr, cost, i, cycle)
    return ratio, np.floor((tr.launch[i] - t0) / bin_s).astype(int)


def parts(tr: Trace, cost, window: float) -> dict:
    """The trace's make-up (seconds) against `cost` (a simulator cost model)."""
    dec = tr.kind == "d"
    pre = ~dec
    step = tr.end - tr.launch
    # gap: next launch - this end, over consecutive steps of any kind, idle left out
    gap = tr.launch[1:] - tr.end[:-1] if len(step) > 1 else np.array([])
    busy_gap = gap[gap < IDLE_S]
    # cycle: from a decode step's launch to the next decode step's launch, when the
    # two are not separated by idling (what a running request waits per token)
    di = np.flatnonzero(dec)
    cycle = np.array([])
    if len(di) > 1:
        c = tr.launch[di[1:]] - tr.launch[di[:-1]]
        ok = np.array([np.all(gap[a:b] < IDLE_S) for a, b in zip(di[:-1], di[1:])])
        cycle = c[ok]
    # The model's decode step with its gap before it: the simulator's time from one
    # decode launch to the next, against the live one where two decode steps follow.
    gap0 = getattr(cost, "gap", 0.0)
    pred = np.array([cost.decode(int(n), float(kv)) + gap0
                     for n, kv in zip(tr.size[dec], tr.count[dec])])
    cycle_ratio = _over_model(tr, cost, *_decode_pairs(tr))
    pre_pred = np.array([cost.prefill(int(t), int(r), float(x))
                         for t, r, x in zip(tr.size[pre], tr.count[pre], tr.context[pre])])
    return {
        "window_s": window,
        "decode_steps": int(dec.sum()), "prefill_steps": int(pre.sum()),
        "decode_step_s": _pct(step[dec]),
        "decode_cycle_s": _pct(cycle),
        "model_decode_s": _pct(pred),
        "decode_measured_over_model": _pct(cycle_ratio),
        "gap_s": _pct(busy_gap),
        "prefill_s": float(step[pre].sum()),
        "model_prefill_s": float(pre_pred.sum()),
        "decode_s": float(step[dec].sum()),
        "gap_total_s": float(busy_gap.sum()),
        "idle_s": float(gap[gap >= IDLE_S].sum()) if len(gap) else 0.0,
        "mean_batch": float(tr.size[dec].mean()) if dec.any() else 0.0,
        "mean_kv": float(tr.count[dec].mean()) if dec.any() else 0.0,
    }


def tail_windows(tr: Trace, cost, spans: list[tuple[float, float, float]],
                 top: int = 8) -> dict:
    """What the slowest requests decoded through, against the middle ones: the
    `top` slowest of `spans` ((TPOT, first token, last token) per request, in
    the trace's seconds) and the middle half of them by TPOT, each group the
    decode cycles launched inside its requests' spans (a cycle inside two
    counted once): the cycle (launch to next decode launch) over the model's
    step and gap, the step alone over the model's step, the scheduler's gap
    after the step, the batch; and the cycles outside the group's spans at the
    same batch sizes (`outside_same_batch`: per batch size the outside cycles'
    median ratio, weighted by the group's cycles at that size): if it stays
    below the group's, the group's steps were slow in time, not by the batch's
    make-up. Below 32 requests the middle half holds some of the slowest.
    Empty groups have n 0."""
    i, cycle = _decode_pairs(tr)
    if not len(i) or not spans:
        return {"slowest": {"requests": 0, "n": 0}, "middle": {"requests": 0, "n": 0}}
    launch, size = tr.launch[i], tr.size[i]
    model = np.array([cost.decode(int(n), float(kv)) for n, kv in zip(size, tr.count[i])])
    ratio = cycle / np.maximum(model + getattr(cost, "gap", 0.0), 1e-9)  # as _over_model
    ranked = sorted(spans, key=lambda s: -s[0])
    k = min(top, len(ranked))
    groups = {"slowest": ranked[:k], "middle": ranked[len(ranked) // 4:3 * len(ranked) // 4]}

    def group(chosen) -> dict:
        inside = np.zeros(len(i), dtype=bool)
        for _, a, b in chosen:
            inside |= (launch >= a) & (launch < b)
        if not inside.any():
            return {"requests": len(chosen), "n": 0}
        matched, weight = 0.0, 0
        for b in np.unique(size[inside]):
            out_b = ~inside & (size == b)
            if out_b.any():
                w = int(np.count_nonzero(inside & (size == b)))
                matched += w * float(np.median(ratio[out_b]))
                weight += w
        return {"requests": len(chosen), "n": int(inside.sum()),
                "outside_same_batch": matched / weight if weight else None,
                "tpot_s": [float(min(t for t, _, _ in chosen)),
                           float(max(t for t, _, _ in chosen))],
                "cycle_over_model": float(np.median(ratio[inside])),
                "step_over_model": float(np.median((tr.end[i] - launch)[inside]
                                                   / np.maximum(model[inside], 1e-9))),
                "gap_s": float(np.median(tr.launch[i + 1][inside] - tr.end[i][inside])),
                "batch": float(size[inside].mean())}

    return {name: group(chosen) for name, chosen in groups.items()}


def fit_linear(tr: Trace, name: str = "linear:step-trace"):
    """A LinearCost fitted to a trace's server-side steps. The scheduler's time
    between two steps grows with the batch it just finished (its results
    processed, streamed and the next batch built: 0.5-0.8 ms on average after
    one sequence, 1.3-2.0 ms after 10-20, on the CPU engine), so a decode step is
    fitted as the cycle a running request sees, from its launch to the next
    decode step's launch: a + gap + b*seqs + c*kv, where `gap` (the model's
    constant time between steps, which the simulator adds before each decode
    and after each prefill) is the median gap from a prefill step to a decode
    step (the gap before a prefill may be the server idling for the client). Prefill:
    e + f*tokens + g*requests + h*context over the prefill steps' own times.
    Least squares with a negative coefficient clipped to 0 and the rest
    refitted; the noise is the decode cycles' relative residual standard
    deviation."""
    from bench.sim.cost import LinearCost

    dec = tr.kind == "d"
    pre = ~dec
    step = tr.end - tr.launch
    if dec.sum() < 3 or pre.sum() < 3:
        raise ValueError(f"too few steps to fit ({int(dec.sum())} decode, "
                         f"{int(pre.sum())} prefill; 3 of each needed)")

    def nnls(cols: list[np.ndarray], y: np.ndarray) -> np.ndarray:
        keep = list(range(len(cols)))
        while True:
            x = np.linalg.lstsq(np.column_stack([cols[i] for i in keep]), y, rcond=None)[0]
            if (x >= 0).all() or len(keep) == 1:
                out = np.zeros(len(cols))
                out[keep] = np.maximum(x, 0.0)
                return out
            keep.pop(int(np.argmin(x)))

    gap = tr.launch[1:] - tr.end[:-1]
    busy = gap < IDLE_S
    # An overlap scheduler's trace has negative gaps (a step's end is when its result
    # was processed, after the next launch): the simulator's gap is not below 0.
    after_prefill = gap[busy & pre[:-1] & dec[1:]]  # (before a prefill it may be idling)
    every = gap[busy]
    gap0 = max(0.0, float(np.median(after_prefill if len(after_prefill) else every))) \
        if len(every) else 0.0
    # A decode step's cycle: to the next step's launch when that is a decode step.
    cyc, cycle = _decode_pairs(tr)
    if len(cyc) >= 3:
        n, kv, y = tr.size[cyc], tr.count[cyc], cycle
    else:  # too few decode steps in a row: their own times, the constant gap added
        n, kv, y = tr.size[dec], tr.count[dec], step[dec] + gap0
    a, b, c = nnls([np.ones(len(y)), n, kv], y)
    e, f, g, h = nnls([np.ones(int(pre.sum())), tr.size[pre], tr.count[pre], tr.context[pre]],
                      step[pre])
    model = a + b * n + c * kv
    return LinearCost(a=float(max(0.0, a - gap0)), b=float(b), c=float(c), e=float(e),
                      f=float(f), g=float(g), h=float(h), gap=gap0,
                      noise=float(np.std(y / np.maximum(model, 1e-9) - 1.0)), name=name)


def load_slowdown(tr: Trace, cost, t0: float, bin_s: float = 5.0,
                  min_cycles: int = 5) -> tuple[float, float]:
    """How a run's speed against `cost` moves with its own traffic, for
    `SimConfig.load`: per `bin_s` seconds from `t0`, the median ratio of the
    live decode cycles to the model (as `host_speed`) against the tokens the
    server decoded per second in that bin; (alpha, slope) of the least-squares
    line ratio = alpha + slope x tokens/s over the bins with `min_cycles`
    cycles or more (slope 0, alpha their median, where it would fall or cross
    zero before no traffic; (1, 0) with fewer than three such bins)."""
    ratio, b = _cycle_bins(tr, cost, t0, bin_s)
    if not len(ratio):
        return 1.0, 0.0
    dec = tr.kind == "d"
    tb = np.floor((tr.launch[dec] - t0) / bin_s).astype(int)
    x, y = [], []
    for k in np.unique(b):
        here = ratio[b == k]
        if len(here) >= min_cycles:
            x.append(float(tr.size[dec][tb == k].sum()) / bin_s)
            y.append(float(np.median(here)))
    if len(x) < 3:
        return 1.0, 0.0
    slope, alpha = np.polyfit(np.asarray(x), np.asarray(y), 1)
    if slope <= 0 or alpha <= 0:  # SimConfig.load needs a speed above 0 at no traffic
        return float(np.median(y)), 0.0
    return float(alpha), float(slope)


def host_speed(tr: Trace, cost, t0: float, bin_s: float = 5.0,
               min_cycles: int = 5) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The host's speed over a run against `cost`, for `SimConfig.speed`: per
    `bin_s` seconds from `t0` (the run's start, the simulation's time 0), the
    median ratio of the live decode-to-decode cycles launched in that bin to the
    model's decode step and gap at the same (sequences, KV). A bin with fewer
    than `min_cycles` cycles keeps the last factor (the first: all cycles'
    median, 1.0 without any)."""
    ratio, b = _cycle_bins(tr, cost, t0, bin_s)
    if not len(ratio):
        return (0.0,), (1.0,)
    last = float(np.median(ratio))
    times, factors = [], []
    for k in range(max(0, int(b.min())), int(b.max()) + 1):
        here = ratio[b == k]
        if len(here) >= min_cycles:
            last = float(np.median(here))
        times.append(k * bin_s)
        factors.append(last)
    if not times:  # every cycle before t0
        return (0.0,), (last,)
    return tuple(times), tuple(factors)
