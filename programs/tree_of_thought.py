"""Breadth-limited tree-of-thought: at each level, fork `breadth` children from
the path kept so far, score them, keep the best and extend the path with it
(beam width 1). Each level is one branch group; `nested_fork` below forks
inside branches, for two levels of groups at once.
"""

from __future__ import annotations

import hashlib

import sglang as sgl

from programs.common import commit, gen


def score(text: str) -> int:
    """A deterministic stand-in for a value model."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


@sgl.function
def tree_of_thought(s, problem: str, depth: int = 2, breadth: int = 3, step_tokens: int = 16,
                    serial_tokens: int = 16):
    s += "Problem: " + problem + "\nFirst idea:"
    s += gen("root", serial_tokens)
    commit(s)
    chosen: list[str] = []
    for level in range(depth):
        kids = s.fork(breadth)
        for i, k in enumerate(kids):
            k += f"\nStep {level + 1}, option {i + 1}:"
            k += gen("step", step_tokens)
        kids.join()
        best = max(range(breadth), key=lambda i: score(kids[i]["step"]))
        chosen.append(kids[best]["step"])
        s += f"\nStep {level + 1}:" + chosen[-1]
        commit(s)  # the next level forks from the extended path
    s += "\nSolution:"
    s += gen("solution", serial_tokens)
    return {"path": chosen, "solution": s["solution"]}


@sgl.function
def nested_fork(s, question: str, outer: int = 2, inner: int = 3, tokens: int = 12):
    """Every outer branch forks `inner` branches of its own (two levels of groups)."""
    s += "Question: " + question + "\n"
    commit(s)
    outs = s.fork(outer)
    for i, o in enumerate(outs):
        o += f"Direction {i}:"
        o += gen("direction", tokens)
        o.text()
        ins = o.fork(inner)
        for j, x in enumerate(ins):
            x += f" detail {j}:"
            x += gen("detail", tokens)
        ins.join()
        o += " details: " + " | ".join(x["detail"] for x in ins)
    outs.join()
    return [[o["direction"], o.text()[-200:]] for o in outs]
