"""Helpers shared by the fork programs."""

from __future__ import annotations

import sglang as sgl


def gen(name: str, tokens: int, temperature: float = 0.0):
    """A generation of exactly `tokens` tokens (ignore_eos: the tiny random model
    would otherwise stop anywhere), greedy by default."""
    return sgl.gen(name, max_tokens=tokens, temperature=temperature, ignore_eos=True)


def commit(s) -> None:
    """Make the text so far land before a fork, so branches hit the radix cache
    (a fork issued before the worker appended the prompt skips the prefix warm-up)."""
    s.text()
