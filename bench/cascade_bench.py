"""Decode step time of one branch group, cascade attention on vs off, on the
CPU engine: 16 and 64 branches sharing a 1K- and a 4K-token prefix.

    .venv/bin/python -m bench.cascade_bench [--out results/cascade_bench.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import urllib.request
from pathlib import Path

import aiohttp

from bench.client import generate
from sglang_taper.server import ServerProcess


def _history(url: str) -> list[dict]:
    with urllib.request.urlopen(url + "/taper/stats?history=1", timeout=30) as r:
        return json.loads(r.read())["history"]


async def _group(url: str, branches: int, prefix_words: int, tokens: int, tag: str) -> None:
    prompt = f"{tag} " + "the " * prefix_words  # one token per "the " with the tiny tokenizer
    async with aiohttp.ClientSession() as s:
        await generate(s, url, prompt, 1)  # the prefix lands in the radix cache
        await asyncio.gather(*[generate(s, url, prompt + f" branch {i}:", tokens,
                                        {"taper_group": tag, "taper_branch": i,
                                         "taper_width": branches})
                               for i in range(branches)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--out", default="results/cascade_bench.json")
    ns = p.parse_args()
    cases = [(16, 1024), (16, 4096), (64, 1024), (64, 4096)]
    result: dict = {"cases": []}
    times: dict[tuple, dict] = {}
    for mode in ("plain", "cascade"):
        extra = ["--taper-cascade"] if mode == "cascade" else []
        with ServerProcess(["--taper-policy", "eager", "--log-level", "warning", *extra],
                           log_path=Path(f"/tmp/cascade-bench-{mode}.log")) as srv:
            for b, prefix in cases:
                tag = f"{mode}-{b}-{prefix}"
                asyncio.run(_group(srv.url, b, prefix, ns.tokens, tag))
                steps = [h["measured"] for h in _history(srv.url)[-ns.tokens:]
                         if h["kept"] == b]
                times[(b, prefix)] = {**times.get((b, prefix), {}),
                                      mode: statistics.median(steps) if steps else None}
                print(f"{mode:7s} B={b:3d} prefix={prefix}: median decode step "
                      f"{1e3 * times[(b, prefix)][mode]:.2f} ms over {len(steps)} steps",
                      flush=True)
    for (b, prefix), t in times.items():
        result["cases"].append({"branches": b, "prefix_tokens": prefix, **t,
                                "speedup": (t["plain"] / t["cascade"])
                                if t.get("plain") and t.get("cascade") else None})
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["cases"], indent=1))


if __name__ == "__main__":
    main()
