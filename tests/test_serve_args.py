"""`taper serve` argument handling (no server is started)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_taper.serve import CPU_DEFAULTS, ServeError, build_launch


def run_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sglang_taper", "serve", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--taper-policy", "bogus"], "unknown policy 'bogus'"),
        (["--taper-policy", "cap:0"], "K >= 1"),
        (["--taper-policy", "cap:x"], "integer K"),
        (["--taper-policy", "eager:3"], "takes no argument"),
        (["--model-path", "/no/such/model"], "no such directory"),
        (["--taper-margin", "1.5"], "--taper-margin must be in [0, 1)"),
        (["--taper-profile", "/no/such.json"], "no such file"),
        (["--enable-mixed-chunk"], "--enable-mixed-chunk"),
        (["--taper-policy", "clairvoyant"], "only the simulator"),
        (["--taper-slowdown", "0.5"], "--taper-slowdown must be >= 1"),
        (["--taper-slowdown", "2", "--taper-overlap"], "overlap scheduler off"),
        (["--taper-cascade", "--taper-cascade-profile", "/no/such.json"], "not a readable"),
        (["--taper-cascade", "--taper-cascade-profile", "pyproject.toml"], "not a readable"),
        (["--taper-cascade", "--taper-cascade-profile",
          "bench/sim/profiles/h200_qwen3_32b_decode.json"], "no cascade section"),
        (["--taper-cascade-profile", "bench/sim/profiles/cpu_tiny_llama_cascade.json"],
         "needs --taper-cascade"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(args, needle):
    r = run_serve(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("taper serve: error:"), r.stderr
    assert needle in lines[0]


def test_other_arguments_pass_through_unchanged():
    extra = ["--log-level", "warning", "--max-running-requests", "48", "--schedule-policy=lpm"]
    launch = build_launch(["--taper-policy", "cap:3", *extra])
    cmd = launch.cmd
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    i = cmd.index("--log-level")
    assert cmd[i : i + 5] == extra
    assert not any(a.startswith("--taper") for a in cmd)
    assert launch.config.policy == "cap:3"
    assert '"policy": "cap:3"' in launch.env["TAPER_CONFIG"]
    assert launch.env["TAPER_ENABLED"] == "1"


def test_cpu_defaults_never_override_the_user():
    launch = build_launch(["--taper-device", "cpu", "--max-total-tokens", "4096"])
    cmd = launch.cmd
    assert cmd.count("--max-total-tokens") == 1
    assert cmd[cmd.index("--max-total-tokens") + 1] == "4096"
    for flag, _ in CPU_DEFAULTS:
        assert flag in cmd
    assert "--model-path" in cmd
    assert launch.env["SGLANG_USE_CPU_ENGINE"] == "1"
    first = launch.env["LD_LIBRARY_PATH"].split(":")[0]
    assert (Path(first) / "libcuda.so.1").is_file()


def test_gpu_mode_requires_a_model():
    with pytest.raises(ServeError, match="--model-path is required"):
        build_launch(["--taper-device", "gpu"])


def test_plugin_load_is_inert_without_the_flag(monkeypatch):
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_taper import plugin

    monkeypatch.delenv("TAPER_ENABLED", raising=False)
    before = {k: list(v) for k, v in HookRegistry._hooks.items()}
    plugin.load()
    assert {k: list(v) for k, v in HookRegistry._hooks.items()} == before


def test_cpu_engine_runs_float32_and_batch_invariant_by_default():
    # SGLang's dtype "auto" serves a float32 checkpoint as float16.
    cmd = build_launch(["--taper-device", "cpu"]).cmd
    assert cmd[cmd.index("--dtype") + 1] == "float32"
    assert build_launch(["--taper-device", "cpu"]).env["TAPER_BATCH_INVARIANT"] == "1"
    off = build_launch(["--taper-device", "cpu", "--taper-batch-invariant", "off"],
                       base_env={**os.environ, "TAPER_BATCH_INVARIANT": "1"})
    assert "TAPER_BATCH_INVARIANT" not in off.env
    with pytest.raises(ServeError, match="--enable-deterministic-inference"):
        build_launch(["--taper-device", "gpu", "--model-path", "/tmp",
                      "--taper-batch-invariant", "on"])


def test_slowdown_reaches_the_plugin_and_only_when_asked():
    slow = build_launch(["--taper-device", "cpu", "--taper-slowdown", "2.5"],
                        base_env={**os.environ})
    assert slow.env["TAPER_SLOWDOWN"] == "2.5"
    plain = build_launch(["--taper-device", "cpu"],
                         base_env={**os.environ, "TAPER_SLOWDOWN": "3"})
    assert "TAPER_SLOWDOWN" not in plain.env


def test_batch_invariant_cpu_engine_models_row_tiles_unless_told():
    """Batch-invariant CPU GEMMs make step time a staircase in 16-row tiles."""
    assert build_launch(["--taper-device", "cpu"]).config.row_tile == 16
    assert build_launch(["--taper-device", "cpu", "--taper-row-tile", "0"]).config.row_tile == 0
    off = build_launch(["--taper-device", "cpu", "--taper-batch-invariant", "off"])
    assert off.config.row_tile == 0
    assert '"row_tile": 16' in build_launch(["--taper-device", "cpu"]).env["TAPER_CONFIG"]
