"""Skeleton-of-thought: an outline, then its points expanded in parallel.

serial: outline -> parallel: expand each point -> serial: conclusion.
"""

from __future__ import annotations

import sglang as sgl

from programs.common import commit, gen


@sgl.function
def skeleton_of_thought(s, topic: str, points: int = 4, point_tokens: int = 32,
                        serial_tokens: int = 24):
    s += "Topic: " + topic + "\nOutline:"
    s += gen("outline", serial_tokens)
    s += "\nExpand each point of the outline.\n"
    commit(s)
    branches = s.fork(points)
    for i, b in enumerate(branches):
        b += f"Point {i + 1} in detail:"
        b += gen("body", point_tokens)
    branches.join()
    for i, b in enumerate(branches):
        s += f"\n{i + 1}. " + b["body"]
    s += "\nConclusion:"
    s += gen("conclusion", serial_tokens)
    return {"points": [b["body"] for b in branches], "conclusion": s["conclusion"]}
