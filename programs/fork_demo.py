"""The smallest fork program: a shared question, k thought paths, a join.

Used by the foundation tests and `taper demo`; the richer programs
(reasoning, self-consistency, skeleton-of-thought, tools, tree-of-thought)
live beside it.
"""

from __future__ import annotations

import sglang as sgl


@sgl.function
def fork_demo(s, question: str, width: int = 4, branch_tokens: int = 16):
    # Long enough a prefix that its reuse by the branches is plain to see.
    s += "Question: " + question + "\n" + "Think step by step, in parallel paths.\n" * 4
    s.text()  # make the prefix land before the fork, so branches hit the radix cache
    paths = s.fork(width)
    for i, p in enumerate(paths):
        p += f"Path {i}:"
        p += sgl.gen("thought", max_tokens=branch_tokens, temperature=0, ignore_eos=True)
    s += "Summary of the paths:"
    s += sgl.gen("summary", max_tokens=branch_tokens, temperature=0, ignore_eos=True)
    return [(p["thought"], p.get_meta_info("thought")) for p in paths]
