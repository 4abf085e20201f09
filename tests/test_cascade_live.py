"""Cascade attention on the live CPU engine: greedy outputs unchanged."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import get_json
from tests.live_suite import assert_same_outputs, run_suite

pytestmark = pytest.mark.live
STRICT = {**os.environ, "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1"}
# A gate under which every group with a shared prefix takes the two-level path
# (the suite's groups are narrow with short prefixes: the measured gate would
# send most of them down the plain path, and the test would prove little).
ALWAYS = {"widths": [2], "min_prefix": [0]}


def test_cascade_keeps_greedy_outputs_identical(server_pool, tmp_path):
    """The tiny model is float32: two-level attention must reproduce the plain
    path's greedy tokens for every fork program, nested forks and n>1, whether
    it takes every group (`always`) or only those the built-in gate passes. It
    sums in another order, so logprobs agree closely rather than bit for bit."""
    always = tmp_path / "always.json"
    always.write_text(json.dumps({"kind": "cascade", "cascade": ALWAYS}))
    out = {}
    for name, extra in (("plain", []),
                        ("always", ["--taper-cascade", "--taper-cascade-profile", str(always)]),
                        ("gated", ["--taper-cascade"])):
        srv = server_pool.get(["--taper-policy", "cap:2", *extra], env=STRICT)
        out[name] = run_suite(srv.url)
        info = get_json(srv.url + "/server_info")
        backend = info.get("attention_backend")
        assert backend == ("taper_cascade" if extra else "torch_native")
        stats = get_json(srv.url + "/taper/stats")
        assert stats["regulated_steps"] > 0
        # the controller's cascade features (the engine's gate) never failed a decision
        assert stats["faults"] == 0 and not stats["degraded"], stats.get("degraded_reason")
    assert_same_outputs(out["always"], out["plain"], "cascade (every group) vs plain", tol=1e-4)
    assert_same_outputs(out["gated"], out["plain"], "cascade (gated) vs plain", tol=1e-4)
