"""Run-time control, live: GET/POST /taper/config on one server started with
`--taper-policy off --enable-metrics --admin-api-key` (the admin key guards
POST); a switch to `taper` regulates from the next pass with the predictor's
fit kept; `enabled: false` takes the hooks out of the step path; a sampled
request that leaves a greedy batch no longer moves the greedy logprobs; the
Grafana dashboard's metrics are all exported."""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import get_json, post_json, wait_idle
from tests.live_suite import _critical, _group_logprobs

pytestmark = pytest.mark.live

STRICT = {**os.environ, "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1"}
ADMIN = "taper-test-admin-key"
DASHBOARD = Path(__file__).resolve().parents[1] / "monitoring/grafana/taper-dashboard.json"


@pytest.fixture()
def srv(server_pool):
    return server_pool.get(["--taper-policy", "off", "--enable-metrics",
                            "--admin-api-key", ADMIN], env=STRICT)


def post_config(url: str, body, key: str | None = ADMIN,
                path: str = "/taper/config") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post_reset(url: str, key: str | None = ADMIN) -> int:
    return post_config(url, {}, key, path="/taper/stats/reset")[0]


def stats(srv) -> dict:
    return get_json(srv.url + "/taper/stats")


def workload(url: str) -> dict:
    """A critical request with a 1 ms TPOT beside a tagged group of 4: `off`
    and `taper` both hold branches here; outputs are greedy."""
    with ThreadPoolExecutor(2) as pool:
        critical, group = pool.submit(_critical, url), pool.submit(_group_logprobs, url)
        out = {"critical": critical.result(), "group": group.result()}
    wait_idle(url)
    return out


def test_config_reads_and_refuses_bad_input_with_one_line(srv):
    config = get_json(srv.url + "/taper/config")
    assert config["policy"] == "off" and config["enabled"] is True
    assert post_config(srv.url, {"margin": 0.2}, key=None)[0] == 401
    assert post_config(srv.url, {"margin": 0.2}, key="wrong")[0] == 401
    for body, needle in [
        ({"margin": 1.5}, "TaperConfig.margin must be in [0, 1), got 1.5"),
        ({"policy": "bogus"}, "unknown policy 'bogus'"),
        ({"enabled": "no"}, "TaperConfig.enabled needs a bool"),
        ({"nope": 1}, "TaperConfig has no field 'nope'"),
        ({"cascade": True}, "TaperConfig.cascade is fixed at launch"),
        ({"policy": "clairvoyant"}, "only the simulator"),
        ([1, 2], "the body must be a JSON object"),
        (b"{not json", "the body must be a JSON object"),
    ]:
        status, answer = post_config(srv.url, body)
        assert status == 400 and needle in answer["error"], (body, answer)
        assert "\n" not in answer["error"]
    assert get_json(srv.url + "/taper/config") == config  # nothing applied
    assert stats(srv)["faults"] == 0 and srv.healthy()


def test_off_then_taper_regulates_from_the_next_pass_and_keeps_the_fit(srv):
    from sglang_taper.serve import build_launch

    assert post_config(srv.url, {"policy": "off"})[0] == 200
    under_off = workload(srv.url)
    s_off = stats(srv)
    assert s_off["policy"] == "off" and s_off["held_branch_steps"] > 0
    assert set(s_off["group_width_histogram"]) == {"1"}  # never a second branch at once
    status, config = post_config(srv.url, {"policy": "taper"})
    assert status == 200 and config["policy"] == "taper"
    # what `taper serve --taper-policy taper` would have started with
    assert config == build_launch(["--taper-policy", "taper"]).config.to_dict()
    s_switched = stats(srv)
    assert s_switched["policy"] == "taper"
    assert s_switched["predictor"]["observed"] == s_off["predictor"]["observed"] > 0
    assert s_switched["predictor"]["weights"] == s_off["predictor"]["weights"]  # not reset
    under_taper = workload(srv.url)
    s_taper = stats(srv)
    assert under_taper == under_off  # greedy outputs and decode logprobs, bit for bit
    assert s_taper["held_branch_steps"] > s_off["held_branch_steps"]
    assert s_taper["regulated_steps"] > s_off["regulated_steps"]
    assert s_taper["predictor"]["observed"] > s_off["predictor"]["observed"]  # kept learning
    assert s_taper["faults"] == 0 and not s_taper["degraded"]


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        lines = r.read().decode().splitlines()
    return float(next(x for x in lines if x.startswith(name + " ")).split()[-1])


def test_switched_off_the_hooks_stay_out_of_the_step_path(srv):
    reference = workload(srv.url)
    status, config = post_config(srv.url, {"enabled": False})
    assert status == 200 and config["enabled"] is False
    before = stats(srv)
    assert before["enabled"] is False and before["regulating"] is False
    assert _metric(srv.url, "taper_enabled") == 0.0
    assert workload(srv.url) == reference
    after = stats(srv)
    # Not one hook did any work: no step counted, no time spent in TAPER's code
    # (but in answering /taper/stats itself).
    for key in ("steps", "regulated_steps", "held_branch_steps", "requests_attached"):
        assert after[key] == before[key], key
    hooks = [{k: v for k, v in s["overhead"]["by_method_s"].items() if k != "status"}
             for s in (before, after)]
    assert hooks[0] == hooks[1] and hooks[0]
    assert post_config(srv.url, {"enabled": True})[0] == 200
    assert workload(srv.url) == reference
    back = stats(srv)
    assert back["enabled"] is True and back["steps"] > after["steps"]
    assert back["held_branch_steps"] > after["held_branch_steps"]
    assert _metric(srv.url, "taper_enabled") == 1.0


def _stream_greedy(url: str, text: str, tokens: int, progress: list, out: dict) -> None:
    body = {"text": text, "return_logprob": True, "stream": True,
            "sampling_params": {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}}
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data:") and line != "data: [DONE]":
                out["last"] = json.loads(line[5:])
                progress.append(out["last"]["meta_info"]["completion_tokens"])


def test_a_sampled_request_leaving_a_greedy_batch_leaves_it_greedy(srv):
    """SGLang's `is_all_greedy` was sticky: after a default-temperature request
    joined and left, the greedy request's logprobs came from log(softmax) for
    the rest of its run (240 of 300 differed, from the join to the end). Now at
    most the few steps the two shared differ."""
    text, tokens = "A greedy request that decodes for a while:", 200
    alone = post_json(srv.url + "/generate", {
        "text": text, "return_logprob": True,
        "sampling_params": {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}})
    progress: list[int] = []
    out: dict = {}
    greedy = threading.Thread(target=_stream_greedy, args=(srv.url, text, tokens, progress, out))
    greedy.start()
    while greedy.is_alive() and (not progress or progress[-1] < 20):
        time.sleep(0.005)
    joiner = post_json(srv.url + "/generate", {"text": "A sampled request joins",
                                               "sampling_params": {"max_new_tokens": 4}})
    left_at = progress[-1]  # the sampled request has finished: it left the batch
    greedy.join()
    assert joiner["meta_info"]["completion_tokens"] == 4
    # It came and went while the greedy request decoded: they shared decode steps.
    assert 20 <= left_at and left_at + 50 < tokens
    ref = alone["meta_info"]["output_token_logprobs"]
    got = out["last"]["meta_info"]["output_token_logprobs"]
    assert [t for _, t, _ in got] == [t for _, t, _ in ref] and len(got) == tokens
    differ = [i for i, (a, b) in enumerate(zip(got, ref)) if a[0] != b[0]]
    assert not differ or differ[-1] - differ[0] < 8, (differ[:5], differ[-5:])


def test_every_metric_the_dashboard_reads_is_exported(srv):
    workload(srv.url)
    dash = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    queries += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    wanted = {name for q in queries for name in re.findall(r"\btaper_[a-z_]+", q)}
    assert len(wanted) >= 10
    with urllib.request.urlopen(srv.url + "/metrics", timeout=30) as r:
        exported = {re.split(r"[{ ]", line, maxsplit=1)[0]
                    for line in r.read().decode().splitlines() if line.startswith("taper_")}
    assert wanted <= exported, sorted(wanted - exported)


def test_stats_reset_restarts_the_counters_and_keeps_the_fit(srv):
    workload(srv.url)
    before = stats(srv)
    assert before["steps"] > 0 and before["held_branch_steps"] > 0
    steps_metric = _metric(srv.url, "taper_decode_steps_total")
    assert post_reset(srv.url, key=None) == 401 and post_reset(srv.url, key="wrong") == 401
    assert stats(srv)["steps"] >= before["steps"]  # refused: nothing reset
    assert post_reset(srv.url) == 200
    after = stats(srv)
    for key in ("steps", "regulated_steps", "held_branch_steps", "branch_steps",
                "requests_attached", "faults"):
        assert after[key] == 0, key
    assert after["group_width_histogram"] == {}
    # self-timed from zero: no decode step since (passes between requests still run hooks)
    assert after["overhead"]["decode_seconds"] == 0
    assert after["overhead"]["hook_seconds"] < before["overhead"]["hook_seconds"]
    assert after["predictor"]["observed"] == before["predictor"]["observed"] > 0
    assert after["predictor"]["weights"] == before["predictor"]["weights"]
    assert after["config"] == before["config"] and not after["degraded"]
    assert _metric(srv.url, "taper_decode_steps_total") == steps_metric  # never goes back
    workload(srv.url)
    again = stats(srv)
    # counted from zero: exactly the steps since the reset, as the metric saw them
    assert again["steps"] == _metric(srv.url, "taper_decode_steps_total") - steps_metric > 0
    assert again["held_branch_steps"] > 0


def _taper_metrics(url: str) -> tuple[dict[str, float], list[str]]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        lines = r.read().decode().splitlines()
    return ({x.split(" ")[0]: float(x.split(" ")[1]) for x in lines
             if x.startswith("taper_") and " " in x}, lines)


def test_prometheus_metrics_beside_sglangs(server_pool):
    """The taper_* counters beside SGLang's own, moving with /taper/stats' figures
    (on this shared server both are read as differences: the pool restarts
    /taper/stats' counters, never Prometheus')."""
    from programs.fork_demo import fork_demo
    from sglang_taper import TaperEndpoint

    srv = server_pool.get(["--taper-policy", "cap:2", "--taper-max-hold-steps", "16",
                           "--enable-metrics", "--admin-api-key", ADMIN], env=STRICT)
    m0, _ = _taper_metrics(srv.url)
    s0 = get_json(srv.url + "/taper/stats")
    fork_demo.run(question="metrics", width=4, branch_tokens=12,
                  backend=TaperEndpoint(srv.url))
    wait_idle(srv.url)
    m1, lines = _taper_metrics(srv.url)
    s1 = get_json(srv.url + "/taper/stats")
    held = m1["taper_held_branch_steps_total"] - m0.get("taper_held_branch_steps_total", 0.0)
    assert held > 0
    assert m1["taper_regulated_steps_total"] > m0.get("taper_regulated_steps_total", 0.0)
    assert "taper_measured_step_seconds" in m1 and "taper_group_width_count" in m1
    assert any(line.startswith("sglang:") for line in lines)  # SGLang's own
    assert s1["held_branch_steps"] - s0["held_branch_steps"] == held
