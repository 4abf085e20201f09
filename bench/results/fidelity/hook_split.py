"""Where TAPER's hook time goes in a live run of the default workload: the
server's own split by entry point (/taper/stats overhead.by_method_s over the
run), and a py-spy profile of the scheduler (py-spy is no dependency:
`.venv/bin/pip install py-spy`).

    .venv/bin/python bench/results/fidelity/hook_split.py [SCALE] [PROFILE_OUT]

SCALE: the fidelity default case's programs times this (1: 40). Prints the
figures (hook-split.txt holds one run's output); the profile's raw stacks go
to PROFILE_OUT (default /tmp/hook-split-pyspy.txt). SPY_S and SPY_HZ set
py-spy's duration (default 60 s; 0: no profile) and rate (default 50 Hz);
RATE the programs/s (default 35%, of the capacity the calibration measured).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def main() -> None:
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    import psutil

    from bench import cli as bench_cli
    from bench import options
    from bench.sim import fidelity

    scale = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    prof = sys.argv[2] if len(sys.argv) > 2 else "/tmp/hook-split-pyspy.txt"
    out = Path("/tmp/hook-split")
    out.mkdir(parents=True, exist_ok=True)
    bench = bench_cli.LiveBench(fidelity.case_ns("default", "taper", 0, out, scale))
    with bench.server("taper") as srv:
        bench.calibrated(srv)
        rate = options.parse_rate(os.environ.get("RATE", "35%")).resolve(
            bench.result["capacity_programs_per_s"][0])
        kids = psutil.Process(srv.proc.proc.pid).children(recursive=True)
        sched = [k.pid for k in kids if "scheduler" in " ".join(k.cmdline()).lower()]

        def stats() -> dict:
            with urllib.request.urlopen(srv.url + "/taper/stats", timeout=10) as r:
                return json.loads(r.read())

        s0 = stats()
        spy = None if os.environ.get("SPY_S") == "0" else subprocess.Popen(
            [str(ROOT / ".venv/bin/py-spy"), "record", "-p",
             str(sched[0] if sched else srv.proc.proc.pid), "-d", os.environ.get("SPY_S", "60"),
             "-r", os.environ.get("SPY_HZ", "50"), "-f", "raw", "-o", prof, "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        live = bench.probe(srv, 0, rate)
        s1 = stats()
        if spy is not None:
            spy.wait()
    o0, o1 = s0["overhead"], s1["overhead"]
    print("attainment", live["summary"]["slo_attainment"], "TPOT", live["summary"]["tpot_s"])
    print("steps", s1["steps"] - s0["steps"], "held branch-steps",
          s1["held_branch_steps"] - s0["held_branch_steps"])
    print("hook_seconds", o1["hook_seconds"] - o0["hook_seconds"], "decode",
          o1["decode_seconds"] - o0["decode_seconds"])
    for k, v in sorted(o1["by_method_s"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:20s} {v - o0['by_method_s'].get(k, 0):.3f} s")
    if "views" in o1:  # LiveViews' counts (a server without it has none)
        print("views", {k: v - o0["views"][k] for k, v in o1["views"].items()})


if __name__ == "__main__":
    main()
