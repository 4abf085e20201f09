"""The patched scheduler against the real SGLang server (CPU engine)."""

from __future__ import annotations

import os
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import generate, get_json, post, post_json, wait_idle
from tests.live_suite import assert_same_outputs, run_suite

pytestmark = pytest.mark.live

# SGLang's KV conservation check after every scheduling pass: a leak (or a
# held request it cannot see) fails an assertion inside the scheduler.
STRICT = {**os.environ, "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1"}
POLICIES = ["eager", "off", "cap:2", "taper"]


def server(pool, policy: str, *extra: str, fresh: bool = False):
    # Branches here wait far longer than 16 steps under off and cap:2: the
    # baselines must still never promote (taper alone bounds a wait).
    return pool.get(["--taper-policy", policy, "--taper-max-hold-steps", "16", *extra],
                    env=STRICT, fresh=fresh)


def stats(srv) -> dict:
    return get_json(srv.url + "/taper/stats")


@pytest.fixture(scope="module")
def outputs_by_policy(server_pool) -> dict:
    out = {}
    for policy in POLICIES:
        srv = server(server_pool, policy)
        outputs = run_suite(srv.url)
        # Every client has its answer, but the scheduler may not yet have run the
        # pass that drops the last finished request from its batch.
        wait_idle(srv.url)
        out[policy] = (outputs, stats(srv))
    return out


def test_greedy_outputs_identical_under_every_policy(outputs_by_policy):
    """Texts, token ids and decode logprobs (the critical request and a tagged
    group) bit for bit: a held branch computes exactly what it would have in any
    batch. Without batch-invariant matmuls the logprobs moved by 6e-6 between
    batch sizes."""
    reference = outputs_by_policy["eager"][0]
    for policy in POLICIES[1:]:
        assert_same_outputs(outputs_by_policy[policy][0], reference, f"{policy} vs eager")


def test_regulation_is_real(outputs_by_policy):
    _, eager = outputs_by_policy["eager"]
    _, off = outputs_by_policy["off"]
    _, cap2 = outputs_by_policy["cap:2"]
    _, taper = outputs_by_policy["taper"]
    assert eager["held_branch_steps"] == 0 and eager["max_group_width"] >= 5
    # The width histogram (branches of a group decoding together -> group-steps):
    # never more than one under off, two under cap:2, over runs far past 16 steps.
    assert set(off["group_width_histogram"]) == {"1"} and off["held_branch_steps"] > 0
    assert max(map(int, cap2["group_width_histogram"])) == 2 and cap2["held_branch_steps"] > 0
    assert taper["held_branch_steps"] > 0
    for s in (eager, off, cap2, taper):
        assert s["regulated_steps"] > 0 and s["unsafe_steps"] == 0
        kv = s["kv"]
        assert kv["running_reqs"] == 0 and kv["held_reqs"] == 0
        assert kv["available"] + kv["evictable"] == kv["capacity"] and kv["protected"] == 0


def test_abort_frees_kv_of_running_and_held_branches(server_pool):
    srv = server(server_pool, "off")
    idle = wait_idle(srv.url)
    rids = [f"abort-b{i}" for i in range(4)]
    results: dict[str, dict] = {}

    def branch(i: int) -> None:
        results[rids[i]] = post_json(srv.url + "/generate", {
            "text": "A long shared prefix for the abort test. " * 8, "rid": rids[i],
            "sampling_params": {"max_new_tokens": 4000, "temperature": 0, "ignore_eos": True,
                                "custom_params": {"taper_group": "abort-g", "taper_branch": i,
                                                  "taper_width": 4}}})

    threads = [threading.Thread(target=branch, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    # Held requests rejoin the running batch at the start of every pass (where
    # aborts and stats requests are handled too), so progress shows as steps.
    start = stats(srv)["regulated_steps"]
    deadline = time.monotonic() + 60
    while stats(srv)["regulated_steps"] < start + 30:
        assert time.monotonic() < deadline, "the group never decoded"
        time.sleep(0.05)
    # Abort the held branches first, then the running one.
    for rid in (rids[3], rids[2], rids[1], rids[0]):
        post(srv.url + "/abort_request", {"rid": rid})
    for t in threads:
        t.join(60)
    assert sorted(results) == sorted(rids)
    for r in results.values():
        assert r["meta_info"]["finish_reason"]["type"] == "abort"
    tokens = [results[rid]["meta_info"]["completion_tokens"] for rid in rids]
    # Under `off` branch 0 decoded; 1-3 were held since their prefill token and
    # ran one last step to finish as aborted.
    assert 30 <= tokens[0] < 4000 and all(t <= 2 for t in tokens[1:]), tokens
    kv = wait_idle(srv.url)
    assert kv["available"] + kv["evictable"] == kv["capacity"]
    assert kv["available"] + kv["evictable"] == idle["available"] + idle["evictable"]
    assert srv.proc.poll() is None and generate(srv.url, "still serving")["output_ids"]


def test_a_request_computes_the_same_alone_and_in_a_crowd(server_pool):
    """Batch invariance on the CPU engine: a greedy request's logprobs are bit for
    bit the same whether it decodes alone or beside 12 others (and whether its
    prompt is prefilled whole or hits the radix cache). Without it the float32
    GEMMs moved them by ~6e-6 here."""
    srv = server(server_pool, "off")
    assert get_json(srv.url + "/server_info")["internal_states"][0]["taper"]["batch_invariant"]

    def run(text: str, tokens: int) -> list:
        out = post_json(srv.url + "/generate", {
            "text": text, "return_logprob": True,
            "sampling_params": {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}})
        return out["meta_info"]["output_token_logprobs"]

    probe = "A probe whose numbers must not depend on its neighbours:"
    alone = run(probe, 48)
    crowd = [threading.Thread(target=run, args=(f"Neighbour {i} says " + "more " * i, 240))
             for i in range(12)]
    for t in crowd:
        t.start()
    time.sleep(0.5)
    among = run(probe, 48)
    for t in crowd:
        t.join(120)
    assert among == alone


def _critical_beside_long_prompts(url: str, tpot_slo: float) -> tuple[dict, list[dict]]:
    """A critical request with a feasible TPOT SLO, and long uncached prompts sent
    one after another while it decodes."""
    result = {}

    def critical() -> None:
        result["critical"] = generate(url, "A critical turn beside long prompts:", 240,
                                      custom_params={"taper_tpot": tpot_slo,
                                                     "taper_ttft": 5.0})

    t = threading.Thread(target=critical)
    t.start()
    time.sleep(0.1)
    longs = [generate(url, f"Long prompt {i}: " + "words of context " * 500, 4)
             for i in range(3)]
    t.join(120)
    return result["critical"], longs


def test_taper_defers_a_long_prefill_a_critical_request_cannot_absorb(server_pool):
    """A long prompt's prefill stalls every decoding request. Under taper it waits
    while it would cost a running critical request an SLO that request can still
    meet (its cushion); under eager it runs at once. Outputs are the same and no
    request is lost either way."""
    out = {}
    for policy in ("taper", "eager"):
        # A new server for taper: its prefill predictor learns from exactly the one
        # long prefill below (a kept one's has fitted every earlier test's
        # prefills). eager never asks it.
        srv = server(server_pool, policy, fresh=policy == "taper")
        wait_idle(srv.url)
        # The idle server's TPOT, and one long prefill so the gate has seen one.
        t0 = time.monotonic()
        generate(srv.url, "Alone, for the isolated pace:", 64)
        isolated = (time.monotonic() - t0) / 64
        generate(srv.url, "Warm prefill: " + "other words again " * 500, 2)
        before = stats(srv)
        # 1.5x isolated: feasible alone, but a long stall near its end is not.
        crit, longs = _critical_beside_long_prompts(srv.url, 1.5 * isolated)
        after = stats(srv)
        out[policy] = (crit["output_ids"], [o["output_ids"] for o in longs],
                       after["deferred_prefills"] - before["deferred_prefills"])
        assert crit["meta_info"]["completion_tokens"] == 240
        assert all(o["meta_info"]["completion_tokens"] == 4 for o in longs)
        kv = wait_idle(srv.url)
        assert kv["available"] + kv["evictable"] == kv["capacity"]
    assert out["taper"][2] > 0 and out["eager"][2] == 0
    assert out["taper"][:2] == out["eager"][:2]


@pytest.mark.parametrize("custom, needle", [
    ({"taper_group": 5}, "taper_group"),
    ({"taper_group": "g", "taper_width": 0}, "taper_width"),
    ({"taper_group": "g", "taper_width": 2, "taper_branch": 2}, "taper_branch"),
    ({"taper_tpot": -1.0}, "taper_tpot"),
    ({"taper_bogus": 1}, "unknown TAPER key"),
    ({"taper_branch": 1}, "need taper_group"),
])
def test_bad_metadata_is_a_client_error_and_the_server_keeps_serving(server_pool, custom,
                                                                      needle):
    srv = server(server_pool, "taper")
    with pytest.raises(urllib.error.HTTPError) as err:
        post_json(srv.url + "/generate", {"text": "hi", "sampling_params": {
            "max_new_tokens": 4, "custom_params": custom}})
    assert err.value.code == 400
    assert needle in err.value.read().decode()
    assert generate(srv.url, "still fine", max_new_tokens=4)["meta_info"]["completion_tokens"] == 4


def test_overlap_scheduler_keeps_outputs_identical(server_pool):
    """SGLang's overlap loop lags output and finish state one step; held
    branches must still generate exactly what they would under eager."""
    ref = None
    for policy in ("eager", "off"):
        srv = server(server_pool, policy, "--taper-overlap")
        out = run_suite(srv.url)
        st = stats(srv)
        if ref is None:
            ref = out
        else:
            assert_same_outputs(out, ref, "overlap: off vs eager")
            assert st["held_branch_steps"] > 0 and st["max_group_width"] == 1
