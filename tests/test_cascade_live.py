"""Cascade attention on the live CPU engine: greedy outputs unchanged."""

from __future__ import annotations

import os

import pytest

from tests.conftest import get_json
from tests.live_suite import assert_same_outputs, run_suite

pytestmark = pytest.mark.live
STRICT = {**os.environ, "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1"}


def test_cascade_keeps_greedy_outputs_identical(server_pool):
    """The tiny model is float32: two-level attention must reproduce the plain
    path's greedy tokens for every fork program, nested forks and n>1. It sums in
    another order, so logprobs agree closely rather than bit for bit."""
    out = {}
    for name, extra in (("plain", []), ("cascade", ["--taper-cascade"])):
        srv = server_pool.get(["--taper-policy", "cap:2", *extra], env=STRICT)
        out[name] = run_suite(srv.url)
        info = get_json(srv.url + "/server_info")
        backend = info.get("attention_backend")
        assert backend == ("taper_cascade" if extra else "torch_native")
        assert get_json(srv.url + "/taper/stats")["regulated_steps"] > 0
    assert_same_outputs(out["cascade"], out["plain"], "cascade vs plain", tol=1e-4)
