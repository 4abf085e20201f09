"""What the full-model H200 profile says, against the table it replaces and the
simulator's own models.

    python -m bench.gpu.report [--full PATH] [--extrapolated PATH] [--out result.md]

Tables: the decode steps measured (and the cells no card holds); full over
extrapolated (4 layers x 16) on the cells both have; prefill measured against
the analytic model the simulator used before; prefill over cached context,
measured and modelled; the cascade gate per width; and
whole cascade steps measured against what the simulator's cost model predicts
for them (plain: every branch reads its prefix; two-level: the prefix counted
once per group).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.sim import cost as costs

PROFILES = Path(__file__).resolve().parents[1] / "sim" / "profiles"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1e3 * x:.1f}"


def decode_tables(full: dict, old: dict) -> list[str]:
    out = ["### Decode step (ms), all 64 layers, by batch (rows) and context (columns)", "",
           "| batch | " + " | ".join(str(c) for c in full["contexts"]) + " |",
           "|---:|" + "---:|" * len(full["contexts"])]
    for b, row in zip(full["batches"], full["decode_s"]):
        out.append(f"| {b} | " + " | ".join(_ms(x) for x in row) + " |")
    spread = full.get("decode_run_spread")
    out += ["", f"`-`: more KV than the card holds beside the weights "
                f"({full['kv_capacity_tokens']} tokens); the simulator extends the row."
                + ("" if spread is None else
                   f" Largest difference of a cell between the two runs that measured the "
                   f"table: {100 * spread:.1f}%."), "",
            "### Full over extrapolated (4 layers x 16), cells both measured", "",
            "| batch | " + " | ".join(str(c) for c in old["contexts"]) + " |",
            "|---:|" + "---:|" * len(old["contexts"])]
    fb, fc = full["batches"], full["contexts"]
    for b, row in zip(old["batches"], old["decode_s"]):
        cells = []
        for c, x in zip(old["contexts"], row):
            y = full["decode_s"][fb.index(b)][fc.index(c)] if b in fb and c in fc else None
            cells.append("over KV" if y is None else f"{y / x:.2f}")
        out.append(f"| {b} | " + " | ".join(cells) + " |")
    return out


def prefill_table(full_path: Path, full: dict) -> list[str]:
    m = costs.load(f"measured:{full_path}")
    analytic = costs.AnalyticCost("qwen3-32b", "h200")
    out = ["### Prefill step (ms): measured, the table's model, the analytic model", "",
           "| prompts x tokens | measured | table's model | analytic (used before) |",
           "|---|---:|---:|---:|"]
    for cell in full["prefill"]["cells"]:
        tot = cell["reqs"] * cell["tokens"]
        a = analytic.prefill(tot, cell["reqs"])
        out.append(f"| {cell['reqs']} x {cell['tokens']} | {_ms(cell['prefill_s'])} | "
                   f"{_ms(m.prefill(tot, cell['reqs']))} | {_ms(a)} "
                   f"({a / cell['prefill_s'] - 1:+.0%}) |")
    out += ["", f"Table's model: base(total) + c x total^2 / prompts, c = "
                f"{m._prefill.c:.3g} s/token^2 (in-sample: it is fitted to these cells)."]
    return out


def cached_table(full_path: Path, full: dict) -> list[str]:
    """Prefill over cached context: each cell's attentions, and the model."""
    sec = full.get("prefill_cached")
    if not sec:
        return []
    m = costs.load(f"measured:{full_path}")
    fit = m._cached
    out = ["### Prefill over cached context (ms): requests x new tokens over cached tokens "
           "each", "",
           "| requests x new, cached | eager, SDPA | graph, SDPA | graph, paged split-K | "
           "the simulator's model |", "|---|---:|---:|---:|---:|"]
    for c in sec["cells"]:
        tokens, reqs = c["reqs"] * c["tokens"], c["reqs"]
        model = m.prefill(tokens, reqs, reqs * (c["tokens"] + c["cached"]))
        out.append(f"| {reqs} x {c['tokens']}, {c['cached']} | {_ms(c['prefill_s'])} | "
                   f"{_ms(c.get('graph_s'))} | {_ms(c.get('graph_paged_s'))} | {_ms(model)} |")
    errs = [r["base_s"] + fit(r["reqs"] * r["tokens"], r["reqs"],
                              r["reqs"] * (r["tokens"] + r["cached"])) - r["step_s"]
            for r in fit.rows]
    rel = [e / r["step_s"] for e, r in zip(errs, fit.rows)]
    out += ["", f"Model: the fresh-prompt table above plus, per request, cached x "
                f"({1e6 * fit.read:.3f} us + {1e9 * fit.pair:.2f} ns x new tokens), fitted "
                f"to the better graph time of each cell less the same cell over none "
                f"(in-sample; the whole step within {100 * min(rel):+.0f}% to "
                f"{100 * max(rel):+.0f}% of it). The model column adds that to the "
                "eager fresh-prompt table."]
    return out


def cascade_tables(full_path: Path, full: dict) -> list[str]:
    cas = full["cascade"]
    grid = cas["grid"]
    prefixes = sorted({r["prefix"] for r in grid})
    out = ["### Cascade attention, one layer, one group (plain / two-level time)", "",
           "| width | " + " | ".join(str(p) for p in prefixes) + " | gate: min prefix |",
           "|---:|" + "---:|" * (len(prefixes) + 1)]
    for w, thr in zip(cas["widths"], cas["min_prefix"]):
        by_p = {r["prefix"]: r["plain_s"] / r["cascade_s"] for r in grid if r["width"] == w}
        out.append(f"| {w} | " + " | ".join(f"{by_p[p]:.2f}" if p in by_p else "-"
                                             for p in prefixes)
                   + f" | {'never' if thr is None else int(thr)} |")
    m = costs.load(f"measured:{full_path}")
    out += ["", f"Suffix {grid[0]['suffix_tokens'] // grid[0]['width']} tokens a branch; `-`: "
                "over the card's KV.", "",
            "### Whole decode steps with branch groups (ms): measured vs the simulator's "
            "cost model", "",
            "Table: the decode table alone (plain: every branch reads its prefix; two-level: "
            "the prefix read once per group). Fitted: with the profile's two corrections, "
            f"re-reads of a group's prefix at {full['shared_reread']:.2f} of a fresh read in "
            f"plain attention and {1e9 * full['two_level_s_per_token']:.1f} ns per prefix "
            "token a branch reads through the two-level path (fitted to these steps: "
            "in-sample).", "",
            "| groups x width, prefix | plain | table | fitted | two-level | table | fitted | "
            "gain | table's gain | gate takes it | greedy tokens agree (plain resplit) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    rho, kappa, gate = m.sharing()
    for r in full["cascade_steps"]:
        n = r["batch"]
        own = n * r["suffix"]
        uniq, reads = r["groups"] * r["prefix"], n * r["prefix"]
        t_plain = m.decode(n, own + reads)
        f_plain = m.decode(n, own + uniq + rho * (reads - uniq))
        t_two = m.decode(n, own, uniq, cascade=True)
        f_two = t_two + kappa * reads
        agree = f"{r['same_tokens']:.2f} ({r.get('same_tokens_plain_resplit', float('nan')):.2f})"
        out.append(f"| {r['groups']} x {r['width']}, {r['prefix']} | {_ms(r['plain_s'])} | "
                   f"{_ms(t_plain)} | {_ms(f_plain)} | {_ms(r['cascade_s'])} | {_ms(t_two)} | "
                   f"{_ms(f_two)} | {r['plain_s'] / r['cascade_s']:.2f}x | "
                   f"{t_plain / t_two:.2f}x | "
                   f"{'yes' if gate.pays(r['width'], r['prefix']) else 'no'} | {agree} |")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", type=Path, default=PROFILES / "h200_qwen3_32b_full.json")
    p.add_argument("--extrapolated", type=Path, default=PROFILES / "h200_qwen3_32b_decode.json")
    p.add_argument("--out", type=Path, default=None, help="write markdown here (else stdout)")
    ns = p.parse_args(argv)
    try:
        full = json.loads(ns.full.read_text())
        old = json.loads(ns.extrapolated.read_text())
        lines = [f"{full['label']}; {full['gpu']}, torch {full['torch']}, "
                 f"triton {full['triton']}.", ""]
        for part in (decode_tables(full, old), prefill_table(ns.full, full),
                     cached_table(ns.full, full), cascade_tables(ns.full, full)):
            lines += part + [""]
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        print(f"report: {type(e).__name__}: {e} (a profile from bench.gpu.build_profile "
              f"has every section)", file=sys.stderr)
        return 2
    text = "\n".join(lines)
    if ns.out:
        ns.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
