"""Two minutes of the soak (bench/soak.py) on every CI run: the mixed workload
with client aborts and disconnects, bad metadata, pauses and flushes, against a
real server with SGLang's busy-time KV check on. The closing notes quote longer
runs (`python -m bench.soak --minutes 30`)."""

from __future__ import annotations

import pytest

from tests.conftest import LOG_DIR

pytestmark = pytest.mark.live


def test_two_minutes_of_chaos_lose_nothing():
    from bench.soak import run

    # The soak starts its own server; the pool's sleep while idle (--sleep-on-idle).
    report = run(2.0, "taper", seed=0, log_path=str(LOG_DIR / "server-soak.log"))
    assert report.lost == 0 and report.timeouts == 0, report.lost_examples
    assert report.programs > 0 and report.program_requests > report.programs
    # The chaos really happened (about one event every two seconds).
    assert report.aborted > 0 and report.bad_metadata > 0 and report.pauses > 0
    assert report.kv_back, report.kv_idle
    assert report.tracebacks == 0 and not report.degraded
