"""Self-consistency: k sampled answers, then a vote.

serial: read the problem -> parallel: k answers -> local majority vote ->
serial: justify the chosen answer.
"""

from __future__ import annotations

from collections import Counter

import sglang as sgl

from programs.common import commit, gen


def vote(answers: list[str]) -> str:
    """Majority over the first word of each answer; ties go to the earliest."""
    keys = [(a.split() or [""])[0] for a in answers]
    counts = Counter(keys)
    return max(keys, key=lambda k: (counts[k], -keys.index(k)))


@sgl.function
def self_consistency(s, problem: str, width: int = 5, answer_tokens: int = 24,
                     serial_tokens: int = 16, temperature: float = 0.0):
    s += "Problem: " + problem + "\nKey facts:"
    s += gen("facts", serial_tokens)
    s += "\nAnswer:"
    commit(s)
    samples = s.fork(width)
    for sample in samples:
        sample += gen("answer", answer_tokens, temperature)
    samples.join()
    answers = [x["answer"] for x in samples]
    winner = vote(answers)
    s += f" {winner}\nWhy:"
    s += gen("why", serial_tokens)
    return {"answers": answers, "vote": winner, "why": s["why"]}
