"""Two-level (cascade) attention equals plain attention; plans are right."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.cascade_gate import CPU_GATE, CascadeGate
from sglang_taper.cascade import (
    Group,
    attention_lse,
    decode_group,
    group_layout,
    plan_group,
    plan_two_level,
    run_plan,
    two_level_decode,
)

ROOT = Path(__file__).resolve().parent.parent

HEADS = [(4, 4), (4, 2), (8, 1), (6, 3), (8, 2)]  # (query heads, KV heads): MHA, GQA, MQA


@settings(max_examples=80, deadline=None)
@given(b=st.integers(1, 6), p=st.integers(0, 40), heads=st.sampled_from(HEADS),
       d=st.sampled_from([4, 8, 16]), data=st.data())
def test_two_level_equals_plain_attention(b, p, heads, d, data):
    h, kvh = heads
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    suffixes = [data.draw(st.integers(0 if p else 1, 20)) for _ in range(b)]
    q = torch.randn(b, h, d, generator=g, dtype=torch.float64)
    pk, pv = (torch.randn(p, kvh, d, generator=g, dtype=torch.float64) for _ in range(2))
    sk = [torch.randn(s, kvh, d, generator=g, dtype=torch.float64) for s in suffixes]
    sv = [torch.randn(s, kvh, d, generator=g, dtype=torch.float64) for s in suffixes]
    scale = 1 / math.sqrt(d)
    got = two_level_decode(q, pk, pv, sk, sv, scale)
    for i in range(b):
        want, _ = attention_lse(q[i:i + 1], torch.cat([pk, sk[i]]), torch.cat([pv, sv[i]]),
                                scale)
        torch.testing.assert_close(got[i:i + 1], want, rtol=1e-9, atol=1e-9)


def test_two_level_float32_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(16, 8, 32, generator=g)
    pk, pv = torch.randn(300, 2, 32, generator=g), torch.randn(300, 2, 32, generator=g)
    sk = [torch.randn(7 + i, 2, 32, generator=g) for i in range(16)]
    sv = [torch.randn(7 + i, 2, 32, generator=g) for i in range(16)]
    got = two_level_decode(q, pk, pv, sk, sv, 0.2)
    for i in range(16):
        want, _ = attention_lse(q[i:i + 1].double(), torch.cat([pk, sk[i]]).double(),
                                torch.cat([pv, sv[i]]).double(), 0.2)
        torch.testing.assert_close(got[i:i + 1].double(), want, rtol=2e-5, atol=2e-6)


def _batch(seed: int):
    """KV slot rows for a decode batch: two groups sharing prefixes, ordinary rows."""
    g = torch.Generator().manual_seed(seed)
    next_slot = iter(range(10_000))

    def slots(n):
        return torch.tensor([next(next_slot) for _ in range(n)])

    p0, p1 = slots(50), slots(17)
    rows, codes = [], []
    for i in range(4):  # group 0: prefix p0, suffixes of different lengths
        rows.append(torch.cat([p0, slots(3 + i)]))
        codes.append(0)
    rows.append(slots(30))  # an ordinary request
    codes.append(-1)
    for i in range(3):  # group 1
        rows.append(torch.cat([p1, slots(1 + 2 * i)]))
        codes.append(7)
    rows.append(torch.cat([p1[:5], slots(9)]))  # shares less: group 1's LCP shrinks to 5
    codes.append(7)
    rows.append(torch.cat([slots(4), slots(2)]))  # a group of one: ordinary path
    codes.append(9)
    order = torch.randperm(len(rows), generator=g).tolist()
    return [rows[i] for i in order], [codes[i] for i in order]


def test_group_layout_finds_the_shared_prefix():
    rows, codes = _batch(1)
    groups = group_layout(rows, codes)
    by_size = sorted((len(gr.rows), gr.prefix_len) for gr in groups)
    assert by_size == [(4, 5), (4, 50)]
    for gr in groups:
        first = rows[gr.rows[0]][: gr.prefix_len]
        assert all(torch.equal(rows[r][: gr.prefix_len], first) for r in gr.rows)
        assert all(codes[r] == codes[gr.rows[0]] for r in gr.rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_level_plan_computes_plain_attention(seed):
    """The plan handed to FlashInfer's cascade wrapper, executed with the torch
    reference semantics, gives plain attention for every row."""
    rows, codes = _batch(seed)
    groups = group_layout(rows, codes)
    perm, levels = plan_two_level(rows, groups)
    assert sorted(perm.tolist()) == list(range(len(rows)))
    for lv in levels:
        assert int(lv.qo_indptr[-1]) == len(rows)
        assert int(lv.kv_indptr[-1]) == len(lv.kv_indices)
        assert (lv.kv_indptr[1:] > lv.kv_indptr[:-1]).all()  # no empty entry
    # Shared prefixes are read once: level 0 holds fewer slots than the batch's KV.
    assert len(levels[0].kv_indices) < sum(len(r) for r in rows) - len(rows)
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(10_000, 2, 16, generator=g, dtype=torch.float64)
    v_cache = torch.randn(10_000, 2, 16, generator=g, dtype=torch.float64)
    q = torch.randn(len(rows), 4, 16, generator=g, dtype=torch.float64)
    got = run_plan(q, k_cache, v_cache, perm, levels, 0.25)
    for i, r in enumerate(rows):
        want, _ = attention_lse(q[i:i + 1], k_cache[r], v_cache[r], 0.25)
        torch.testing.assert_close(got[i:i + 1], want, rtol=1e-9, atol=1e-9)


def test_gpu_backend_imports_and_plans_on_cpu():
    pytest.importorskip("flashinfer")
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

    from sglang_taper.adapter.cascade_backend import _flashinfer_backend_class

    cls = _flashinfer_backend_class()
    assert issubclass(cls, FlashInferAttnBackend)
    rows, codes = _batch(3)
    perm, levels = plan_two_level(rows, group_layout(rows, codes))
    assert len(levels) == 2 and all(lv.kv_indices.dtype == torch.int32 for lv in levels)


# ------------------------------------------------------------------ the gate

# The shape of a gate `taper profile` measures on the CPU engine: narrow groups
# need long prefixes, wide ones pay at any prefix measured.
GATE = {"widths": [2, 4, 8, 64], "min_prefix": [2000.0, 250.0, 64.0, 64.0]}


def test_gate_takes_the_two_level_path_only_where_it_pays():
    gate = CascadeGate.from_dict(GATE)
    assert not gate.pays(2, 1024)  # narrow, short: the fixed costs dominate
    assert gate.pays(2, 2000) and gate.pays(2, 4096)
    assert not gate.pays(4, 249) and gate.pays(4, 250)
    assert not gate.pays(7, 249)  # between two widths: the narrower one's threshold
    assert gate.pays(8, 64) and not gate.pays(8, 63)
    assert gate.pays(500, 64)  # wider than measured: the widest threshold
    assert not gate.pays(1, 10_000)  # narrower than measured: never
    never = CascadeGate.from_dict({"widths": [2, 16], "min_prefix": [None, 128]})
    assert not never.pays(8, 10**6) and never.pays(16, 128)
    assert CascadeGate.from_dict(never.to_dict()) == never
    assert json.loads(json.dumps(never.to_dict()))["min_prefix"] == [None, 128]


def test_gate_decides_arrays_as_one_by_one():
    import numpy as np

    from controller.cascade_gate import EVERY_SHARED, NEVER

    width, prefix = np.meshgrid(np.arange(0, 70), [0, 1, 63, 64, 249, 250, 2000, 5000])
    width, prefix = width.ravel(), prefix.ravel()
    for gate in (CascadeGate.from_dict(GATE), CPU_GATE, EVERY_SHARED, NEVER):
        many = gate.pays_many(width, prefix)
        assert many.tolist() == [gate.pays(int(w), int(p)) for w, p in zip(width, prefix)]
    assert EVERY_SHARED.pays(2, 1) and not EVERY_SHARED.pays(2, 0)
    assert not EVERY_SHARED.pays(1, 100) and not NEVER.pays(64, 10**9)


def test_the_controller_counts_a_prefix_once_only_where_the_engine_gate_does():
    """Under cascade, a group the engine's gate turns down is read member by
    member: the controller's features must say so (kv in full, no prefix)."""
    from controller import Controller, Seq, StepView, TaperConfig
    from controller.predictor import SCALE

    def seqs(width, prefix, group):
        # the first member prefilled the prefix: the radix cache gave it none
        return [Seq(f"g{group}-{b}", group=group, branch=b, width=width,
                    kv_len=prefix + 10, shared_len=0 if b == 0 else prefix,
                    arrival=0.0, first_token=0.1, generated=10) for b in range(width)]

    view = StepView.from_seqs(seqs(2, 1000, 0) + seqs(4, 400, 1), now=1.0)
    total = 2 * 1010 + 4 * 410

    def features(gate):
        ctl = Controller(TaperConfig(policy="eager", cascade=True), cascade_gate=gate)
        d = ctl.decide(view)
        assert len(d.keep) == 6
        return (d.features * SCALE)[[2, 4]].round().tolist()  # kv, prefix tokens

    # CPU_GATE: width 2 needs 2180 tokens (turned down), width 4 needs 291 (passes)
    assert features(CPU_GATE) == [total - 4 * 400, 400]
    from controller.cascade_gate import EVERY_SHARED, NEVER

    assert features(EVERY_SHARED) == [total - 2 * 1000 - 4 * 400, 1000 + 400]
    assert features(NEVER) == [total, 0]
    # taper's extras: a held member's cost counts its prefix only where the gate passes
    ctl = Controller(TaperConfig(policy="taper", cascade=True), cascade_gate=CPU_GATE)
    mandatory = view.group < 0
    mandatory[[0, 2]] = True  # the base branches
    share = ctl._gated_share(view, mandatory, view.group[[1, 3, 4, 5]])
    assert share.tolist() == [0.0, 0.0, 0.0, 0.0]  # width 2 with one more: still turned down
    mandatory[[3, 4]] = True  # group 1 has 3 members in: a 4th makes it pass
    assert ctl._gated_share(view, mandatory, view.group[[1, 5]]).tolist() == [0.0, 400.0]


def test_the_server_tells_the_controller_its_gate(tmp_path):
    from controller import TaperConfig
    from controller.cascade_gate import EVERY_SHARED, NEVER
    from sglang_taper.adapter.cascade_backend import engine_gate

    cfg = TaperConfig(cascade=True)
    args = SimpleNamespace(attention_backend="taper_cascade", decode_attention_backend=None)
    assert engine_gate(args, cfg) == CPU_GATE
    args.attention_backend = "taper_cascade_flashinfer"
    assert engine_gate(args, cfg) == EVERY_SHARED
    args.decode_attention_backend = "triton"  # the user's own decode backend: no cascade
    assert engine_gate(args, cfg) == NEVER
    prof = tmp_path / "p.json"
    prof.write_text(json.dumps({"cascade": GATE}))
    args.decode_attention_backend = None
    assert engine_gate(args, TaperConfig(cascade=True, cascade_profile=str(prof))) == \
        CascadeGate.from_dict(GATE)


def test_gate_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="CascadeGate.widths"):
        CascadeGate((4, 2), (100.0, 10.0))
    with pytest.raises(ValueError, match="CascadeGate.widths"):
        CascadeGate((2, 4), (100.0,))
    with pytest.raises(ValueError, match="CascadeGate.min_prefix"):
        CascadeGate((2, 4), (100.0, float("nan")))


def test_gate_loads_from_a_profile_and_old_profiles_still_load(tmp_path):
    from bench.profile import write_cascade
    from bench.sim.cost import LinearCost

    old = tmp_path / "old.json"
    LinearCost(a=1e-3, b=2e-4, c=1e-7, e=0.0, f=4e-5).save(old, fitted_s=1.0)
    with pytest.raises(ValueError, match="no cascade section"):
        CascadeGate.load(old)
    write_cascade(old, {**GATE, "grid": []})
    assert CascadeGate.load(old) == CascadeGate.from_dict(GATE)
    assert LinearCost.load(old).b == 2e-4  # the step-time model is kept beside it


def test_cpu_gate_is_the_committed_profile():
    data = json.loads((ROOT / "bench/sim/profiles/cpu_tiny_llama_cascade.json").read_text())
    assert CPU_GATE == CascadeGate.from_dict(data["cascade"])
    assert data["kind"] == "linear"  # a whole `taper profile` output


def _fake_step(rows, codes):
    """What `_layout` reads of a backend and a decode batch."""
    width = max(len(r) for r in rows)
    table = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    backend = SimpleNamespace(req_to_token_pool=SimpleNamespace(req_to_token=table))
    batch = SimpleNamespace(forward_mode=SimpleNamespace(is_decode=lambda: True),
                            batch_size=len(rows), req_pool_indices=torch.arange(len(rows)),
                            seq_lens=torch.tensor([len(r) for r in rows]))
    return backend, batch


def test_groups_the_gate_turns_down_are_ordinary_sequences(monkeypatch):
    """Both backends build on `_layout`: a group below the gate's threshold is
    left out, so the FlashInfer plan puts its members at level 0 as ordinary
    sequences, and the plan still computes plain attention for every row."""
    from sglang_taper.adapter import cascade_backend

    rows, codes = _batch(4)  # groups of 4 sharing 50 and 5 prefix tokens
    backend, batch = _fake_step(rows, codes)
    monkeypatch.setattr(cascade_backend, "_codes", codes)
    every = cascade_backend._layout(backend, batch, None)[0]
    assert sorted(g.prefix_len for g in every) == [5, 50]
    gate = CascadeGate((2,), (20.0,))  # between the two groups' prefixes
    groups, kv_rows = cascade_backend._layout(backend, batch, gate)
    assert [g.prefix_len for g in groups] == [50]
    perm, levels = plan_two_level(kv_rows, groups)
    assert int(levels[0].qo_indptr[1]) == 4  # one level-0 entry for the group ...
    assert len(levels[0].qo_indptr) - 1 == 1 + (len(rows) - 4)  # ... every other row alone
    g = torch.Generator().manual_seed(4)
    k_cache, v_cache = (torch.randn(10_000, 2, 16, generator=g, dtype=torch.float64)
                        for _ in range(2))
    q = torch.randn(len(rows), 4, 16, generator=g, dtype=torch.float64)
    got = run_plan(q, k_cache, v_cache, perm, levels, 0.25)
    for i, r in enumerate(kv_rows):
        want, _ = attention_lse(q[i:i + 1], k_cache[r], v_cache[r], 0.25)
        torch.testing.assert_close(got[i:i + 1], want, rtol=1e-9, atol=1e-9)
    gate_none = CascadeGate((2,), (float("inf"),))
    assert cascade_backend._layout(backend, batch, gate_none) is None  # plain step


def test_backend_group_path_equals_torch_native_decode():
    """The two functions `taper profile` times against each other compute the
    same attention (float32, the CPU engine's dtype)."""
    from sglang_taper.adapter.cascade_backend import plain_decode

    g = torch.Generator().manual_seed(5)
    prefix, own = torch.arange(300), [torch.arange(300 + 10 * i, 305 + 11 * i) for i in range(6)]
    rows = [torch.cat([prefix, o]) for o in own]
    k_cache, v_cache = (torch.randn(400, 2, 32, generator=g) for _ in range(2))
    q = torch.randn(6, 4, 32, generator=g)
    plan = plan_group(rows, Group(tuple(range(6)), 300))
    got = decode_group(q, k_cache, v_cache, plan, 32 ** -0.5)
    table = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    want = plain_decode(q, k_cache, v_cache, table, torch.arange(6),
                        torch.tensor([len(r) for r in rows]), 32 ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_profile_measures_a_gate_from_a_small_grid():
    """`taper profile`'s cascade part on a 2 x 2 x 2 grid (seconds, not minutes):
    a gate that loads, and that agrees with this machine at the two corners,
    where the measured difference is several-fold. One thread: two threads on a
    2-core host shared with other jobs stall for whole time slices."""
    from bench.profile import cascade_section

    sec = cascade_section(widths=(2, 16), prefixes=(64, 2048), suffixes=(4, 16), reps=5,
                          threads=1, log=lambda _: None)
    gate = CascadeGate.from_dict(sec)
    assert sec["threads"] == 1 and len(sec["grid"]) == 8
    assert sec["shape"] == {"heads": 4, "kv_heads": 2, "head_dim": 32, "layers": 2,
                            "dtype": "float32"}
    assert gate.widths == (2, 16)
    assert gate.pays(16, 2048) and not gate.pays(2, 64)
    assert gate.min_prefix[0] >= gate.min_prefix[1]
    assert sec["check"]["agreement"] >= 0.75


def test_min_prefix_is_where_the_measured_ratio_crosses_one():
    from bench.profile import min_prefixes

    def row(w, p, ratio, s=10):
        return {"width": w, "prefix": p, "suffix_tokens": s, "plain_s": ratio, "cascade_s": 1.0}

    grid = [row(2, 100, 0.5), row(2, 400, 2.0),  # crosses 1 half-way in log: 200
            row(4, 100, 1.5), row(4, 400, 3.0),  # pays at the first prefix measured
            row(8, 100, 0.9), row(8, 400, 0.95),  # never pays ...
            row(16, 100, 2.0), row(16, 400, 0.8), row(16, 400, 1.2, s=50)]  # ... nor here
    assert min_prefixes(grid[:4], (2, 4), (100, 400)) == [pytest.approx(200.0), 100.0]
    assert min_prefixes(grid[6:], (16,), (100, 400)) == [float("inf")]  # worst suffix
    # Wider groups never paid: the narrower ones' thresholds are raised to match.
    assert min_prefixes(grid, (2, 4, 8, 16), (100, 400)) == [float("inf")] * 4
