"""SGLang's own load figures (what the DP controller and routers read) count the
branches TAPER holds: a held branch is running, not gone."""

from __future__ import annotations

import os
import threading
import time

import pytest

from tests.conftest import get_json, post_json

pytestmark = pytest.mark.live

WIDTH = 4


def test_v1_loads_counts_held_branches(server_pool):
    """Under `off` three of the four branches are held at every step; the load
    snapshot SGLang publishes after each step must still say four are running."""
    srv = server_pool.get(["--taper-policy", "off"],
                          env={**os.environ, "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1"})

    def branch(i: int) -> None:
        post_json(srv.url + "/generate", {
            "text": f"Branch {i} of a group the load figures must count:",
            "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True,
                                "custom_params": {"taper_group": "loads", "taper_branch": i,
                                                  "taper_width": WIDTH}}}, timeout=300)

    threads = [threading.Thread(target=branch, args=(i,)) for i in range(WIDTH)]
    for t in threads:
        t.start()
    seen: list[int] = []
    held_before = get_json(srv.url + "/taper/stats")["held_branch_steps"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(seen) < 400:
        loads = get_json(srv.url + "/v1/loads")["loads"]
        seen.append(sum(int(x.get("num_running_reqs", 0)) for x in loads))
        if not any(t.is_alive() for t in threads):
            break
        time.sleep(0.02)
    for t in threads:
        t.join(300)
    held = get_json(srv.url + "/taper/stats")["held_branch_steps"] - held_before
    assert held > 100, "branches were not held: nothing to count"
    running = [n for n in seen if n > 0]
    assert len(running) >= 10, seen
    # Under off the branches decode one after another: the true count is 4, then
    # 3, 2, 1 as they finish (before all four were admitted it may be less). A
    # figure of the kept batch alone would read 1 throughout.
    assert max(running) == WIDTH, seen
    after = running[running.index(WIDTH):]
    assert all(a >= b for a, b in zip(after, after[1:])), seen
    assert after.count(WIDTH) >= 3, seen
