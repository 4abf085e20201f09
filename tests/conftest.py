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


class ServerPool:
    """Servers keyed by their arguments, at most one alive at a time.

    An idle SGLang scheduler busy-polls a core; on a 2-core machine two live
    servers would slow each other's tests, so starting one stops the other.
    """

    def __init__(self) -> None:
        self.current = None
        self.key: tuple | None = None
        self.starts: dict[tuple, float] = {}

    def get(self, args: Sequence[str] = (), cmd: Sequence[str] | None = None,
            env: dict[str, str] | None = None, start_timeout: float = 180.0):
        from sglang_taper.server import ServerProcess

        key = (tuple(args), tuple(cmd or ()), tuple(sorted((env or {}).items())))
        if self.key == key and self.current is not None and self.current.proc.poll() is None:
            return self.current
        self.close()
        name = "-".join(a.strip("-").replace(":", "") for a in args)[:60] or "default"
        server = ServerProcess(args, cmd=cmd, env=env,
                               log_path=LOG_DIR / f"server-{name}-{len(self.starts)}.log")
        server.start(start_timeout)
        self.starts[key] = server.start_seconds
        self.current, self.key = server, key
        return server

    def close(self) -> None:
        if self.current is not None:
            self.current.stop()
        self.current, self.key = None, None


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
