"""Every SGLang interaction the README calls safe, on the live CPU engine, under
`taper` and `cap:2` against `eager`: retraction, pause/continue and cache
flushes, frequency/presence penalties, grammar-constrained branches, returned
hidden states, sessions (streaming and non-streaming) and the overlap loop.

Branches are hand-tagged `/generate` requests with a distinct prompt each, sent
concurrently beside a latency-critical ordinary request whose TPOT SLO
(1 ms) cannot be met, so that `taper` holds branches, as `cap:2` does. Distinct
prompts give distinct greedy outputs: if every branch produced the same tokens, a
held branch that received a sibling's token or KV slot would go unnoticed.

A module-scoped fixture per server configuration starts one server per policy,
runs all of that configuration's workloads, and keeps outputs, counters and
checks; the tests then assert on them. Each policy runs with SGLang's per-pass
KV conservation check (`SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY=1`), which
fails an assertion inside the scheduler on a leak.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from tests.conftest import LOG_DIR, generate, get_json, post, post_json, server_log, wait_idle

# Each configuration's fixture starts three servers and runs every workload on
# them inside the first test that asks for it: far past the default 900 s here.
pytestmark = [pytest.mark.live, pytest.mark.timeout(2400)]

STRICT = {**os.environ, "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1"}
POLICIES = ("eager", "taper", "cap:2")
REGULATING = ("taper", "cap:2")
CRITICAL = {"taper_tpot": 0.001}  # seconds: never met, so taper holds whatever it may
# Retraction every 7th scheduling pass (SGLang's `forward_ct % INTERVAL == 0` in
# update_running_batch): retract_decode then retracts at least one request, the
# one with the fewest output tokens first. TAPER decides at check_decode_mem, so
# the held part is parked when that happens: a kept branch is retracted, and the
# held part rejoins when prepare_for_decode decides again on the smaller batch;
# held branches are retracted in later passes, once admitted. 7 keeps the run
# progressing (each retraction re-prefills the request, output included).
RETRACT_ENV = {"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "7"}


# ------------------------------------------------------------------ requests


def _tag(group: str, branch: int, width: int) -> dict:
    return {"taper_group": group, "taper_branch": branch, "taper_width": width}


def _gen(url: str, text: str, max_new: int, custom: dict | None = None,
         body: dict | None = None, **sp) -> dict:
    params = {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True, **sp}
    if custom is not None:
        params["custom_params"] = custom
    return post_json(url + "/generate", {"text": text, "sampling_params": params,
                                         **(body or {})}, timeout=600)


def _status(url: str, path: str, payload: dict | None = None) -> int:
    """POST and return the HTTP status (flush_cache answers 400 when it refuses)."""
    try:
        post(url + path, payload or {}, timeout=120)
        return 200
    except urllib.error.HTTPError as e:
        return e.code


def _open_session(url: str, streaming: bool) -> str:
    body = {"capacity_of_str_len": 65536, "streaming": streaming}
    return json.loads(post(url + "/open_session", body))


def _concurrently(jobs: dict) -> dict:
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(fn) for name, fn in jobs.items()}
        return {name: f.result(timeout=600) for name, f in futures.items()}


def _group_jobs(url: str, group: str, prompts: list[str], max_new: int | list[int],
                sp: list[dict] | None = None, body: list[dict] | None = None) -> dict:
    """One job per branch, keyed `group.i`, each with its own prompt."""
    width = len(prompts)
    lens = max_new if isinstance(max_new, list) else [max_new] * width

    def job(i: int):
        return lambda: _gen(url, prompts[i], lens[i], _tag(group, i, width),
                            (body or [{}] * width)[i], **(sp or [{}] * width)[i])

    return {f"{group}.{i}": job(i) for i in range(width)}


def _critical_job(url: str, name: str, max_new: int = 120):
    return lambda: _gen(url, f"A latency-critical chat turn beside {name}:", max_new, CRITICAL)


def _ids(results: dict) -> dict:
    return {k: v["output_ids"] for k, v in results.items()}


def _prompts(name: str, n: int) -> list[str]:
    return [f"{name} branch {i}: " + "a distinct line of thought " * (1 + i % 3) + str(i)
            for i in range(n)]


# ---------------------------------------------------------------- workloads
# Each returns (outputs: key -> token ids, observations: dict).


def w_plain(url: str) -> tuple[dict, dict]:
    jobs = {**_group_jobs(url, "plainA", _prompts("plainA", 4), 48),
            **_group_jobs(url, "plainB", _prompts("plainB", 3), 40),
            "critical": _critical_job(url, "plain")}
    return _ids(_concurrently(jobs)), {}


def w_penalty(url: str) -> tuple[dict, dict]:
    """Penalized branches make a step unsafe to split (one penalizer orchestrator
    per batch): such steps run whole. The penalized group is short, so that the
    plain group is regulated once it is gone."""
    pen = [{"frequency_penalty": 0.9}, {"presence_penalty": 0.7},
           {"frequency_penalty": 0.4, "presence_penalty": 0.4}, {}]
    jobs = {**_group_jobs(url, "penA", _prompts("penA", 4), 24, sp=pen),
            **_group_jobs(url, "penB", _prompts("penB", 4), 72),
            "critical": _critical_job(url, "penalty")}
    return _ids(_concurrently(jobs)), {}


SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"},
                                           "note": {"type": "string", "maxLength": 12}},
          "required": ["answer", "note"]}


def w_grammar(url: str) -> tuple[dict, dict]:
    """Grammar-constrained branches are pinned (they must run every step); their
    unconstrained siblings may be held."""
    sp = [{"json_schema": json.dumps(SCHEMA)}, {"regex": "[a-z]{4,30}"},
          {"regex": "(yes|no|maybe), because [a-z ]{4,40}"}, {}, {}]
    jobs = {**_group_jobs(url, "gram", _prompts("gram", 5), 40, sp=sp),
            "critical": _critical_job(url, "grammar", 100)}
    results = _concurrently(jobs)
    texts = {k: v["text"] for k, v in results.items()}
    return _ids(results), {"texts": texts}


def w_hidden(url: str) -> tuple[dict, dict]:
    """return_hidden_states on some branches: one hidden state per output token,
    whether or not the branch was held at some step."""
    body = [{"return_hidden_states": True}] * 2 + [{}] * 2
    jobs = {**_group_jobs(url, "hid", _prompts("hid", 4), 40, body=body),
            "critical": _critical_job(url, "hidden", 100)}
    results = _concurrently(jobs)
    hidden = {k: v["meta_info"].get("hidden_states") for k, v in results.items()
              if k in ("hid.0", "hid.1")}
    return _ids(results), {"hidden": hidden}


def w_sessions(url: str) -> tuple[dict, dict]:
    """Streaming sessions (one per branch, two turns, each turn a tagged group:
    turn 2 runs on the KV record turn 1 left in its session) and a non-streaming
    session whose root turn branches into a tagged group of children."""
    width = 3
    streams = [_open_session(url, True) for _ in range(width)]
    out = {}
    for turn in (1, 2):
        prompts = [f"Session {i}, turn {turn}: " + "say more " * (i + 1) for i in range(width)]
        jobs = _group_jobs(url, f"stream{turn}", prompts, 40,
                           body=[{"session_params": {"id": sid}} for sid in streams])
        jobs["critical"] = _critical_job(url, f"stream turn {turn}", 80)
        res = _ids(_concurrently(jobs))
        out.update({k: v for k, v in res.items() if k != "critical"})
        out[f"critical{turn}"] = res["critical"]
    tree = _open_session(url, False)
    root = _gen(url, "The root turn of a non-streaming session.", 8,
                body={"rid": f"root-{tree}", "session_params": {"id": tree}})
    out["tree.root"] = root["output_ids"]
    kids = [f"Child {i} continues the root " + "differently " * (i + 1) for i in range(4)]
    jobs = _group_jobs(url, "tree", kids, 40,
                       body=[{"session_params": {"id": tree, "rid": f"root-{tree}"}}] * 4)
    jobs["critical"] = _critical_job(url, "tree", 80)
    res = _ids(_concurrently(jobs))
    out.update({k: v for k, v in res.items() if k != "critical"})
    out["critical3"] = res["critical"]
    for sid in (*streams, tree):
        post(url + "/close_session", {"session_id": sid})
    return out, {}


def _steps(url: str) -> int:
    return get_json(url + "/taper/stats")["steps"]


def _wait_steps(url: str, n: int, timeout: float = 120.0) -> None:
    target = _steps(url) + n
    deadline = time.monotonic() + timeout
    while _steps(url) < target:
        assert time.monotonic() < deadline, f"fewer than {n} decode steps in {timeout} s"
        time.sleep(0.05)


def w_pause(url: str) -> tuple[dict, dict]:
    """Mid-run: pause in place (no step runs; a flush is refused: requests are
    running), continue, pause with retraction (every request goes back to the
    waiting queue and its KV is freed; SGLang then allows a flush), continue.
    A flush attempted while busy is refused; one with a timeout waits for idle."""
    obs: dict = {}
    jobs = {**_group_jobs(url, "pause", _prompts("pause", 4), 150),
            "critical": _critical_job(url, "pause", 150)}
    with ThreadPoolExecutor(len(jobs) + 1) as pool:
        futures = {name: pool.submit(fn) for name, fn in jobs.items()}
        _wait_steps(url, 15)
        obs["flush_busy"] = _status(url, "/flush_cache")
        _wait_steps(url, 5)
        post_json(url + "/pause_generation", {"mode": "in_place"})
        s1 = get_json(url + "/taper/stats")
        time.sleep(0.6)
        s2 = get_json(url + "/taper/stats")
        obs["in_place_stalled"] = s2["steps"] == s1["steps"]
        obs["in_place_held_last_step"] = s1["kv"]["last_step_held"]
        obs["in_place_running"] = s2["kv"]["running_reqs"]
        obs["flush_in_place"] = _status(url, "/flush_cache")
        post_json(url + "/continue_generation", {"torch_empty_cache": False})
        _wait_steps(url, 20)
        post_json(url + "/pause_generation", {"mode": "retract"})
        s3 = get_json(url + "/taper/stats")
        obs["retract_held_last_step"] = s3["kv"]["last_step_held"]
        obs["retract_kv"] = s3["kv"]
        obs["flush_retract"] = _status(url, "/flush_cache")
        post_json(url + "/continue_generation", {"torch_empty_cache": False})
        _wait_steps(url, 10)
        # Deferred flush: fires at the first fully idle pass, after every request.
        deferred = pool.submit(_status, url, "/flush_cache?timeout=300")
        results = {name: f.result(timeout=600) for name, f in futures.items()}
        obs["flush_deferred"] = deferred.result(timeout=600)
    obs["kv_after_deferred_flush"] = get_json(url + "/taper/stats")["kv"]
    return _ids(results), obs


def w_flush_idle(url: str) -> tuple[dict, dict]:
    """A flush at idle empties the radix cache; the next group still computes
    the same (its prompts now miss the cache)."""
    code = _status(url, "/flush_cache")
    kv = get_json(url + "/taper/stats")["kv"]
    jobs = {**_group_jobs(url, "afterflush", _prompts("afterflush", 3), 32),
            "critical": _critical_job(url, "after flush", 60)}
    return _ids(_concurrently(jobs)), {"flush_idle": code, "kv_after_flush": kv}


# Sessions last: a scheduler crash there would cost the workloads after it.
BASE_WORKLOADS = {"plain": w_plain, "penalty": w_penalty, "grammar": w_grammar,
                  "hidden": w_hidden, "pause": w_pause, "flush_idle": w_flush_idle,
                  "sessions": w_sessions}
RETRACT_WORKLOADS = {"retract_plain": w_plain, "retract_penalty": w_penalty,
                     "retract_grammar": w_grammar, "retract_sessions": w_sessions}
OVERLAP_WORKLOADS = {"overlap_plain": w_plain, "overlap_penalty": w_penalty,
                     "overlap_grammar": w_grammar, "overlap_hidden": w_hidden,
                     "overlap_pause": w_pause, "overlap_sessions": w_sessions}


# ------------------------------------------------------------------ running


@dataclass
class PolicyRun:
    outputs: dict = field(default_factory=dict)  # workload -> key -> token ids
    obs: dict = field(default_factory=dict)  # workload -> observations
    deltas: dict = field(default_factory=dict)  # workload -> counter -> increase
    errors: dict = field(default_factory=dict)  # workload -> exception text
    seconds: dict = field(default_factory=dict)  # workload -> wall seconds
    final_kv: dict | None = None
    final_stats: dict | None = None
    tracebacks: list = field(default_factory=list)  # log lines
    serving: bool = False
    log: str = ""
    start_s: float | None = None


COUNTERS = ("steps", "regulated_steps", "unsafe_steps", "held_branch_steps", "branch_steps")


def _tracebacks(srv) -> list[str]:
    """Tracebacks in the server's log since this policy's run began."""
    try:
        lines = server_log(srv).splitlines()
    except OSError:
        return ["(no log)"]
    return [f"{i}: " + "\n".join(lines[i:i + 30]) for i, line in enumerate(lines)
            if "Traceback" in line]


def _run_policy(pool, policy: str, extra: list[str], env: dict, workloads: dict) -> PolicyRun:
    run = PolicyRun()
    args = ["--taper-policy", policy, "--taper-max-hold-steps", "16", *extra]
    try:
        srv = pool.get(args, env={**STRICT, **env})
    except RuntimeError:  # e.g. another process took the free port before the bind
        srv = pool.get(args, env={**STRICT, **env})
    run.log, run.start_s = str(srv.log_path), srv.start_seconds
    for name, fn in workloads.items():
        t0 = time.monotonic()
        try:
            before = get_json(srv.url + "/taper/stats")
            run.outputs[name], run.obs[name] = fn(srv.url)
            wait_idle(srv.url, strict=False)
            after = get_json(srv.url + "/taper/stats")
            run.deltas[name] = {k: after[k] - before[k] for k in COUNTERS}
        except Exception as e:  # keep going: the other workloads still tell something
            run.errors[name] = f"{type(e).__name__}: {e}"
            if srv.proc.poll() is not None:
                run.errors[name] += f" (server exited with {srv.proc.returncode})"
                break
        run.seconds[name] = time.monotonic() - t0
    if srv.proc.poll() is None:
        try:
            run.final_kv = wait_idle(srv.url, strict=False)
            run.final_stats = get_json(srv.url + "/taper/stats")
            out = generate(srv.url, "Still serving after the interactions?", 8)
            run.serving = out["meta_info"]["completion_tokens"] == 8
        except Exception as e:
            run.errors["final"] = f"{type(e).__name__}: {e}"
    run.tracebacks = _tracebacks(srv)
    return run


def _run_config(pool, label: str, extra: list[str], env: dict, workloads: dict) -> dict:
    runs = {p: _run_policy(pool, p, extra, env, workloads) for p in POLICIES}
    # The raw results beside the server logs, for diagnosing a failure.
    dump = {p: {k: v for k, v in vars(r).items() if k != "obs"} for p, r in runs.items()}
    for p, r in runs.items():
        dump[p]["obs"] = {w: {k: v for k, v in o.items() if k != "hidden"}
                          for w, o in r.obs.items()}
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    (LOG_DIR / f"interactions-{label}.json").write_text(json.dumps(dump, indent=1))
    return runs


@pytest.fixture(scope="module")
def base_runs(server_pool) -> dict:
    return _run_config(server_pool, "base", ["--enable-return-hidden-states",
                                     "--enable-streaming-session"], {}, BASE_WORKLOADS)


@pytest.fixture(scope="module")
def retract_runs(server_pool) -> dict:
    return _run_config(server_pool, "retract", ["--enable-streaming-session"], RETRACT_ENV,
                       RETRACT_WORKLOADS)


@pytest.fixture(scope="module")
def overlap_runs(server_pool) -> dict:
    return _run_config(server_pool, "overlap", ["--taper-overlap",
                                                "--enable-return-hidden-states",
                                                "--enable-streaming-session"], {},
                       OVERLAP_WORKLOADS)


# ---------------------------------------------------------------- checks


def output_diff(got: dict, ref: dict) -> list[str]:
    """Keys whose token ids differ, with the first differing index."""
    diffs = []
    for key in sorted(set(ref) | set(got)):
        a, b = got.get(key), ref.get(key)
        if a == b:
            continue
        if a is None or b is None:
            diffs.append(f"{key}: missing")
            continue
        i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        diffs.append(f"{key}: first difference at token {i} ({a[i:i + 4]} vs {b[i:i + 4]}, "
                     f"lengths {len(a)} vs {len(b)})")
    return diffs


def same_outputs_within_groups(outputs: dict) -> list[tuple[str, str]]:
    """Pairs of branches of one group with equal outputs (they must differ)."""
    by_group: dict[str, list[str]] = {}
    for key in outputs:
        if "." in key:
            by_group.setdefault(key.rsplit(".", 1)[0], []).append(key)
    pairs = []
    for keys in by_group.values():
        for i, a in enumerate(keys):
            pairs += [(a, b) for b in keys[i + 1:] if outputs[a] == outputs[b]]
    return pairs


def _check_outputs(runs: dict, workload: str) -> None:
    ref = runs["eager"]
    assert workload not in ref.errors, f"eager: {ref.errors[workload]}"
    assert not same_outputs_within_groups(ref.outputs[workload]), (
        f"{workload}: branches with equal outputs would hide a swap")
    problems = []
    for policy in REGULATING:
        run = runs[policy]
        if workload in run.errors:
            problems.append(f"{policy}: {run.errors[workload]}")
            continue
        diff = output_diff(run.outputs[workload], ref.outputs[workload])
        if diff:
            problems.append(f"{policy} vs eager: " + "; ".join(diff))
        if run.deltas[workload]["held_branch_steps"] <= 0:
            problems.append(f"{policy}: no branch was held ({run.deltas[workload]})")
    assert not problems, f"{workload}: " + " | ".join(problems)


def _check_health(runs: dict) -> None:
    problems = []
    for policy, run in runs.items():
        if run.tracebacks:
            problems.append(f"{policy}: Traceback in {run.log}:\n{run.tracebacks[0]}")
        if not run.serving:
            problems.append(f"{policy}: not serving at the end ({run.errors}); log {run.log}")
            continue
        kv = run.final_kv
        if not (kv["available"] + kv["evictable"] == kv["capacity"]
                and kv["running_reqs"] == 0 and kv["held_reqs"] == 0 and kv["protected"] == 0):
            problems.append(f"{policy}: KV not conserved at idle: {kv}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ tests


def test_the_comparison_notices_a_swapped_or_changed_branch(base_runs):
    """The checks below can fail: a swap of two branches' outputs, or one changed
    token, is reported."""
    ref = base_runs["eager"].outputs["plain"]
    swapped = {**ref, "plainA.1": ref["plainA.2"], "plainA.2": ref["plainA.1"]}
    assert len(output_diff(swapped, ref)) == 2
    changed = {**ref, "plainB.0": [*ref["plainB.0"][:-1], ref["plainB.0"][-1] + 1]}
    diff = output_diff(changed, ref)
    assert len(diff) == 1 and diff[0].startswith("plainB.0: first difference at token 39")
    assert not same_outputs_within_groups(ref)
    assert same_outputs_within_groups({**ref, "plainA.3": ref["plainA.0"]})


@pytest.mark.parametrize("workload", ["plain", "penalty", "grammar", "hidden", "sessions",
                                      "pause", "flush_idle"])
def test_outputs_identical_and_branches_held(base_runs, workload):
    _check_outputs(base_runs, workload)


def test_base_server_healthy_and_kv_conserved(base_runs):
    _check_health(base_runs)


def test_penalized_steps_run_whole(base_runs):
    """Steps with an active frequency/presence penalty are counted unsafe under
    every policy; without one in the batch the plain group is regulated."""
    for policy in POLICIES:
        d = base_runs[policy].deltas.get("penalty")
        assert d is not None, base_runs[policy].errors
        assert d["unsafe_steps"] > 0, (policy, d)
    for policy in REGULATING:
        assert base_runs[policy].deltas["penalty"]["held_branch_steps"] > 0


def test_grammar_outputs_follow_their_grammar(base_runs):
    texts = base_runs["eager"].obs["grammar"]["texts"]
    assert re.fullmatch("[a-z]{4,30}", texts["gram.1"]), texts["gram.1"]
    assert re.fullmatch("(yes|no|maybe), because [a-z ]{4,40}", texts["gram.2"]), texts
    # The JSON branch may be cut by max_new_tokens; it must start as the schema says.
    assert texts["gram.0"].lstrip().startswith("{"), texts["gram.0"]


def test_hidden_states_identical(base_runs):
    """One hidden state per output token, and the same numbers, held or not.

    The first entry holds the prompt positions SGLang computed in the prefill,
    i.e. those not found in the radix cache: how many depends on which sibling
    prefilled first, so only its last position (the one that produced the first
    token) is compared; every later entry is one decode step's vector."""
    ref = base_runs["eager"].obs["hidden"]["hidden"]
    for key, states in ref.items():
        assert states is not None and len(states) == 40, (key, None if states is None
                                                          else len(states))
    for policy in REGULATING:
        got = base_runs[policy].obs.get("hidden", {}).get("hidden")
        assert got is not None, base_runs[policy].errors
        for key in ref:
            assert len(got[key]) == len(ref[key]), (policy, key)
            a = _flat([got[key][0][-1], *got[key][1:]])
            b = _flat([ref[key][0][-1], *ref[key][1:]])
            assert len(a) == len(b) > 0, (policy, key)
            worst = max(abs(x - y) for x, y in zip(a, b))
            assert worst == 0.0, f"{policy} {key}: hidden states differ by {worst:.2e}"


def _flat(x) -> list[float]:
    if isinstance(x, list):
        return [v for item in x for v in _flat(item)]
    return [x]


def test_pause_and_flush(base_runs):
    problems = []
    for policy in POLICIES:
        run = base_runs[policy]
        obs = run.obs.get("pause")
        if obs is None:
            problems.append(f"{policy}: {run.errors.get('pause')}")
            continue
        expect = {"flush_busy": 400, "flush_in_place": 400, "flush_retract": 200,
                  "flush_deferred": 200, "in_place_stalled": True}
        got = {k: obs[k] for k in expect}
        if got != expect:
            problems.append(f"{policy}: {got} != {expect}")
        if obs["in_place_running"] == 0:
            problems.append(f"{policy}: nothing running during the in-place pause")
        kv = obs["retract_kv"]  # every request retracted: no KV owned by a request
        if kv["running_reqs"] != 0 or kv["held_reqs"] != 0:
            problems.append(f"{policy}: after a retracting pause {kv}")
        kv = obs["kv_after_deferred_flush"]
        if not (kv["available"] == kv["capacity"] and kv["evictable"] == 0):
            problems.append(f"{policy}: after the deferred flush {kv}")
        idle = run.obs.get("flush_idle")
        if idle is None or idle["flush_idle"] != 200 or (
                idle["kv_after_flush"]["available"] != idle["kv_after_flush"]["capacity"]):
            problems.append(f"{policy}: idle flush {idle}")
    # cap:2 holds two of the four branches at every step: the pauses hit held ones.
    cap = base_runs["cap:2"].obs.get("pause") or {}
    if not (cap.get("in_place_held_last_step", 0) > 0 and cap.get("retract_held_last_step", 0) > 0):
        problems.append(f"cap:2: pauses did not find held branches: {cap}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("workload", list(RETRACT_WORKLOADS))
def test_retraction_outputs_identical_and_branches_held(retract_runs, workload):
    _check_outputs(retract_runs, workload)


def test_retraction_really_happened_and_server_healthy(retract_runs):
    for policy, run in retract_runs.items():
        with open(run.log, errors="replace") as f:
            n = len(re.findall(r"Testing retraction\. #retracted_reqs: [1-9]", f.read()))
        assert n > 10, f"{policy}: only {n} test retractions in {run.log}"
    _check_health(retract_runs)


@pytest.mark.parametrize("workload", list(OVERLAP_WORKLOADS))
def test_overlap_outputs_identical_and_branches_held(overlap_runs, workload):
    _check_outputs(overlap_runs, workload)


def test_overlap_server_healthy_and_kv_conserved(overlap_runs):
    _check_health(overlap_runs)
    for policy in POLICIES:
        obs = overlap_runs[policy].obs.get("overlap_pause")
        assert obs is not None, overlap_runs[policy].errors
        assert (obs["flush_busy"], obs["flush_in_place"], obs["flush_retract"],
                obs["flush_deferred"]) == (400, 400, 200, 200), (policy, obs)
