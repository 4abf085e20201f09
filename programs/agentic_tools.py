"""Agentic parallel tool calls: plan, fork one branch per tool call, join, answer.

Each branch writes the call's arguments, calls a deterministic local tool
that takes a set time (the model is idle for it, as it would be waiting on a
real API), then reads the result. serial: plan -> parallel: k tool calls ->
serial: answer.
"""

from __future__ import annotations

import hashlib
import time

import sglang as sgl

from programs.common import commit, gen

TOOLS = ("search", "calculator", "weather", "calendar", "database", "maps")


def run_tool(name: str, args: str, delay: float) -> str:
    """A deterministic stand-in tool: the same call gives the same result."""
    time.sleep(delay)
    digest = hashlib.sha256(f"{name}:{args}".encode()).hexdigest()[:12]
    return f"{name} result {digest}"


@sgl.function
def agentic_tools(s, task: str, calls: int = 3, arg_tokens: int = 16, read_tokens: int = 16,
                  serial_tokens: int = 24, tool_delay: float = 0.05):
    s += "Task: " + task + "\nPlan:"
    s += gen("plan", serial_tokens)
    s += "\nCalling tools in parallel.\n"
    commit(s)
    branches = s.fork(calls)
    for i, b in enumerate(branches):
        tool = TOOLS[i % len(TOOLS)]
        b += f"Call {tool} with arguments:"
        b += gen("args", arg_tokens)
        b += "\nResult: " + run_tool(tool, b["args"], tool_delay) + "\nWhat it tells us:"
        b += gen("reading", read_tokens)
    branches.join()
    for i, b in enumerate(branches):
        s += f"\nTool {i + 1}: " + b["reading"]
    s += "\nFinal answer:"
    s += gen("answer", serial_tokens)
    return {"readings": [b["reading"] for b in branches], "answer": s["answer"]}
