"""A soak: the mixed workload against one live server for N minutes, with chaos
beside it (random client aborts and disconnects, bad metadata, pauses in both
modes, cache flushes), then an account of what a production server must never
do: lose a request, keep KV after going idle, grow without bound, or log a
traceback.

    python -m bench.soak --minutes 30 [--policy taper] [--out soak.json]

Exit status 0 when nothing was lost, no request timed out on the client (a
timeout means the load was more than the server sustains, so the run judged
nothing), KV went back to idle and the log has no traceback; 1 otherwise.
RSS growth is reported, not judged (a warm allocator grows in its first
minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field

import aiohttp

from bench.client import generate
from bench.replay import replay
from bench.workload import PRESETS, WorkloadConfig
from bench.workload import generate as make_programs

# Fields of a request's metadata that the server must refuse with HTTP 400.
BAD_METADATA = ({"taper_group": 5}, {"taper_width": 0, "taper_group": "g"},
                {"taper_bogus": 1}, {"taper_branch": 1}, {"taper_tpot": -1.0})


@dataclass
class SoakReport:
    minutes: float  # asked for
    policy: str
    programs: int = 0  # mixed-workload programs run
    program_requests: int = 0  # their requests
    lost: int = 0  # requests without a proper answer (transport error, bad status, none)
    lost_examples: list[str] = field(default_factory=list)
    timeouts: int = 0  # requests the client gave up on (the server was overloaded)
    aborted: int = 0  # chaos requests aborted on purpose, each answered "abort"
    disconnects: int = 0  # streams the client dropped mid-way
    bad_metadata: int = 0  # refused with HTTP 400, as they must be
    pauses: int = 0
    flushes: int = 0  # /flush_cache calls (the server refuses them while busy)
    kv_idle: dict = field(default_factory=dict)  # /taper/stats kv after the run and a flush
    kv_back: bool = False  # capacity == available after the flush, nothing running or held
    rss_start_mb: float = 0.0  # server processes' resident memory after warm-up
    rss_end_mb: float = 0.0
    tracebacks: int = 0  # "Traceback" lines in the server log
    degraded: bool = False  # TAPER turned its regulation off after an error
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and self.timeouts == 0 and self.kv_back and self.tracebacks == 0
                and not self.degraded)


def _rss_mb(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def _lose(report: SoakReport, what: str) -> None:
    """Count a request without its answer: a client timeout (an overloaded server,
    so the run's load was too high to judge) apart from a loss."""
    if "Timeout" in what or what.endswith(": timeout"):
        report.timeouts += 1
    else:
        report.lost += 1
    if len(report.lost_examples) < 10:
        report.lost_examples.append(what)


async def _post(session, url: str, body: dict | None = None, timeout: float = 60) -> tuple:
    async with session.post(url, json=body or {},
                            timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        return r.status, await r.text()


async def _abort_one(session, url: str, rng: random.Random, report: SoakReport, k: int) -> None:
    """A tagged branch group; one of its branches is aborted mid-way by rid."""
    width = rng.randint(2, 4)
    group = f"soak-abort-{k}"
    rids = [f"{group}-{b}" for b in range(width)]
    tasks = [asyncio.create_task(generate(
        session, url, f"Soak abort group {k}, branch {b}: " + "context " * rng.randint(4, 40),
        rng.randint(32, 128), {"taper_group": group, "taper_branch": b, "taper_width": width},
        rid=rids[b])) for b in range(width)]
    await asyncio.sleep(rng.uniform(0.05, 1.0))
    victim = rng.randrange(width)
    await _post(session, url + "/abort_request", {"rid": rids[victim]})
    for b, c in enumerate(await asyncio.gather(*tasks)):
        if c.error:
            _lose(report, f"abort group {group} branch {b}: {c.error}")
        elif b == victim and c.finish == "abort":
            report.aborted += 1
        elif c.finish not in ("length", "stop", "abort"):
            _lose(report, f"abort group {group} branch {b}: finish {c.finish}")


async def _disconnect(session, url: str, rng: random.Random, report: SoakReport, k: int) -> None:
    """A stream the client drops after a few chunks (the server must abort it)."""
    body = {"text": f"Soak disconnect {k}: " + "words " * rng.randint(4, 40), "stream": True,
            "sampling_params": {"max_new_tokens": 512, "temperature": 0, "ignore_eos": True,
                                "custom_params": {"taper_group": f"soak-dc-{k}",
                                                  "taper_branch": 0, "taper_width": 2}}}
    try:
        async with session.post(url + "/generate", json=body,
                                timeout=aiohttp.ClientTimeout(total=120)) as r:
            n = 0
            async for _ in r.content:
                n += 1
                if n >= rng.randint(2, 20):
                    break
        report.disconnects += 1
    except (aiohttp.ClientError, TimeoutError) as e:
        _lose(report, f"disconnect {k}: {type(e).__name__}: {e}")


async def _bad(session, url: str, rng: random.Random, report: SoakReport) -> None:
    custom = rng.choice(BAD_METADATA)
    status, text = await _post(session, url + "/generate", {
        "text": "bad metadata", "sampling_params": {"max_new_tokens": 4,
                                                    "custom_params": custom}})
    if status == 400:
        report.bad_metadata += 1
    else:
        _lose(report, f"bad metadata {custom} answered {status}: {text[:120]}")


async def _pause(session, url: str, rng: random.Random, report: SoakReport) -> None:
    mode = rng.choice(("in_place", "retract"))
    await _post(session, url + "/pause_generation", {"mode": mode})
    await asyncio.sleep(rng.uniform(0.05, 0.5))
    await _post(session, url + "/continue_generation", {})
    report.pauses += 1


async def _guarded(coro, report: SoakReport, kind: str) -> None:
    """A chaos event whose own call failed in transport: a request without an
    answer, so it counts as lost."""
    try:
        await coro
    except (aiohttp.ClientError, TimeoutError) as e:
        _lose(report, f"{kind}: {type(e).__name__}: {e}")


async def _chaos(url: str, until: float, rng: random.Random, report: SoakReport) -> None:
    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=conn) as session:
        k, running = 0, set()
        while time.monotonic() < until:
            await asyncio.sleep(rng.expovariate(0.5))  # about one event every two seconds
            k += 1
            kind = rng.choices(("abort", "disconnect", "bad", "pause", "flush"),
                               weights=(4, 2, 2, 1, 1))[0]
            if kind == "abort":
                coro = _abort_one(session, url, rng, report, k)
            elif kind == "disconnect":
                coro = _disconnect(session, url, rng, report, k)
            elif kind == "bad":
                coro = _bad(session, url, rng, report)
            elif kind == "pause":
                await _guarded(_pause(session, url, rng, report), report, kind)  # one at a time
                continue
            else:
                await _guarded(_post(session, url + "/flush_cache"), report, kind)
                report.flushes += 1
                continue
            t = asyncio.create_task(_guarded(coro, report, kind))
            running.add(t)
            t.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running)


def _programs(minutes: float, seed: int, rate: float):
    n = max(4, int(rate * minutes * 60))
    cfg = PRESETS["mixed"]
    cfg = WorkloadConfig(**{**asdict(cfg), "num_programs": n, "rate": rate, "seed": seed,
                            "length_scale": 0.5, "tpot_slo": 0.05, "ttft_slo": 5.0})
    return make_programs(cfg)


async def _soak(url: str, minutes: float, seed: int, rate: float, report: SoakReport) -> None:
    rng = random.Random(seed)
    until = time.monotonic() + 60 * minutes
    programs = _programs(minutes, seed, rate)
    (records, _), _ = await asyncio.gather(
        replay(url, programs, max_concurrency=4, drain_timeout=300.0),
        _chaos(url, until, rng, report))
    report.programs = len(records)
    for rec in records:
        failed = [r for r in rec.requests if r.error]
        for r in failed:
            _lose(report, f"program {rec.pid} stage {r.stage}: {r.error}")
        if rec.error and not failed:  # cut off (timeout) or failed outside a request
            _lose(report, f"program {rec.pid}: {rec.error}")
        report.program_requests += len(rec.requests)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _settle(url: str, timeout: float = 120.0) -> dict:
    """Wait until nothing runs or is held, flush the cache, return the kv figures."""
    deadline = time.monotonic() + timeout
    kv = {}
    while time.monotonic() < deadline:
        kv = _get(url + "/taper/stats")["kv"]
        if kv["running_reqs"] == 0 and kv["held_reqs"] == 0 and kv["protected"] == 0:
            req = urllib.request.Request(url + "/flush_cache", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=30).read()
            kv = _get(url + "/taper/stats")["kv"]
            if kv["available"] == kv["capacity"]:
                return kv
        time.sleep(0.5)
    return kv


def run(minutes: float, policy: str = "taper", seed: int = 0, rate: float = 0.1,
        log_path: str | None = None) -> SoakReport:
    """Start a server (SGLang's busy-time KV check on), soak it, account."""
    from sglang_taper.server import ServerProcess

    report = SoakReport(minutes=minutes, policy=policy)
    env = {**os.environ, "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1"}
    t0 = time.monotonic()
    with ServerProcess(["--taper-policy", policy], env=env,
                       log_path=log_path or f"/tmp/taper-soak-{os.getpid()}.log") as srv:
        warm = _programs(0.1, seed + 1, 1.0)
        asyncio.run(replay(srv.url, warm, max_concurrency=4))
        report.rss_start_mb = _rss_mb(srv.proc.pid)
        print(f"[soak] {minutes:g} min of the mixed workload + chaos on {srv.url} "
              f"(policy {policy}, log {srv.log_path})", flush=True)
        asyncio.run(_soak(srv.url, minutes, seed, rate, report))
        report.kv_idle = _settle(srv.url)
        kv = report.kv_idle
        report.kv_back = (kv.get("available") == kv.get("capacity")
                          and kv.get("running_reqs") == 0 and kv.get("held_reqs") == 0)
        report.degraded = bool(_get(srv.url + "/taper/stats").get("degraded"))
        report.rss_end_mb = _rss_mb(srv.proc.pid)
        if srv.proc.poll() is not None:
            _lose(report, f"the server exited with {srv.proc.returncode}")
        log = srv.log_path
    report.tracebacks = log.read_text(errors="replace").count("Traceback")
    report.seconds = time.monotonic() - t0
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=2.0, help="soak length (default 2)")
    ap.add_argument("--policy", default="taper", help="the server's policy (default taper)")
    ap.add_argument("--rate", type=float, default=0.1,
                    help="mixed-workload programs per second (default 0.1: a load the "
                         "2-core CPU engine sustains; the soak is not a throughput test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the report here as JSON")
    args = ap.parse_args(argv)
    if not args.minutes > 0:
        ap.error(f"--minutes must be > 0, got {args.minutes}")
    report = run(args.minutes, args.policy, args.seed, args.rate)
    data = {**asdict(report), "ok": report.ok,
            "rss_growth_mb": report.rss_end_mb - report.rss_start_mb}
    text = json.dumps(data, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    print(f"[soak] {'OK' if report.ok else 'FAILED'}: lost {report.lost}, client timeouts "
          f"{report.timeouts}, KV back "
          f"{report.kv_back}, RSS {report.rss_start_mb:.0f} -> {report.rss_end_mb:.0f} MB, "
          f"tracebacks {report.tracebacks}", flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
