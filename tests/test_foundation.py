"""The foundation against the real SGLang server on the CPU engine."""

from __future__ import annotations

import os
import sys

import pytest

from sglang_taper.cpu import assets
from tests.conftest import generate, get_json

pytestmark = pytest.mark.live

PROMPTS = ["The plan is", "Branches share a prefix and", "Step one: call the search tool"]


def test_generate_returns_tokens(taper_server):
    out = generate(taper_server.url, "The plan is", max_new_tokens=12)
    assert out["meta_info"]["completion_tokens"] == 12
    assert len(out["output_ids"]) == 12
    assert taper_server.start_seconds < 60, "taper serve must be ready within 60 s"


def test_taper_enabled_reports_its_state(taper_server):
    state = get_json(taper_server.url + "/server_info")["internal_states"][0]
    assert state["taper"]["enabled"] is True
    assert state["taper"]["policy"] == "taper"


def test_fork_program_reuses_the_shared_prefix(taper_server):
    import sglang as sgl

    from programs.fork_demo import fork_demo

    backend = sgl.RuntimeEndpoint(taper_server.url)
    state = fork_demo.run(question="Which path?", width=4, branch_tokens=8, backend=backend)
    branches = state.ret_value
    assert len(branches) == 4
    for text, meta in branches:
        assert isinstance(text, str) and text
        assert meta["completion_tokens"] == 8
        # Everything but the few tokens of "Path i:" comes from the radix cache.
        assert meta["cached_tokens"] >= meta["prompt_tokens"] - 6, meta
        assert meta["prompt_tokens"] > 60
    assert state["summary"]


def test_plugin_inert_when_not_enabled(server_pool):
    """Installed but not enabled, the server is stock SGLang: no TAPER state, and
    the same greedy outputs as with TAPER enabled."""
    # Batch invariance off: stock SGLang computes with its own CPU kernels.
    enabled = server_pool.get(["--taper-policy", "eager", "--taper-batch-invariant", "off"])
    with_taper = [generate(enabled.url, p)["output_ids"] for p in PROMPTS]

    stub_dir, model = assets.ensure_cpu_assets()
    env = assets.cpu_env()
    env.pop("TAPER_ENABLED", None)
    env.pop("TAPER_CONFIG", None)
    from sglang_taper.serve import CPU_DEFAULTS

    cpu_args = [x for flag, value in CPU_DEFAULTS for x in ([flag] if value is None else
                                                            [flag, value])]
    stock = server_pool.get(["--model-path", str(model), *cpu_args],
                            cmd=[sys.executable, "-m", "sglang.launch_server"], env=env)
    assert "taper" not in get_json(stock.url + "/server_info")["internal_states"][0]
    assert [generate(stock.url, p)["output_ids"] for p in PROMPTS] == with_taper
    assert os.environ.get("TAPER_ENABLED") != "1"
