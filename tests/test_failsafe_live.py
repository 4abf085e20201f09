"""The fail-safe, live: an error in TAPER's scheduler code never takes SGLang
down. Faults are injected on purpose (TAPER's code raises at POINT from its
N-th call on: TAPER_INJECT_FAULT=POINT@N at launch, or POST /taper/fault on a
server launched with TAPER_INJECT_FAULT=later); the server must keep serving,
produce exactly eager's outputs, say `degraded` with the reason, log the
traceback once, and give all KV back. POST /taper/rearm then regulates again
on the same server, which is how one server serves every fault here."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import generate, get_json, post_json, server_log, wait_idle

pytestmark = pytest.mark.live

STRICT = {**os.environ, "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1"}
WIDTH = 4


def _workload(url: str, tag: str) -> dict:
    """A tagged group with distinct prompts (so a branch given a sibling's token
    or KV would show) beside a critical request, run twice so that a fault
    injected mid-run falls between the two."""
    def branch(i: int) -> list:
        out = post_json(url + "/generate", {
            "text": f"Branch {i} thinks about topic number {7 * i + 3} in its own words.",
            "sampling_params": {"max_new_tokens": 48, "temperature": 0, "ignore_eos": True,
                                "custom_params": {"taper_group": f"{tag}-g", "taper_branch": i,
                                                  "taper_width": WIDTH}}})
        return out["output_ids"]

    def critical() -> list:
        return generate(url, "A critical turn beside the group:", 64,
                        custom_params={"taper_tpot": 0.001})["output_ids"]

    with ThreadPoolExecutor(WIDTH + 1) as pool:
        futures = [pool.submit(branch, i) for i in range(WIDTH)] + [pool.submit(critical)]
        return {"branches": [f.result(timeout=300) for f in futures[:WIDTH]],
                "critical": futures[WIDTH].result(timeout=300)}


def _stats(url: str) -> dict:
    return get_json(url + "/taper/stats")


_FAULTED: set = set()  # servers a fault was injected into: re-armed when the module ends


@pytest.fixture(scope="module", autouse=True)
def _leave_them_armed():
    """The pool's plain server serves the run-time faults (conftest.FAULTS_ENV) and
    the modules after this one: none of them may find it degraded."""
    yield
    for srv in _FAULTED:
        if srv.proc.poll() is None:
            post_json(srv.url + "/taper/rearm", {})


def _faulty(server_pool):
    """The pool's plain server (it allows run-time faults), re-armed after the
    last fault, its counters from zero."""
    srv = server_pool.get(["--taper-policy", "off"], env=STRICT)
    _FAULTED.add(srv)
    post_json(srv.url + "/taper/rearm", {})
    post_json(srv.url + "/taper/stats/reset", {})
    stats = _stats(srv.url)
    assert not stats["degraded"] and stats["regulating"] and stats["held_branch_steps"] == 0
    return srv


def _run(srv, tag: str) -> tuple[list, dict, str]:
    outs = [_workload(srv.url, f"{tag}-{k}") for k in range(2)]
    kv = wait_idle(srv.url)
    assert kv["available"] + kv["evictable"] == kv["capacity"], kv
    # Still serving after the fault, requests of every kind.
    assert generate(srv.url, "after the fault", 8)["meta_info"]["completion_tokens"] == 8
    assert srv.proc.poll() is None
    return outs, _stats(srv.url), server_log(srv)


@pytest.fixture(scope="module")
def reference(server_pool) -> list:
    outs, stats, log = _run(server_pool.get(["--taper-policy", "eager"], env=STRICT), "eager")
    assert not stats["degraded"] and "Traceback" not in log
    return outs


# observe@40: a fault after some regulated steps, mid-run; the others at once.
@pytest.mark.parametrize("fault", ["decide@40", "split", "observe@40", "stats", "attach@6"])
def test_a_fault_degrades_to_eager_and_the_server_keeps_serving(server_pool, reference, fault):
    srv = _faulty(server_pool)
    post_json(srv.url + "/taper/fault", {"fault": fault})
    outs, stats, log = _run(srv, f"off-{fault}")
    assert outs == reference  # `off` degraded to running every step whole: eager's outputs
    point = fault.split("@")[0]
    assert stats["degraded"] and "injected fault in " + point in stats["degraded_reason"]
    assert stats["regulating"] is False and stats["faults"] >= 1
    assert log.count("Traceback") == 1, "the traceback is logged once, then counted"
    if fault == "decide@40":  # regulated (held) before the fault, whole after it
        assert stats["held_branch_steps"] > 0


def test_degraded_shows_on_prometheus(server_pool):
    srv = server_pool.get(["--taper-policy", "taper", "--enable-metrics"],
                          env={**STRICT, "TAPER_INJECT_FAULT": "decide"})
    _workload(srv.url, "metrics")
    with urllib.request.urlopen(srv.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    gauge = [line for line in text.splitlines() if line.startswith("taper_degraded")]
    assert gauge and float(gauge[0].split()[-1]) == 1.0, gauge
    post_json(srv.url + "/taper/rearm", {})  # the launch fault is spent: the gauge goes back
    with urllib.request.urlopen(srv.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    gauge = [line for line in text.splitlines() if line.startswith("taper_degraded")]
    assert gauge and float(gauge[0].split()[-1]) == 0.0, gauge


def test_rearm_regulates_again_on_the_same_server(server_pool, reference):
    srv = _faulty(server_pool)
    post_json(srv.url + "/taper/fault", {"fault": "decide"})
    outs, stats, _ = _run(srv, "before-rearm")
    assert outs == reference and stats["degraded"] and stats["held_branch_steps"] == 0
    faults = stats["faults"]
    answer = post_json(srv.url + "/taper/rearm", {})
    assert answer["rearmed"] is True and answer["config"]["policy"] == "off"
    stats = _stats(srv.url)
    assert not stats["degraded"] and stats["degraded_reason"] is None and stats["regulating"]
    srv.log_from = srv.log_path.stat().st_size  # the log from the re-arm on
    outs, stats, log = _run(srv, "after-rearm")
    assert outs == reference  # regulated again (held), still eager's outputs
    assert stats["held_branch_steps"] > 0 and not stats["degraded"]
    assert stats["faults"] == faults and "Traceback" not in log  # the fault was spent
    assert post_json(srv.url + "/taper/rearm", {})["rearmed"] is False  # nothing to re-arm


@pytest.mark.parametrize("body", [{"fault": "nowhere"}, {"fault": "decide@0"}, {"fault": ""},
                                  {"point": "decide"}, ["decide"]])
def test_a_bad_fault_is_a_400_and_changes_nothing(server_pool, body):
    srv = _faulty(server_pool)
    with pytest.raises(urllib.error.HTTPError) as err:
        post_json(srv.url + "/taper/fault", body)
    assert err.value.code == 400 and "fault" in err.value.read().decode()
    _workload(srv.url, "bad-fault")
    assert not _stats(srv.url)["degraded"]
