"""The full-model GPU profile: its script runs every path on the CPU (Triton's
interpreter) with attention checked against float64, and the simulator reads
what it measured (cells no card holds, measured prefill, KV capacity)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu import build_profile
from bench.sim import cli
from bench.sim import cost as costs

ROOT = Path(__file__).resolve().parents[1]
FULL = ROOT / "bench/sim/profiles/h200_qwen3_32b_full.json"


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    """bench/gpu/h200_full_profile.py --cpu-check: the device script's every
    section on a tiny model, Triton kernels interpreted on the CPU."""
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("gpu-check")
    r = subprocess.run([sys.executable, "-m", "bench.gpu.h200_full_profile", str(out),
                        "--cpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, json.loads((out / "profile.json").read_text())


def test_kernels_match_float64_attention(cpu_check):
    _, data = cpu_check
    check = data["kernel_check"]
    # plain paged decode over 1 and 5 splits, and two-level over 2 groups of 3
    assert set(check) == {"plain_splits1_rel_err", "plain_splits5_rel_err", "two_level_rel_err"}
    assert all(err < 1e-5 for err in check.values()), check  # float32 on the CPU


def test_every_section_measures_and_two_level_tokens_agree(cpu_check, tmp_path_factory):
    out, data = cpu_check
    assert "errors" not in data
    dec = data["decode"]
    assert all(x is not None and x > 0 for row in dec["decode_s"] for x in row)
    assert len(data["prefill"]["cells"]) == 2
    cached = data["prefill_cached"]
    assert cached["check_rel_err"] < 1e-5 and cached["check_rel_err_paged"] < 1e-5
    assert [(c["reqs"], c["tokens"], c["cached"]) for c in cached["cells"]] == \
        [(1, 4, 0), (1, 4, 60), (3, 4, 0), (3, 4, 60), (2, 16, 30)]
    assert all(c[k] > 0 for c in cached["cells"] for k in ("prefill_s", "graph_s",
                                                            "graph_paged_s"))
    assert {(r["width"], r["prefix"]) for r in data["cascade_attention"]} == \
        {(2, 30), (2, 70), (4, 30), (4, 70)}
    # float32: the same greedy tokens with plain and two-level attention
    assert all(r["same_tokens"] == 1.0 for r in data["cascade_steps"])
    # and the simulator's profile can be built from such a run
    runs = tmp_path_factory.mktemp("runs")
    (runs / "run1").mkdir()
    (runs / "run1" / "profile.json").write_text(json.dumps(data))
    built = build_profile.build(runs)
    assert built["source"]["decode"] == "run1" and built["cascade"]["grid"]
    assert built["prefill_cached"]["cells"] == cached["cells"]
    # a later run re-measuring a section as an anchor: --pin keeps the first's
    later = json.loads(json.dumps(data))
    later["prefill"]["cells"][0]["prefill_s"] *= 2
    (runs / "run2").mkdir()
    (runs / "run2" / "profile.json").write_text(json.dumps(later))
    assert build_profile.build(runs)["source"]["prefill"] == "run2"
    pinned = build_profile.build(runs, {"prefill": "run1"})
    assert pinned["source"]["prefill"] == "run1" and pinned["source"]["decode"] == "run2"
    assert pinned["prefill"]["cells"] == data["prefill"]["cells"]
    with pytest.raises(ValueError, match="--pin prefill=run9"):
        build_profile.build(runs, {"prefill": "run9"})


def test_unmeasured_cells_extend_their_row_and_prefill_reads_the_cells(tmp_path):
    table = {"gpu": "NVIDIA H200", "model": "qwen3-32b", "batches": [1, 2],
             "contexts": [100, 200, 300], "decode_s": [[1.0, 2.0, 3.0], [2.0, 4.0, None]],
             "kv_capacity_tokens": 500,
             "prefill": {"cells": [{"reqs": 1, "tokens": 10, "prefill_s": 1.0 + 0.1 * 100},
                                   {"reqs": 2, "tokens": 5, "prefill_s": 1.0 + 0.1 * 50},
                                   {"reqs": 1, "tokens": 40, "prefill_s": 4.0 + 0.1 * 1600},
                                   {"reqs": 4, "tokens": 10, "prefill_s": 4.0 + 0.1 * 400}]}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    m = costs.load(f"measured:{path}")
    assert m.decode(2, 2 * 300) == pytest.approx(6.0)  # the row's own slope, 2 per 100
    assert m.decode(1, 300) == pytest.approx(3.0)
    assert m.decode(2, 2 * 150) == pytest.approx(3.0)
    # base(total) + c * total^2 / reqs: c = 0.1 recovered from equal totals
    assert m.prefill(10, 1) == pytest.approx(11.0)
    assert m.prefill(40, 4) == pytest.approx(44.0)
    assert m.prefill(25, 1) == pytest.approx(2.5 + 0.1 * 625)  # base interpolated
    assert m.prefill(70, 7) == pytest.approx(7.0 + 0.1 * 700)  # base extended
    assert m.describe()["prefill_model"] == "measured cells"
    # --kv-capacity defaults to what the card held
    ns = type("NS", (), {"kv_capacity": None, "cost_model": f"measured:{path}"})()
    cli.default_kv_capacity(ns)
    assert ns.kv_capacity == 500
    table["decode_s"][1] = [2.0, None, 5.0]
    path.write_text(json.dumps(table))
    with pytest.raises(ValueError, match="measured cells must come first"):
        costs.load(f"measured:{path}")


def test_the_shipped_full_profile():
    """The committed H200 table: every batch measured at 512 and 1K contexts,
    only cells over the card's KV left out, its prefill cells reproduced."""
    data = json.loads(FULL.read_text())
    assert data["measured_layers"] == data["model_layers"] == 64
    cap = data["kv_capacity_tokens"]
    for b, row in zip(data["batches"], data["decode_s"]):
        for ctx, x in zip(data["contexts"], row):
            assert (x is None) == (b * (ctx + 1) > cap), (b, ctx)
    m = costs.load(f"measured:{FULL}")
    costs.check(m)
    for cell in data["prefill"]["cells"]:
        got = m.prefill(cell["reqs"] * cell["tokens"], cell["reqs"])
        assert got == pytest.approx(cell["prefill_s"], rel=0.02)
    assert data["cascade"]["min_prefix"] == sorted(data["cascade"]["min_prefix"], reverse=True)


def test_cached_context_adds_its_reads_and_attention_to_a_prefill(tmp_path):
    """CachedPrefill: per request, cached x (read + pair x new tokens), fitted
    to the better attention of each cell less the same cell over no context;
    a prompt with nothing cached costs what the fresh-prompt cells say."""
    read, pair = 2e-7, 5e-9

    def cell(reqs, tokens, cached, slower=0.0):
        t = 0.03 + 0.001 * reqs + reqs * cached * (read + pair * tokens)
        return {"reqs": reqs, "tokens": tokens, "cached": cached, "prefill_s": 9.0,
                "graph_s": t + slower, "graph_paged_s": t}  # the paged one is the better

    cells = [cell(r, t, c, slower=0.01 * c / 4096) for r, t in ((1, 8), (8, 8), (4, 256))
             for c in (0, 1024, 4096)]
    fit = costs.CachedPrefill(cells)
    assert fit.read == pytest.approx(read) and fit.pair == pytest.approx(pair)
    assert fit(64, 8, 64) == 0.0  # nothing cached
    assert fit(64, 8, 8 * (1000 + 8)) == pytest.approx(8000 * (read + pair * 8))
    with pytest.raises(ValueError, match="two with cached context"):
        costs.CachedPrefill(cells[:2])
    data = json.loads(FULL.read_text())
    m = _profile_with(tmp_path, prefill_cached={"cells": cells})
    plain = _profile_with(tmp_path, prefill_cached=None)
    assert m.prefill(64, 8, 64) == plain.prefill(64, 8, 64) == plain.prefill(64, 8)
    assert m.prefill(64, 8, 8064) == pytest.approx(plain.prefill(64, 8) + fit(64, 8, 8064))
    assert "over cached context" in m.describe()["prefill_model"]
    # the shipped profile: the better of its two attentions within 20% of each cell
    shipped = costs.CachedPrefill(data["prefill_cached"]["cells"])
    for r in shipped.rows:
        tokens, reqs = r["reqs"] * r["tokens"], r["reqs"]
        got = r["base_s"] + shipped(tokens, reqs, reqs * (r["tokens"] + r["cached"]))
        assert got == pytest.approx(r["step_s"], rel=0.2), r


def _profile_with(tmp_path, **changes) -> costs.MeasuredCost:
    data = {**json.loads(FULL.read_text()), **changes}
    path = tmp_path / f"p{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(data))
    return costs.load(f"measured:{path}")


def test_shared_prefix_reads_cost_what_the_profile_measured(tmp_path):
    """The simulator charges a branch group's prefix as the profile measured:
    plain attention's re-reads at `shared_reread`, the two-level path's prefix
    once plus its compute per token read, only for groups the gate passes."""
    from dataclasses import replace

    from bench.sim.run import simulate
    from bench.workload import PRESETS, generate, with_slo
    from controller import TaperConfig

    progs = with_slo(generate(replace(PRESETS["parallel-reasoning"], num_programs=12,
                                      rate=0.5, seed=3)), 10.0, 0.2)
    cheap, full_cost = _profile_with(tmp_path), _profile_with(tmp_path, shared_reread=1.0)
    assert cheap.sharing()[0] == pytest.approx(0.547, abs=0.01)
    runs = {name: simulate(progs, cost, "eager")
            for name, cost in (("reread", cheap), ("no reuse", full_cost))}
    # the same programs: a decode step is cheaper on average
    per_step = {k: r["server"]["decode_time_s"] / r["server"]["decode_steps"]
                for k, r in runs.items()}
    assert per_step["reread"] < per_step["no reuse"], per_step
    # one step by hand: two groups (widths 3 and 2, prefixes 1000 and 500) and a
    # lone request, 100 own tokens each
    import numpy as np

    from bench.sim.engine import Engine
    from bench.sim.run import make_controller

    g = np.array([0, 0, 0, 1, 1, -1])
    shared = np.array([1000, 1000, 1000, 500, 500, 0])
    kv = float((shared + 100).sum())
    eng = Engine(cheap, make_controller("eager", cheap))
    rho = cheap.sharing()[0]
    uniq, kv_eff, extra, two = eng._shared_reads(g, shared, g >= 0, kv)
    assert (uniq, extra, two) == (0.0, 0.0, False)
    assert kv_eff == pytest.approx(kv - (1 - rho) * (2000 + 500))
    # with cascade: a gate that passes no group reads every prefix as plain does
    never = {"widths": [2], "min_prefix": [None]}
    cascade = TaperConfig(cascade=True)
    gated_off = simulate(progs, _profile_with(tmp_path, cascade=never), "eager", cascade)
    assert gated_off["server"]["decode_time_s"] == pytest.approx(
        runs["reread"]["server"]["decode_time_s"], rel=1e-9)
    every = {"widths": [2], "min_prefix": [0]}
    two_level = simulate(progs, _profile_with(tmp_path, cascade=every), "eager", cascade)
    assert two_level["server"]["decode_time_s"] < gated_off["server"]["decode_time_s"]
    for run in (*runs.values(), gated_off, two_level):  # every program ran to its end
        recs = run["records"]
        assert len(recs) == len(progs) and not any(r.error for r in recs)
        assert all(len(r.stages) == len(p.stages) for r, p in zip(recs, progs))
