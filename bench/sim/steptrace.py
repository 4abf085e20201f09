"""A live server's step trace (`TAPER_STEP_TRACE=PATH` on `taper serve`), read
and taken apart for the simulator's fidelity: what a request's time per output
token is made of, live, against the cost model the simulator runs on.

Per decode step: its own time (launch to result), the cycle to the next
decode step's launch (the step, the scheduler's gap, and any prefill between:
what a running request waits per token), and the cost model's prediction at
the step's (sequences, KV tokens). Per prefill step: its time against the
model's. Between steps: the scheduler's gap (idle stretches left out).
"""

from __future__ import annotations

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
        rows = []
        for i, line in enumerate(Path(path).read_text().splitlines()):
            parts = line.split(",")
            if parts[0] == "kind":  # a header (each server that appended wrote one)
                continue
            if len(parts) not in (5, 6) or parts[0] not in ("d", "p"):
                raise ValueError(f"{path}:{i + 1}: not a step line: {line!r}")
            rows.append((parts[0], float(parts[1]), float(parts[2]), int(parts[3]),
                         int(parts[4]), int(parts[5]) if len(parts) == 6 else 0))
        rows = sorted((r for r in rows if t0 <= r[1] < t1), key=lambda r: r[1])
        if not rows:
            return cls(*(np.array([]) for _ in range(6)))
        cols = list(zip(*rows))
        return cls(np.array(cols[0]), *(np.array(c, dtype=float) for c in cols[1:]))


def _pct(x: np.ndarray) -> dict:
    if not len(x):
        return {"n": 0}
    return {"n": int(len(x)), "mean": float(x.mean()), "p50": float(np.percentile(x, 50)),
            "p90": float(np.percentile(x, 90)), "p99": float(np.percentile(x, 99))}


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
    pred = np.array([cost.decode(int(n), float(kv))
                     for n, kv in zip(tr.size[dec], tr.count[dec])])
    pre_pred = np.array([cost.prefill(int(t), int(r), float(x))
                         for t, r, x in zip(tr.size[pre], tr.count[pre], tr.context[pre])])
    return {
        "window_s": window,
        "decode_steps": int(dec.sum()), "prefill_steps": int(pre.sum()),
        "decode_step_s": _pct(step[dec]),
        "decode_cycle_s": _pct(cycle),
        "model_decode_s": _pct(pred),
        "decode_measured_over_model": _pct(step[dec] / pred) if len(pred) else {"n": 0},
        "gap_s": _pct(busy_gap),
        "prefill_s": float(step[pre].sum()),
        "model_prefill_s": float(pre_pred.sum()),
        "decode_s": float(step[dec].sum()),
        "gap_total_s": float(busy_gap.sum()),
        "idle_s": float(gap[gap >= IDLE_S].sum()) if len(gap) else 0.0,
        "mean_batch": float(tr.size[dec].mean()) if dec.any() else 0.0,
        "mean_kv": float(tr.count[dec].mean()) if dec.any() else 0.0,
    }


def fit_linear(tr: Trace, name: str = "linear:step-trace"):
    """A LinearCost fitted to a trace's server-side steps: decode a + b*seqs +
    c*kv and prefill e + f*tokens + g*requests by least squares (a negative
    coefficient clipped to 0 and the rest refitted), the scheduler's gap as the
    median between busy steps, the noise as the decode residuals' relative
    standard deviation."""
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

    one = np.ones(int(dec.sum()))
    a, b, c = nnls([one, tr.size[dec], tr.count[dec]], step[dec])
    e, f, g, h = nnls([np.ones(int(pre.sum())), tr.size[pre], tr.count[pre], tr.context[pre]],
                      step[pre])
    model = a + b * tr.size[dec] + c * tr.count[dec]
    gap = tr.launch[1:] - tr.end[:-1]
    gap = gap[gap < IDLE_S]
    # An overlap scheduler's trace has negative gaps (a step's end is when its result
    # was processed, after the next launch): the simulator's gap is not below 0.
    return LinearCost(a=float(a), b=float(b), c=float(c), e=float(e), f=float(f), g=float(g),
                      h=float(h),
                      gap=max(0.0, float(np.median(gap))) if len(gap) else 0.0,
                      noise=float(np.std(step[dec] / np.maximum(model, 1e-9) - 1.0)),
                      name=name)
