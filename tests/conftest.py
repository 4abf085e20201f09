"""Shared fixtures: the real SGLang server (CPU engine) and view factories."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from controller.view import Seq, StepView

LOG_DIR = Path(os.environ.get("TAPER_TEST_LOGS", "/tmp/taper-test-logs"))
# SGLang's KV conservation check after every scheduling pass, in every live test:
# a leak (or a held request it cannot see) fails an assertion in the scheduler.
STRICT_ENV = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1"}
# Every pooled server lets a test inject a fault at run time (POST /taper/fault;
# nothing happens until one does), so the fail-safe tests need no server of their
# own; a caller's own TAPER_INJECT_FAULT (a fault at launch) wins.
FAULTS_ENV = {"TAPER_INJECT_FAULT": "later"}


def _pool_env(env: dict[str, str] | None) -> dict[str, str]:
    return {**FAULTS_ENV, **(env or os.environ), **STRICT_ENV}


_ENV_AT_START = frozenset(os.environ)  # before any test module's imports


def _env_key(env: dict[str, str], *leave_out: str) -> tuple:
    """An environment as a key: pytest's own variables (the current test's name)
    change from test to test and do not make another server; nor do the ones
    this process's imports added to os.environ since the suite started (SGLang's
    cache paths: CUDA_CACHE_PATH, TRITON_CACHE_DIR, ...). SGLang sets them alike
    in every server process, but a module's `{**os.environ, ...}` taken at
    collection holds fewer than os.environ later, and each such difference
    started the plain server anew (8 times in one run)."""
    added = os.environ.keys() - _ENV_AT_START
    return tuple(sorted((k, v) for k, v in env.items()
                        if not k.startswith("PYTEST_") and k not in leave_out
                        and k not in added))


class ServerPool:
    """The live tests' servers, kept and reused across tests and modules.

    Starting a server is most of the live tests' time (about 30 s each on this
    machine kind, mostly imports), so the pool avoids it three ways:
    - A `taper serve` whose launch differs from a kept one only in TaperConfig
      fields that change at run time (policy, margin, max_hold_steps, ...) is
      not restarted: the pool sets the whole config through POST /taper/config
      (as `taper serve` with these arguments would start), restarts
      /taper/stats' counters (POST /taper/stats/reset) and flushes the radix
      cache, once nothing runs. What stays is the predictor's fit and the warm
      process, which no test's assertion is about.
    - Up to `TAPER_TEST_SERVERS` (default 3) servers stay alive; to start
      another, the one handed out least often is stopped (the least recently
      used of those), but never the plain `taper serve` (no launch-only flag,
      the suite's environment) while another can go: most modules share it,
      and early in the suite, when every count is low, it would otherwise go
      first (a run with counts alone started it 8 times). Each
      runs with SGLang's `--sleep-on-idle`: an idle scheduler otherwise
      busy-polls a core, and on 2 cores a parked server would slow the tests
      of another (measured: 10 CPU-seconds per 10 s idle without it, 0
      with it).
    - Every SGLang run here checks KV conservation after each scheduling pass
      (STRICT_ENV), so configurations that differed only in that share one;
      likewise every one allows faults injected at run time (FAULTS_ENV), and
      a test that injects one re-arms the server after it.
    `fresh=True` always starts a new server.
    A server the pool lets go is killed, not drained (ServerProcess.kill):
    SGLang's graceful shutdown waits about 5 s, and its tests are done.
    """

    def __init__(self, keep: int | None = None) -> None:
        self.keep = keep or int(os.environ.get("TAPER_TEST_SERVERS", "3"))
        self.alive: dict[tuple, object] = {}  # key -> server, least recently used first
        self.uses: dict[tuple, int] = {}  # key -> times handed out
        self.starts: list[tuple[tuple, float]] = []

    @staticmethod
    def _launch_key(args: Sequence[str], env: dict[str, str]) -> tuple[tuple, dict]:
        """(what a restart would change, the run-time TaperConfig fields)."""
        from sglang_taper.adapter.runtime import LAUNCH_ONLY
        from sglang_taper.plugin import ENV_CONFIG
        from sglang_taper.serve import build_launch

        launch = build_launch(list(args), base_env=env)
        config = launch.config.to_dict()
        fixed = tuple((k, json.dumps(config.pop(k), sort_keys=True)) for k in LAUNCH_ONLY)
        key = (tuple(launch.cmd), _env_key(launch.env, ENV_CONFIG), fixed)
        return key, config

    def get(self, args: Sequence[str] = (), cmd: Sequence[str] | None = None,
            env: dict[str, str] | None = None, start_timeout: float = 180.0,
            fresh: bool = False):
        from sglang_taper.server import ServerProcess

        args = list(args)
        if "--sleep-on-idle" not in args:
            args.append("--sleep-on-idle")
        env = _pool_env(env)
        config = None
        try:
            if cmd is not None:
                raise ValueError("not taper serve")
            key, config = self._launch_key(args, env)
        except Exception:  # noqa: BLE001 (not ours to judge: the start will say)
            key = (tuple(args), tuple(cmd or ()), _env_key(env))
        self.uses[key] = self.uses.get(key, 0) + 1
        server = self.alive.pop(key, None)
        if server is not None and (fresh or server.proc.poll() is not None):
            server.kill()
            server = None
        if server is not None:
            self.alive[key] = server  # now the most recently used
            # a test may have changed the config behind the pool's back: ask
            if config is None or self._live_config(server, args) == config:
                return self._hand_over(server)
            if self._reconfigure(server, args, config):
                return self._hand_over(server)
            self.alive.pop(key).kill()
        if len(self.alive) >= self.keep:
            # (imports set variables in os.environ: the plain key is taken as late as this)
            plain = self._launch_key(["--sleep-on-idle"], _pool_env(None))[0]
        while len(self.alive) >= self.keep:
            # the least used (the first such: LRU), the plain server last of all
            least = min(self.alive, key=lambda k: (k == plain, self.uses[k]))
            self.alive.pop(least).kill()
        name = "-".join(a.strip("-").replace(":", "") for a in args)[:60] or "default"
        server = ServerProcess(args, cmd=cmd, env=env,
                               log_path=LOG_DIR / f"server-{name}-{len(self.starts)}.log")
        server.start(start_timeout)
        self.starts.append((key, server.start_seconds))
        self.alive[key] = server
        server.log_from = 0  # a new server's whole log is the caller's
        return server

    @staticmethod
    def _hand_over(server):
        """A kept server for another caller. `server.log_from`: where that
        caller's part of the server's log starts."""
        try:
            server.log_from = server.log_path.stat().st_size
        except OSError:
            server.log_from = 0
        return server

    @staticmethod
    def _headers(args: Sequence[str], admin: bool) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        # POSTs take the admin key when there is one, GETs the API key
        for flag in ("--api-key", "--admin-api-key") if admin else ("--api-key",):
            if flag in args:
                headers["Authorization"] = "Bearer " + args[list(args).index(flag) + 1]
        return headers

    def _live_config(self, server, args: Sequence[str]) -> dict | None:
        from sglang_taper.adapter.runtime import LAUNCH_ONLY

        req = urllib.request.Request(server.url + "/taper/config",
                                     headers=self._headers(args, admin=False))
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                live = json.loads(r.read())
        except OSError:
            return None
        return {k: v for k, v in live.items() if k not in LAUNCH_ONLY}

    def _reconfigure(self, server, args: Sequence[str], config: dict) -> bool:
        """The server as if started with `args`; False if it refused."""
        url = server.url
        headers = self._headers(args, admin=True)
        try:
            wait_idle(url, timeout=120)
            for path, body in (("/taper/config", config), ("/taper/stats/reset", {}),
                               ("/flush_cache", {})):
                req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                             headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=60) as r:
                    if r.status != 200:
                        return False
        except (OSError, AssertionError):  # urllib's HTTPError is an OSError
            return False
        return True

    def stop(self, server) -> None:
        """Stop one server now (a heavy one, not worth keeping)."""
        for key, kept in list(self.alive.items()):
            if kept is server:
                del self.alive[key]
        server.kill()

    def close(self) -> None:
        """Stop every kept server (before a test that starts its own)."""
        while self.alive:
            self.alive.popitem()[1].kill()


@pytest.fixture(scope="session")
def server_pool() -> Iterator[ServerPool]:
    pool = ServerPool()
    yield pool
    pool.close()


@pytest.fixture()
def taper_server(server_pool):
    """A server under the `taper` policy."""
    return server_pool.get(["--taper-policy", "taper"])


def post(url: str, payload: dict, timeout: float = 120) -> bytes:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def post_json(url: str, payload: dict, timeout: float = 120) -> dict:
    return json.loads(post(url, payload, timeout))


def get_json(url: str, timeout: float = 30) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def generate(url: str, text: str, max_new_tokens: int = 16, **params) -> dict:
    sp = {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True, **params}
    return post_json(url + "/generate", {"text": text, "sampling_params": sp})


# ------------------------------------------------------------- view factories


def make_view(seqs: Sequence[Seq], now: float = 0.0, **kw) -> StepView:
    return StepView.from_seqs(seqs, now=now, **kw)


def group_seqs(group: int, width: int, *, kv_len: int = 256, shared_len: int = 200,
               generated: int = 4, first_token: float = 0.0, arrival: float = 0.0,
               prefix: str = "g") -> list[Seq]:
    return [
        Seq(f"{prefix}{group}.{b}", group=group, branch=b, width=width, kv_len=kv_len,
            shared_len=shared_len, generated=generated, first_token=first_token,
            arrival=arrival)
        for b in range(width)
    ]


def ordinary(sid: str, *, tpot: float = 0.05, generated: int = 8, first_token: float = 0.0,
             kv_len: int = 128, arrival: float = 0.0, ttft: float = 1.0) -> Seq:
    return Seq(sid, kv_len=kv_len, generated=generated, first_token=first_token,
               tpot_slo=tpot, ttft_slo=ttft, arrival=arrival)


def server_log(server) -> str:
    """The server's log since the pool handed it over (a reused server's log
    holds earlier tests' lines too)."""
    with open(server.log_path, "rb") as f:
        f.seek(getattr(server, "log_from", 0))
        return f.read().decode(errors="replace")


def wait_idle(url: str, timeout: float = 60.0, strict: bool = True) -> dict:
    """Wait until nothing runs, is held or is locked in the radix cache; returns
    the server's KV figures (/taper/stats `kv`). After `timeout` seconds: raise,
    or (`strict` False) return the figures as they are, for the caller to judge."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kv = get_json(url + "/taper/stats")["kv"]
        if kv["running_reqs"] == 0 and kv["held_reqs"] == 0 and kv["protected"] == 0:
            return kv
        time.sleep(0.2)
    if not strict:
        return get_json(url + "/taper/stats")["kv"]
    raise AssertionError(f"server not idle after {timeout} s: "
                         f"{get_json(url + '/taper/stats')['kv']}")
