"""Parallel reasoning with aggregation: map over k thought paths, reduce.

serial: restate the question -> parallel: k thought paths -> serial: aggregate.
"""

from __future__ import annotations

import sglang as sgl

from programs.common import commit, gen


@sgl.function
def parallel_reasoning(s, question: str, width: int = 4, path_tokens: int = 32,
                       serial_tokens: int = 16):
    s += "Question: " + question + "\nRestate the question:"
    s += gen("restated", serial_tokens)
    s += "\nNow reason along several independent paths.\n"
    commit(s)
    paths = s.fork(width)
    for i, p in enumerate(paths):
        p += f"Path {i + 1}:"
        p += gen("thought", path_tokens)
    paths.join()
    for i, p in enumerate(paths):
        s += f"\nPath {i + 1} concluded: " + p["thought"]
    s += "\nCombining the paths, the answer is:"
    s += gen("answer", serial_tokens)
    return {"paths": [p["thought"] for p in paths], "answer": s["answer"]}
