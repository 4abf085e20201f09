"""Step-time cost models for the simulator, pluggable by name.

Every model answers two questions, in seconds:
    decode(n, kv, shared_unique, cascade)  one decode step of n sequences
        attending kv KV tokens in all (with cascade attention, groups'
        shared prefixes counted once: `shared_unique` is then what the
        cascade reads once per group instead)
    prefill(tokens, reqs, context)  one prefill step of `reqs` requests,
        `tokens` new tokens, `context` tokens of those requests' whole prompts
        (cached prefixes included; only a model fitted with a term for it uses it)

Models:
- `linear`: a fitted linear model, saved as JSON by `taper profile` (fitted
  against the live engine) — the CPU engine's model;
- `analytic:<model>@<gpu>`: bytes over bandwidth and FLOPs over peak for Qwen3
  models on H100/H200, every constant below with its public source;
- `measured:<path>`: a table of timed decode steps (batch x context) for a
  GPU, interpolated (see bench/sim/profiles/; the H200 table is extrapolated
  from 4 layers, as its `label` says).
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class CostModel:
    name = "base"
    step_noise = 0.0  # relative std of step-time noise the simulator draws

    def decode(self, n: int, kv: float, shared_unique: float = 0.0,
               cascade: bool = False) -> float:
        raise NotImplementedError

    def prefill(self, tokens: int, reqs: int, context: float = 0.0,
                cached_new: float | None = None) -> float:
        """`cached_new`: the sum over the step's requests of cached tokens x new
        tokens (their new tokens' attention over what the cache holds), where
        the caller knows it; a model that prices it alone reads it."""
        raise NotImplementedError

    def sharing(self) -> tuple[float, float, object | None]:
        """How branch groups' shared prefixes cost, where a profile measured it:
        (reread, two_level_s, gate). `reread`: the cost of a branch reading its
        group's prefix in plain attention, relative to a read of its own (1: no
        cache reuse); `two_level_s`: seconds a step per prefix token a branch
        reads through the two-level path (its queries against the shared prefix,
        compute the bytes model leaves out); `gate`: a CascadeGate, which groups
        take the two-level path (None: every group)."""
        return 1.0, 0.0, None

    def describe(self) -> dict:
        return {"name": self.name}


@dataclass
class LinearCost(CostModel):
    """T_decode = a + b*n + c*kv (+ d*shared_unique with cascade, kv then counting
    private tokens only); T_prefill = e + f*tokens + g*reqs + h*context (context:
    the prefilled requests' whole prompts, cached prefixes included). Seconds."""

    a: float
    b: float
    c: float
    e: float
    f: float
    g: float = 0.0
    d: float = 0.0
    h: float = 0.0
    gap: float = 0.0  # seconds of scheduler time between steps
    noise: float = 0.0
    name: str = "linear"

    def __post_init__(self) -> None:
        self.step_noise = self.noise

    def decode(self, n, kv, shared_unique=0.0, cascade=False):
        return self.a + self.b * n + self.c * kv + (self.d * shared_unique if cascade else 0.0)

    def prefill(self, tokens, reqs, context=0.0, cached_new=None):
        if self.h:
            return self.e + self.f * tokens + self.g * reqs + self.h * context
        return self.e + self.f * tokens + self.g * reqs

    def describe(self):
        return {"name": self.name, **{k: getattr(self, k) for k in "abcdefgh"},
                "gap": self.gap, "noise": self.noise}

    @classmethod
    def load(cls, path: str | Path) -> LinearCost:
        data = json.loads(Path(path).read_text())
        if data.get("kind") != "linear":
            raise ValueError(f"{path}: not a linear cost model (kind={data.get('kind')!r})")
        return cls(**{k: float(data[k]) for k in ("a", "b", "c", "e", "f")},
                   g=float(data.get("g", 0.0)), d=float(data.get("d", 0.0)),
                   h=float(data.get("h", 0.0)),
                   gap=float(data.get("gap", 0.0)), noise=float(data.get("noise", 0.0)),
                   name=f"linear:{Path(path).name}")

    def save(self, path: str | Path, **extra) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"kind": "linear", **self.describe(), **extra},
                                         indent=2))


# ------------------------------------------------------------------ analytic

# Model shapes: the models' config.json on the Hugging Face hub
# (Qwen/Qwen3-8B, Qwen/Qwen3-32B): num_hidden_layers, hidden_size,
# intermediate_size, num_attention_heads, num_key_value_heads, head_dim, vocab_size.
MODELS = {
    "qwen3-8b": dict(layers=36, hidden=4096, inter=12288, heads=32, kv_heads=8, head_dim=128,
                     vocab=151936),
    "qwen3-32b": dict(layers=64, hidden=5120, inter=25600, heads=64, kv_heads=8, head_dim=128,
                      vocab=151936),
}
# GPUs: NVIDIA datasheets (H100 SXM5: 3.35 TB/s HBM3, 989 TFLOP/s dense BF16;
# H200 SXM: 4.8 TB/s HBM3e, same compute as H100). Achievable fractions: this
# workplace measured an H200 at 4.3 TB/s on a device-to-device copy (0.9 of
# the datasheet) and 788 TFLOP/s on a BF16 GEMM (0.8); decode kernels reach less
# of either, so 0.8 of bandwidth and 0.6 of FLOPs are used (assumptions).
GPUS = {
    "h100": dict(bw=3.35e12, flops=989e12),
    "h200": dict(bw=4.8e12, flops=989e12),
}
BW_EFF, FLOP_EFF = 0.8, 0.6
# Per-step CPU/launch overhead of a CUDA-graph decode step and the scheduler's
# own work, seconds (assumption, of the order SGLang reports for decode).
STEP_OVERHEAD = 0.002


def params(m: dict) -> float:
    """Parameters of a dense Qwen3 decoder (q/k/v/o, SwiGLU MLP, norms, embed + head)."""
    h, d = m["hidden"], m["head_dim"]
    attn = h * (m["heads"] * d) * 2 + h * (m["kv_heads"] * d) * 2
    mlp = 3 * h * m["inter"]
    return m["layers"] * (attn + mlp + 2 * h) + 2 * m["vocab"] * h


class AnalyticCost(CostModel):
    """max(bytes / bandwidth, FLOPs / peak) + a fixed per-step overhead; BF16."""

    def __init__(self, model: str, gpu: str, overhead: float = STEP_OVERHEAD) -> None:
        if model not in MODELS or gpu not in GPUS:
            raise ValueError(f"analytic model {model}@{gpu} unknown; models "
                             f"{sorted(MODELS)}, gpus {sorted(GPUS)}")
        self.m, self.g, self.overhead = MODELS[model], GPUS[gpu], overhead
        self.name = f"analytic:{model}@{gpu}"
        self.weight_bytes = 2.0 * params(self.m)
        self.kv_bytes_per_token = 2.0 * 2 * self.m["layers"] * self.m["kv_heads"] * \
            self.m["head_dim"]
        self.flops_per_token = 2.0 * params(self.m)
        # attention: QK^T and PV, per query token per KV token, all layers
        self.attn_flops_per_kv = 4.0 * self.m["layers"] * self.m["heads"] * self.m["head_dim"]

    def decode(self, n, kv, shared_unique=0.0, cascade=False):
        kv_read = kv + (shared_unique if cascade else 0.0)
        byts = self.weight_bytes + kv_read * self.kv_bytes_per_token
        flops = n * self.flops_per_token + kv * self.attn_flops_per_kv
        if cascade:
            flops += shared_unique * self.attn_flops_per_kv
        return self.overhead + max(byts / (self.g["bw"] * BW_EFF),
                                   flops / (self.g["flops"] * FLOP_EFF))

    def prefill(self, tokens, reqs, context=0.0, cached_new=None):
        byts = self.weight_bytes
        flops = tokens * self.flops_per_token
        return self.overhead + max(byts / (self.g["bw"] * BW_EFF),
                                   flops / (self.g["flops"] * FLOP_EFF))

    def describe(self):
        return {"name": self.name, "model": self.m, "gpu": self.g, "bw_eff": BW_EFF,
                "flop_eff": FLOP_EFF, "overhead_s": self.overhead,
                "weight_bytes": self.weight_bytes, "kv_bytes_per_token": self.kv_bytes_per_token}


def interp(x: float, xp: Sequence[float], fp: Sequence[float]) -> float:
    """np.interp(x, xp, fp) of one x over increasing xp, bit for bit: numpy's
    own cases and formula (numpy/_core/src/multiarray/compiled_base.c), in
    Python floats, without its call overhead (several microseconds a call)."""
    x = float(x)
    if x != x:
        return x
    j = bisect.bisect_right(xp, x) - 1
    if j < 0:
        return float(fp[0])
    if j >= len(xp) - 1 or xp[j] == x:
        return float(fp[j])
    slope = (fp[j + 1] - fp[j]) / (xp[j + 1] - xp[j])
    y = slope * (x - xp[j]) + fp[j]
    if y != y:
        y = slope * (x - xp[j + 1]) + fp[j + 1]
        if y != y and fp[j] == fp[j + 1]:
            y = fp[j]
    return float(y)


def fill_rows(table: list[list[float | None]]) -> list[list[float]]:
    """A decode table with cells left unmeasured (null: more KV than the card
    holds) filled per batch row, linearly in context from the row's last two
    measured cells (a step's attention reads grow linearly with context)."""
    out = []
    for i, row in enumerate(table):
        have = [j for j, x in enumerate(row) if x is not None]
        if not have or have != list(range(len(have))):
            raise ValueError(f"decode_s row {i}: measured cells must come first, got {row}")
        row = [float(x) for x in row[:len(have)]]
        if len(have) < len(table[i]) and len(have) < 2:
            raise ValueError(f"decode_s row {i}: two measured cells needed to extend it")
        out.append(row)
    return out


class PrefillTable:
    """Prefill steps timed on a GPU: cells of `reqs` prompts of `tokens` tokens.
    T(total, reqs) = base(total) + c * total^2 / reqs: the attention term c
    (causal attention over each prompt, sum of squares = total^2 / reqs for
    equal prompts) is the pooled within-total regression over cells of equal
    total and different reqs; base is piecewise linear in total over the
    measured totals, linear beyond the last two."""

    def __init__(self, cells: list[dict]) -> None:
        t = np.array([c["reqs"] * c["tokens"] for c in cells], dtype=float)
        x = np.array([c["reqs"] * c["tokens"] ** 2 for c in cells], dtype=float)
        y = np.array([c["prefill_s"] for c in cells], dtype=float)
        num = den = 0.0
        for total in np.unique(t):
            k = t == total
            if k.sum() > 1:
                dx = x[k] - x[k].mean()
                num += float(dx @ (y[k] - y[k].mean()))
                den += float(dx @ dx)
        self.c = max(num / den, 0.0) if den > 0 else 0.0
        self.totals = sorted(set(t.tolist()))
        if len(self.totals) < 2:
            raise ValueError("prefill cells: two distinct token totals needed")
        self.base = [float(np.mean(y[t == v] - self.c * x[t == v])) for v in self.totals]

    def __call__(self, tokens: float, reqs: int, context: float = 0.0) -> float:
        tot, base = self.totals, self.base
        if tokens <= tot[-1]:
            b = interp(tokens, tot, base)
        else:
            b = base[-1] + (base[-1] - base[-2]) / (tot[-1] - tot[-2]) * (tokens - tot[-1])
        return b + self.c * tokens * tokens / max(1, reqs)


class CachedPrefill:
    """What a prefill step's cached context adds on a GPU (a fork's branch
    prefills over the shared prompt, any prompt the radix cache holds): per
    request, cached tokens x (read + pair x its new tokens), the cached KV read
    and the new tokens' attention over it. Least squares without intercept over
    cells of `reqs` requests of `tokens` new tokens over `cached` tokens each:
    per cell the better of the attentions measured (CUDA-graph times where the
    cell has them, else eager), less the same (reqs, tokens) over none."""

    def __init__(self, cells: list[dict]) -> None:
        best = {}
        for c in cells:
            ts = [c[k] for k in ("graph_s", "graph_paged_s") if c.get(k) is not None]
            best[(c["reqs"], c["tokens"], c["cached"])] = min(ts) if ts else c["prefill_s"]
        x, y, self.rows = [], [], []
        for (reqs, tokens, cached), t in sorted(best.items()):
            base = best.get((reqs, tokens, 0))
            if cached > 0 and base is not None:
                x.append((reqs * cached, reqs * cached * tokens))
                y.append(t - base)
                self.rows.append({"reqs": reqs, "tokens": tokens, "cached": cached,
                                  "step_s": t, "base_s": base})
        if len(x) < 2:
            raise ValueError("prefill_cached cells: two with cached context and the same "
                             "(reqs, tokens) over none needed")
        (read, pair), *_ = np.linalg.lstsq(np.asarray(x, dtype=float), np.asarray(y),
                                           rcond=None)
        self.read, self.pair = max(float(read), 0.0), max(float(pair), 0.0)

    def __call__(self, tokens: float, reqs: int, context: float,
                 cached_new: float | None = None) -> float:
        """Seconds the cached part of a step's prompts adds: `context` their
        whole prompts, `tokens` the new ones; `cached_new`, the sum over the
        requests of cached x new tokens (without it: as if every request had
        the mean new tokens, exact for equal requests)."""
        cached = context - tokens
        if cached <= 0:
            return 0.0
        if cached_new is None:
            cached_new = cached * tokens / max(1, reqs)
        return cached * self.read + self.pair * cached_new


class MeasuredCost(CostModel):
    """A table of decode steps timed on a GPU over (batch, context length),
    bilinear in batch and context; prefill from the table's measured prefill
    cells where it has them (`PrefillTable`), else from the analytic model of
    the same GPU, plus what cached context adds where the table has cells over
    it (`CachedPrefill`; without them, a prompt's cached part costs nothing).
    A table's `label` says how it was measured (profiles/ holds the H200
    measured on all 64 of Qwen3-32B's layers, and the earlier table
    extrapolated from 4 of them)."""

    def __init__(self, path: str | Path, data: dict | None = None) -> None:
        data = json.loads(Path(path).read_text()) if data is None else data
        self.name = f"measured:{Path(path).name}"
        self.batches = np.asarray(data["batches"], dtype=float)
        self.contexts = np.asarray(data["contexts"], dtype=float)
        rows = fill_rows(data["decode_s"])
        self.kv_capacity = data.get("kv_capacity_tokens")
        # The same numbers as Python floats: one step's lookup is a few scalar
        # interpolations, which np.interp's call overhead would dominate.
        self._b, self._c = self.batches.tolist(), self.contexts.tolist()
        self._rows = rows  # each row as measured; _at_context extends a short one
        self.meta = {k: v for k, v in data.items()
                     if k not in ("decode_s", "cascade", "cascade_steps", "prefill",
                                  "prefill_cached")}
        gpu = str(data.get("gpu", "h200")).lower()
        gpu = next((g for g in GPUS if g in gpu), "h200")  # "NVIDIA H200" -> "h200"
        cells = (data.get("prefill") or {}).get("cells")
        self._prefill = PrefillTable(cells) if cells else \
            AnalyticCost(data.get("model", "qwen3-32b"), gpu).prefill
        self.meta["prefill_model"] = "measured cells" if cells else f"analytic {gpu}"
        cached = (data.get("prefill_cached") or {}).get("cells")
        self._cached = CachedPrefill(cached) if cached else None
        if self._cached is not None:
            self.meta["prefill_model"] += " (fresh prompts and over cached context)"
        self._sharing = (float(data.get("shared_reread", 1.0)),
                         float(data.get("two_level_s_per_token", 0.0)),
                         _gate(data["cascade"]) if data.get("cascade") else None)

    def decode(self, n, kv, shared_unique=0.0, cascade=False):
        ctx = (kv + (shared_unique if cascade else 0.0)) / max(1, n)
        # Bilinear over the measured grid; linear beyond its last batch and last
        # context (attention reads grow linearly with both). Only the two batch rows
        # around n are interpolated in context: np.interp reads no others.
        b = self._b
        j = min(max(bisect.bisect_left(b, n) - 1, 0), len(b) - 2)
        r0, r1 = self._at_context(j, ctx), self._at_context(j + 1, ctx)
        if n <= b[-1]:
            return interp(n, b[j:j + 2], (r0, r1))
        return r1 + (r1 - r0) / (b[-1] - b[-2]) * (n - b[-1])

    def _at_context(self, i: int, ctx: float) -> float:
        row = self._rows[i]
        c = self._c if len(row) == len(self._c) else self._c[:len(row)]
        if ctx <= c[-1]:
            return interp(ctx, c, row)
        return row[-1] + (row[-1] - row[-2]) / (c[-1] - c[-2]) * (ctx - c[-1])

    def prefill(self, tokens, reqs, context=0.0, cached_new=None):
        t = self._prefill(tokens, reqs)
        return t if self._cached is None else t + self._cached(tokens, reqs, context,
                                                              cached_new)

    def sharing(self):
        return self._sharing

    def describe(self):
        return {"name": self.name, **self.meta}


def _gate(section: dict):
    from controller.cascade_gate import CascadeGate

    return CascadeGate.from_dict(section)


PROFILES = Path(__file__).parent / "profiles"


def gpu_profiles(folder: Path = PROFILES) -> dict[str, tuple[Path, str]]:
    """The GPUs `taper sim --gpu` offers: every measured decode table in
    `folder` that names its GPU, by the GPU's short name ("NVIDIA H200" ->
    "h200", "NVIDIA H100 80GB HBM3" -> "h100"; "h200-qwen3-32b" when two
    measured tables share a GPU; a table whose label says it is extrapolated
    is "h200-extrapolated" beside a measured one), with the table's path and
    what it is (model, and its label: how it was measured)."""
    found: dict[str, list[tuple[Path, dict]]] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or "decode_s" not in data or "gpu" not in data:
            continue
        gpu = str(data["gpu"]).lower()
        named = re.search(r"\b[a-z]{1,2}\d{2,4}[a-z]?\b", gpu)  # "nvidia h100 80gb" -> h100
        short = named.group(0) if named else (gpu.split() or ["gpu"])[-1]
        found.setdefault(short, []).append((path, data))
    out = {}
    for short, tables in found.items():
        extrapolated = [t for t in tables
                        if str(t[1].get("label", "")).startswith("extrapolated")]
        if len(extrapolated) == 1 and len(tables) > 1:
            path, data = extrapolated[0]
            out[f"{short}-extrapolated"] = (path, f"{data.get('model', path.stem)}, "
                                                  f"{data.get('label')}")
            tables = [t for t in tables if t is not extrapolated[0]]
        models = [str(data.get("model", path.stem)) for path, data in tables]
        for (path, data), model in zip(tables, models):
            name = (short if len(tables) == 1 else f"{short}-{model}"
                    if models.count(model) == 1 else f"{short}-{path.stem}")
            out[name] = (path, f"{model}, {data.get('label', 'measured')}")
    return out


def load(spec: str) -> CostModel:
    """`linear:PATH`, `analytic:MODEL@GPU`, `measured:PATH`, `trace:PATH` (a
    linear model fitted to a server's step trace, `TAPER_STEP_TRACE`), or a
    JSON path."""
    kind, _, rest = spec.partition(":")
    if kind == "trace":
        from bench.sim.steptrace import Trace, fit_linear

        return fit_linear(Trace.read(rest), name=f"trace:{Path(rest).name}")
    if kind == "analytic":
        model, _, gpu = rest.partition("@")
        return AnalyticCost(model, gpu)
    if kind == "measured":
        return MeasuredCost(rest)
    if kind == "linear":
        return LinearCost.load(rest)
    if Path(spec).is_file():
        data = json.loads(Path(spec).read_text())
        return MeasuredCost(spec) if "decode_s" in data else LinearCost.load(spec)
    raise ValueError(f"unknown cost model {spec!r}: use linear:PATH, analytic:MODEL@GPU, "
                     f"measured:PATH or trace:PATH")


def check(model: CostModel) -> None:
    """Sanity: positive, increasing in n and kv."""
    a = model.decode(1, 1000)
    b = model.decode(64, 64000)
    if not (a > 0 and b > a and math.isfinite(b)):
        raise ValueError(f"cost model {model.name} is not increasing: {a} -> {b}")
