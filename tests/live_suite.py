"""A mixed set of branch workloads run against a live server, for comparing
outputs across policies: every fork program, nested forks, n>1 on /generate
and on the OpenAI-compatible endpoints, all at once, beside a latency-critical
request with a very tight TPOT SLO (so that `taper` has reason to hold)."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from tests.conftest import post_json


def _programs(url: str) -> dict:
    from programs.agentic_tools import agentic_tools
    from programs.parallel_reasoning import parallel_reasoning
    from programs.self_consistency import self_consistency
    from programs.skeleton_of_thought import skeleton_of_thought
    from programs.tree_of_thought import nested_fork, tree_of_thought
    from sglang_taper import TaperEndpoint

    be = TaperEndpoint(url)
    return {
        "parallel_reasoning": lambda: parallel_reasoning.run(question="q", width=5, backend=be),
        "self_consistency": lambda: self_consistency.run(problem="p", width=4, backend=be),
        "skeleton_of_thought": lambda: skeleton_of_thought.run(topic="t", points=3, backend=be),
        "agentic_tools": lambda: agentic_tools.run(task="x", calls=3, backend=be),
        "tree_of_thought": lambda: tree_of_thought.run(problem="y", depth=2, breadth=3,
                                                       backend=be),
        "nested_fork": lambda: nested_fork.run(question="z", outer=2, inner=3, backend=be),
    }


def _n_generate(url: str) -> list:
    out = post_json(url + "/generate", {
        "text": "Sample several continuations of this shared prompt:",
        "sampling_params": {"n": 4, "max_new_tokens": 24, "temperature": 0,
                            "ignore_eos": True},
    })
    return sorted(o["output_ids"] for o in out)


def _openai(url: str, path: str, body: dict) -> list:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        choices = json.loads(r.read())["choices"]
    return sorted(c.get("text") or c["message"]["content"] for c in choices)


def _logprobs(out: dict) -> dict:
    """Token ids, and the logprobs of the tokens sampled in decode steps, to be
    compared bit for bit: equal tokens can hide a numerical difference that would
    flip a near-tie on another prompt.

    The first token's logprob is left out: it comes from a prefill batch, and
    when that batch holds a non-greedy request (a prefix warm-up with default
    sampling params, from SGLang's n>1 handling, a program's prefix commit or
    another client) SGLang reports log(softmax) instead of log_softmax, which
    differs in the last bits (the token does not). Decode batches are all-greedy
    again once such a request has left (sglang_taper/adapter/greedy.py)."""
    rows = out["meta_info"]["output_token_logprobs"]
    return {"tokens": [tok for _, tok, _ in rows], "decode_logprobs": [lp for lp, _, _ in rows[1:]]}


def _critical(url: str) -> list:
    out = post_json(url + "/generate", {
        "text": "A latency-critical chat turn:", "return_logprob": True,
        "sampling_params": {"max_new_tokens": 160, "temperature": 0, "ignore_eos": True,
                            "custom_params": {"taper_tpot": 0.001}},
    })
    return _logprobs(out)


def _group_logprobs(url: str, width: int = 4) -> list:
    """A hand-tagged branch group whose members the policies hold and release."""
    def branch(i: int) -> list:
        out = post_json(url + "/generate", {
            "text": f"Branch {i} of a tagged group, sharing this prefix.",
            "return_logprob": True,
            "sampling_params": {"max_new_tokens": 64, "temperature": 0, "ignore_eos": True,
                                "custom_params": {"taper_group": f"lp-{url}", "taper_branch": i,
                                                  "taper_width": width}}})
        return _logprobs(out)

    with ThreadPoolExecutor(width) as pool:
        return list(pool.map(branch, range(width)))


def split_logprobs(out: dict) -> tuple[dict, list[float]]:
    """The suite's outputs without the decode logprobs, and those logprobs flat
    (for comparing two numerically different kernels: same tokens, close numbers)."""
    rest, logprobs = {}, []
    for name, value in out.items():
        items = value if isinstance(value, list) else [value]
        if items and isinstance(items[0], dict) and "decode_logprobs" in items[0]:
            rest[name] = [v["tokens"] for v in items]
            for v in items:
                logprobs += v["decode_logprobs"]
        else:
            rest[name] = value
    return rest, logprobs


def assert_same_outputs(got: dict, ref: dict, label: str, tol: float = 0.0) -> None:
    """Texts and tokens exactly; decode logprobs within `tol` (0: bit for bit)."""
    got_rest, got_lp = split_logprobs(got)
    ref_rest, ref_lp = split_logprobs(ref)
    for name in ref_rest:
        assert got_rest[name] == ref_rest[name], f"{label}: {name} differs"
    assert len(got_lp) == len(ref_lp) > 0
    worst = max(abs(a - b) for a, b in zip(got_lp, ref_lp))
    assert worst <= tol, f"{label}: decode logprobs differ by {worst:.2e}"


def run_suite(url: str) -> dict:
    jobs = {name: fn for name, fn in _programs(url).items()}
    jobs["n_generate"] = lambda: _n_generate(url)
    jobs["openai_completions"] = lambda: _openai(url, "/v1/completions", {
        "model": "default", "prompt": "Complete in three ways:", "n": 3, "max_tokens": 20,
        "temperature": 0, "ignore_eos": True})
    jobs["openai_chat"] = lambda: _openai(url, "/v1/chat/completions", {
        "model": "default", "messages": [{"role": "user", "content": "Answer twice."}],
        "n": 2, "max_tokens": 20, "temperature": 0, "ignore_eos": True})
    jobs["critical"] = lambda: _critical(url)
    jobs["group_logprobs"] = lambda: _group_logprobs(url)
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(fn) for name, fn in jobs.items()}
        results = {name: f.result(timeout=600) for name, f in futures.items()}
    out = {name: (r.ret_value if hasattr(r, "ret_value") else r) for name, r in results.items()}
    missing = [name for name, v in out.items() if not v]
    assert not missing, f"no output from {missing}"
    return out
