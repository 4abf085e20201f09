"""The one client the benchmarks use for a TAPER server's own figures
(`/taper/stats`) and for the admin calls a clean run needs (flush the cache,
wait for idle). Figures of one run are differences of two snapshots, so that
calibration, warm-up and earlier rates never leak into a run's numbers."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

# Cumulative counters of /taper/stats that a run reports as after - before.
COUNTERS = ("steps", "regulated_steps", "unsafe_steps", "held_branch_steps", "branch_steps",
            "deferred_prefills")


class StatsClient:
    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def get(self, history: bool = False) -> dict:
        """The server's /taper/stats (one DP rank's dict, as the server returns it)."""
        path = "/taper/stats" + ("?history=1" if history else "")
        with urllib.request.urlopen(self.url + path, timeout=self.timeout) as r:
            return json.loads(r.read())

    def try_get(self, history: bool = False) -> dict:
        """Like get(), but {} when the server cannot answer."""
        try:
            return self.get(history)
        except (OSError, ValueError):
            return {}

    def wait_idle(self, timeout: float = 120.0, poll: float = 0.2) -> dict:
        """Block until no request runs, is held or holds a radix-cache lock; returns
        the KV figures. Raises TimeoutError with the last figures otherwise."""
        deadline = time.monotonic() + timeout
        kv: dict = {}
        while time.monotonic() < deadline:
            kv = self.try_get().get("kv", {})
            if kv and kv["running_reqs"] == 0 and kv["held_reqs"] == 0 and kv["protected"] == 0:
                return kv
            time.sleep(poll)
        raise TimeoutError(f"server {self.url} not idle after {timeout:.0f} s: {kv}")

    def flush_cache(self, timeout: float = 60.0) -> None:
        """Empty SGLang's radix cache (it refuses while requests run: retried)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            req = urllib.request.Request(self.url + "/flush_cache", data=b"", method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as e:  # 400 while requests are in flight
                last = f"HTTP {e.code}: {e.read()[:200]!r}"
            except OSError as e:
                last = str(e)
            time.sleep(0.5)
        raise TimeoutError(f"server {self.url} did not flush its cache: {last}")

    def clean_slate(self) -> dict:
        """Idle, cache flushed, idle again: the state every run starts from.
        Returns the stats snapshot the run's figures are taken against."""
        self.wait_idle()
        self.flush_cache()
        self.wait_idle()
        return self.get()

    async def poll(self, session, t0: float, out: list, period: float) -> None:
        """Append {t, counters...} every `period` seconds until cancelled (for the
        admitted width over time)."""
        import aiohttp

        while True:
            try:
                async with session.get(self.url + "/taper/stats",
                                       timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status == 200:
                        s = json.loads(await r.text())
                        out.append({"t": time.monotonic() - t0,
                                    **{k: s.get(k, 0) for k in COUNTERS}})
            except (aiohttp.ClientError, TimeoutError, ValueError):
                pass
            await asyncio.sleep(period)


def delta(before: dict, after: dict) -> dict:
    """The server's figures of one run: cumulative counters and the width
    histogram as differences, the rest (predictor, overhead) as of the end."""
    out = {k: after.get(k, 0) - before.get(k, 0) for k in COUNTERS}
    h0 = before.get("group_width_histogram", {})
    h1 = after.get("group_width_histogram", {})
    hist = {w: n - h0.get(w, 0) for w, n in h1.items() if n - h0.get(w, 0) > 0}
    out["group_width_histogram"] = dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
    out["max_group_width"] = max((int(w) for w in hist), default=0)
    out["mean_width"] = (out["branch_steps"] / out["regulated_steps"]
                         if out["regulated_steps"] else None)
    out["prediction"] = after.get("prediction")
    out["predictor"] = after.get("predictor")
    p0, p1 = before.get("predictor") or {}, after.get("predictor") or {}
    if "prefill_seconds" in p1:
        out["prefill_seconds"] = p1["prefill_seconds"] - p0.get("prefill_seconds", 0.0)
    ov0, ov1 = before.get("overhead", {}), after.get("overhead", {})
    if ov1:
        hook = ov1.get("hook_seconds", 0.0) - ov0.get("hook_seconds", 0.0)
        dec = ov1.get("decode_seconds", 0.0) - ov0.get("decode_seconds", 0.0)
        out["overhead"] = {"hook_seconds": hook, "decode_seconds": dec,
                           "fraction_of_decode": hook / dec if dec > 0 else None}
    return out
