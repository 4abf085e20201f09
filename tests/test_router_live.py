"""`taper router`: two `taper serve` workers behind SGLang's router (sglang-router).
Every request of a program carries its routing key and lands on one worker; the
outputs are a single worker's; a worker killed mid-run costs only the requests
it was running; `taper bench --base-url` runs against the router.

The first tests need no server. The live ones share one fleet (module fixture)
and run in file order: the last one kills a worker."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sglang_taper import router as taper_router
from sglang_taper.meta import as_label
from sglang_taper.router import ROUTING_KEY_HEADER, router_command
from tests.conftest import LOG_DIR, generate, get_json, post_json

HAVE_ROUTER = importlib.util.find_spec("sglang_router") is not None
needs_router = pytest.mark.skipif(not HAVE_ROUTER, reason="sglang-router is not installed "
                                  "(pip install 'sglang-taper[router]'; scripts/setup.sh does)")


# ------------------------------------------------------------ without a server


def test_cpu_workers_started_together_get_room_for_the_memory_check():
    from sglang_taper.cpu import assets

    if assets.has_gpu():
        pytest.skip("the CPU engine's setting")
    assert taper_router.worker_args(["--taper-policy", "off"])[-2:] == [
        "--mem-fraction-static", "0.3"]
    mine = ["--mem-fraction-static=0.1"]
    assert taper_router.worker_args(mine) == mine


def test_router_command_sets_affinity_defaults_and_the_users_flags_win():
    cmd = router_command(["http://a:1", "http://b:2"], "127.0.0.1", 30000,
                         ["--assignment-mode", "random", "--cb-failure-threshold=5"])
    i = cmd.index("--worker-urls")
    assert cmd[i + 1:i + 3] == ["http://a:1", "http://b:2"]
    assert cmd[cmd.index("--policy") + 1] == "manual"
    assert cmd.count("--assignment-mode") == 1 and "random" in cmd
    assert "--cb-failure-threshold=5" in cmd and "--cb-failure-threshold" not in cmd
    assert "--prometheus-port" in cmd  # never the shared default 29000


def test_taper_router_without_sglang_router_says_how_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sglang_router" else real(name, *a))
    assert taper_router.main(["--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert "sglang-router is not installed" in err
    assert "pip install 'sglang-taper[router]'" in err


class _FakeServer(BaseHTTPRequestHandler):
    """Answers what RuntimeEndpoint asks, and records each /generate's routing key."""

    keys: list[str | None] = []

    def log_message(self, *args) -> None:
        pass

    def _reply(self, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._reply({"model_path": "fake-model"})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).keys.append(self.headers.get(ROUTING_KEY_HEADER))
        self._reply({"text": "ok", "meta_info": {"prompt_tokens": 1, "cached_tokens": 0,
                                                 "completion_tokens": 1, "id": "r"}})


def test_every_request_of_a_program_run_carries_that_runs_routing_key():
    from programs.tree_of_thought import nested_fork
    from sglang_taper import TaperEndpoint

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FakeServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        be = TaperEndpoint(f"http://127.0.0.1:{httpd.server_port}")
        runs = []
        for _ in range(2):
            _FakeServer.keys = []
            state = nested_fork.run(question="z", outer=2, inner=3, backend=be)
            assert state.error() is None
            runs.append(list(_FakeServer.keys))
    finally:
        httpd.shutdown()
    for keys in runs:
        # stages, prefix commits, both levels of forks: 2 + 2*3 generations at least
        assert len(keys) >= 8
        assert len(set(keys)) == 1 and keys[0] is not None
    assert runs[0][0] != runs[1][0]  # one key per program run


# ---------------------------------------------------------------------- live

SERVE_ARGS = ["--taper-policy", "taper", "--log-level", "warning",
              # two schedulers loading at once: SGLang's CPU memory check would
              # count the other's allocation as ours at the 0.05 default
              "--mem-fraction-static", "0.3"]
# The router's periodic health check is a generation on SGLang's /health, which
# would add a request to a worker's figures; the circuit breaker finds dead workers.
ROUTER_ARGS = ["--health-check-interval-secs", "3600"]


@pytest.fixture(scope="module")
def fleet():
    if not HAVE_ROUTER:
        pytest.skip("sglang-router is not installed (pip install 'sglang-taper[router]')")
    # The pool's servers sleep while idle (--sleep-on-idle): they stay.
    f = taper_router.Fleet(2, SERVE_ARGS, router_args=ROUTER_ARGS,
                           log_dir=LOG_DIR / "router-fleet")
    f.start()
    yield f
    f.stop()


def _figures(fleet) -> list[dict]:
    """Each worker's /taper/stats, with the recent branch groups it took."""
    return [get_json(u + "/taper/stats?groups=1") for u in fleet.worker_urls]


def _served(before: list[dict], after: list[dict]) -> list[int]:
    """Per worker: the generation requests it took in between."""
    return [a["requests_attached"] - b["requests_attached"] for b, a in zip(before, after)]


def _texts(value):
    """A program's return value without its meta_info dicts (ids, latencies)."""
    if isinstance(value, (list, tuple)):
        return [_texts(v) for v in value if not isinstance(v, dict)]
    return value


def _outputs(state) -> tuple:
    return _texts(state.ret_value), state.text()


@pytest.mark.live
@needs_router
@pytest.mark.parametrize("program", ["fork_demo", "nested_fork"])
def test_a_fork_program_runs_on_one_worker_with_a_single_workers_outputs(fleet, program):
    from programs.fork_demo import fork_demo
    from programs.tree_of_thought import nested_fork
    from sglang_taper import TaperEndpoint

    run = {"fork_demo": lambda be: fork_demo.run(question="Which way?", width=4,
                                                 branch_tokens=12, backend=be),
           "nested_fork": lambda be: nested_fork.run(question="z", outer=2, inner=3,
                                                     backend=be)}[program]
    alone = run(TaperEndpoint(fleet.worker_urls[0]))
    assert alone.error() is None
    via_router = TaperEndpoint(fleet.url)
    for _ in range(3):  # three runs, three placements
        before = _figures(fleet)
        state = run(via_router)
        after = _figures(fleet)
        attached = _served(before, after)
        assert state.error() is None
        assert _outputs(state) == _outputs(alone)
        assert sorted(attached)[0] == 0 and sorted(attached)[1] >= 5, attached
        # its fork groups reached that worker as groups (regulated there)
        w = attached.index(max(attached))
        new = set(after[w]["groups_seen"]) - set(before[w]["groups_seen"])
        assert any(g.startswith("f-") for g in new), after[w]["groups_seen"]


@pytest.mark.live
@needs_router
def test_taper_metadata_reaches_the_worker_through_the_router(fleet):
    """sglang-router 0.3.2 re-serializes /generate bodies without
    sampling_params.custom_params but keeps `custom_labels`: the clients send the
    TAPER keys there too (meta.as_label) and the worker restores them, so a group
    is regulated behind the router, and bad metadata is still the worker's 400."""
    custom = {"taper_group": "through-the-router", "taper_width": 1}
    post_json(fleet.url + "/generate", {
        "text": "x", "sampling_params": {"max_new_tokens": 2, "custom_params": custom},
        "custom_labels": as_label(custom)})
    after = _figures(fleet)
    assert sum(f["groups_seen"].get("through-the-router", 0) for f in after) == 1, after
    with pytest.raises(urllib.error.HTTPError) as e:
        post_json(fleet.url + "/generate", {
            "text": "x", "sampling_params": {"max_new_tokens": 2},
            "custom_labels": as_label({"taper_width": 0})})
    assert e.value.code == 400 and "taper_width" in e.value.read().decode()


@pytest.mark.live
@needs_router
def test_requests_without_a_routing_key_are_spread_at_random(fleet):
    """Policy manual has no cache-aware fallback: a request without a key, even one
    sharing its prompt with the others, goes to a random worker."""
    before = _figures(fleet)
    for _ in range(12):
        generate(fleet.url, "The same prompt every time.", max_new_tokens=2)
    attached = _served(before, _figures(fleet))
    assert sum(attached) == 12 and min(attached) > 0, attached


@pytest.mark.live
@needs_router
def test_taper_bench_runs_against_the_router(fleet, tmp_path):
    """4 short programs: about a minute of replay on a quiet 2-core host, more on a
    busy one (decode steps of about 1 s were seen, and a 60 s drain cut 2 of the 4
    off as "timeout"): the drain leaves room, so a slow host is not lost programs."""
    r = subprocess.run([sys.executable, "-m", "sglang_taper", "bench", "--base-url", fleet.url,
                        "--num-prompts", "4", "--length-scale", "0.1", "--request-rate", "0.5",
                        "--drain", "400", "--no-plots", "--result-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    (run,) = res["runs"]
    assert run["policy"] == "external" and run["rate"] == pytest.approx(0.5)
    s = run["summary"]
    assert s["programs"] == 4 and s["errors"] == 0, (s["failures"], s["error_samples"])
    # The figures are both workers' (listed by the router), over this run only.
    assert len(run["server"]["workers"]) == 2 and run["server"]["steps"] > 0
    # The admitted width over time: sampled from the workers (the router has no
    # /taper/stats), whenever the run had regulated steps.
    assert run["width_series"] or not run["server"]["regulated_steps"], run["server"]


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    """Run fn in a daemon thread (a hang fails the test, never blocks the run);
    the dict gets its "value" or its "exc"."""
    out: dict = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["exc"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def _post_keyed(url: str, key: str | None, text: str) -> dict:
    headers = {"Content-Type": "application/json"}
    if key:
        headers[ROUTING_KEY_HEADER] = key
    body = json.dumps({"text": text, "sampling_params": {"max_new_tokens": 2,
                                                         "temperature": 0}}).encode()
    req = urllib.request.Request(url + "/generate", data=body, headers=headers)
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@pytest.mark.live
@needs_router
def test_a_killed_worker_costs_only_the_requests_it_was_running(fleet, monkeypatch):
    """Kill (SIGKILL) the worker a fork program runs on, mid-branches, while a
    stream with the program's key runs there too. The program either completes
    with a single worker's outputs (the router re-sends a cut non-streaming
    request to the live worker) or reports a clear error; the stream ends with an
    error, never hangs; every request sent after the kill (new keys, the dead
    worker's key, no key) is served by the live worker. Runs last: it leaves the
    module's fleet one worker short."""
    from bench.client import generate as stream
    from bench.server_stats import StatsClient
    from programs.fork_demo import fork_demo
    from sglang_taper import TaperEndpoint
    from sglang_taper.adapter import frontend

    # Long enough to be still running a second after it first reaches a worker on
    # the fastest host (768 branch tokens, then 768 of summary: >= 3 s at 2 ms a
    # step); at 64 a fast host finished it before the kill
    args = dict(question="Where does it go?", width=4, branch_tokens=768)
    alone = fork_demo.run(**args, backend=TaperEndpoint(fleet.worker_urls[0]))
    assert alone.error() is None

    keys: list[str] = []  # the routing keys the program sends (one per run)
    plain = frontend._http_request
    monkeypatch.setattr(frontend, "_http_request", lambda url, body, stream_, api_key, verify,
                        method, extra: (keys.append(extra[ROUTING_KEY_HEADER]),
                                        plain(url, body, stream_, api_key, verify, method,
                                              extra))[1])
    before = _figures(fleet)
    prog, result = _in_thread(lambda: fork_demo.run(**args, backend=TaperEndpoint(fleet.url)))
    deadline = time.monotonic() + 60
    victim = None
    while victim is None and time.monotonic() < deadline:
        served = _served(before, _figures(fleet))
        victim = served.index(max(served)) if any(served) and keys else None
        time.sleep(0.1)
    assert victim is not None, "no worker took the program's requests within 60 s"
    key, live = keys[0], fleet.worker_urls[1 - victim]

    tokens = 2000  # far more than can finish before the kill
    streamer, streamed = _in_thread(lambda: asyncio.run(_one_stream(
        stream, fleet.url, tokens, key)))
    time.sleep(1.0)  # the stream's prefill done, the program into its branches
    assert prog.is_alive() and streamer.is_alive(), "finished before the kill"
    os.killpg(fleet.servers[victim].proc.pid, signal.SIGKILL)
    t_kill = time.monotonic()

    prog.join(150)
    assert not prog.is_alive(), "the program hung after the kill (150 s)"
    streamer.join(max(1.0, 150 - (time.monotonic() - t_kill)))
    assert not streamer.is_alive(), "the stream hung after the kill"
    assert "exc" not in result, result.get("exc")
    state = result["value"]
    err = state.error()
    happened = ("retried on the live worker: completed" if err is None
                else f"reported an error: {type(err).__name__}: {err}")
    if err is None:
        assert _outputs(state) == _outputs(alone), happened
    else:
        assert str(err).strip(), happened
    c = streamed.get("value")
    assert c is not None, streamed.get("exc")
    assert c.error and c.output_tokens < tokens, (happened, c.error, c.output_tokens)

    # Nothing the router had not yet sent is lost: all of it reaches the live worker.
    StatsClient(live).wait_idle(timeout=60)
    n0 = get_json(live + "/taper/stats")["requests_attached"]
    sent = [(k, f"After the kill {i}.") for i, k in
            enumerate(["new-key-1", "new-key-2", key, key, None, None])]
    for k, text in sent:
        out = _post_keyed(fleet.url, k, text)
        assert out["meta_info"]["completion_tokens"] == 2, (k, out)
    assert get_json(live + "/taper/stats")["requests_attached"] - n0 == len(sent), happened
    print(f"\n[kill] program {happened}; stream cut after {c.output_tokens} tokens: {c.error}")


async def _one_stream(stream, url: str, tokens: int, key: str):
    import aiohttp

    async with aiohttp.ClientSession() as s:
        return await stream(s, url, "A stream that the kill cuts off.", tokens,
                            routing_key=key, timeout=150)
