"""Replay a workload trace against a running server: each program starts at
its arrival time and runs its stages, recording every request and stage."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import aiohttp

from bench.client import Completion, generate
from bench.records import ProgramRecord, RequestRecord, StageRecord
from bench.server_stats import COUNTERS
from bench.workload import Program, Stage


def _rel(c: Completion, t0: float, stage: int, branch: int, role: str) -> RequestRecord:
    return RequestRecord(
        stage=stage, branch=branch, role=role, start=c.start - t0,
        first_token=None if c.first_token is None else c.first_token - t0,
        end=(c.end or c.start) - t0, token_times=[t - t0 for t in c.token_times],
        output_tokens=c.output_tokens, cached_tokens=c.cached_tokens, error=c.error,
        prompt_tokens=c.prompt_tokens)


async def _stage(session, url: str, prog: Program, si: int, stage: Stage, context: str,
                 t0: float, rec: ProgramRecord, key: str) -> str:
    slo = {"taper_ttft": prog.ttft_slo, "taper_tpot": prog.tpot_slo}
    start = time.monotonic()
    if stage.kind == "serial":
        c = await generate(session, url, context, stage.tokens[0], slo, routing_key=key)
        rec.requests.append(_rel(c, t0, si, -1, "serial"))
        rec.stages.append(StageRecord(si, "serial", start - t0, time.monotonic() - t0, 1,
                                      stage.tokens[0], 0.0))
        return context + c.text
    group = f"{prog.pid}-s{si}"

    def meta(b: int) -> dict:
        return {**slo, "taper_group": group, "taper_branch": b, "taper_width": stage.width}

    async def branch(b: int) -> str:
        c = await generate(session, url, context + f"\nBranch {b + 1}:", stage.tokens[b],
                           meta(b), routing_key=key)
        rec.requests.append(_rel(c, t0, si, b, "branch"))
        if stage.kind != "tools" or c.error:
            return c.text
        await asyncio.sleep(stage.tool_delay)  # the tool call: the model waits
        text = context + f"\nBranch {b + 1}:" + c.text + f"\nTool result {b + 1}:"
        r = await generate(session, url, text, stage.read_tokens[b], meta(b), routing_key=key)
        rec.requests.append(_rel(r, t0, si, b, "read"))
        return c.text + r.text

    texts = await asyncio.gather(*(branch(b) for b in range(stage.width)))
    longest = max(t + (stage.read_tokens[i] if stage.read_tokens else 0)
                  for i, t in enumerate(stage.tokens))
    rec.stages.append(StageRecord(si, stage.kind, start - t0, time.monotonic() - t0,
                                  stage.width, longest, stage.tool_delay))
    # The join keeps a short digest of every branch, as an aggregation prompt would.
    return context + "".join(f"\n[{b + 1}] {t[:40]}" for b, t in enumerate(texts))


async def run_program(session: aiohttp.ClientSession, url: str, prog: Program, t0: float,
                      sem: asyncio.Semaphore | None, run_id: str = "") -> ProgramRecord:
    """Run one program; every request of it carries the routing key `run_id-pid`
    (a router keeps the program on one worker; a fresh run places it anew)."""
    delay = t0 + prog.arrival - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    rec = ProgramRecord(prog.pid, prog.kind, prog.arrival, 0.0, 0.0, prog.ttft_slo,
                        prog.tpot_slo)
    if sem is not None:
        await sem.acquire()
    try:
        rec.start = time.monotonic() - t0
        context = prog.prompt
        for si, stage in enumerate(prog.stages):
            context = await _stage(session, url, prog, si, stage, context, t0, rec,
                                   f"{run_id}-{prog.pid}")
            errors = [r.error for r in rec.requests if r.error]
            if errors:
                rec.error = errors[0]
                break
    except Exception as e:  # a bug in one program must not end the run
        rec.error = f"{type(e).__name__}: {e}"
    finally:
        if sem is not None:
            sem.release()
    rec.end = time.monotonic() - t0
    return rec


async def _poll(session, urls: list[str], t0: float, out: list, period: float) -> None:
    """Like StatsClient.poll, with the counters summed over `urls` (a router's
    workers): a sample every `period` seconds in which every server answered."""
    async def one(u: str) -> dict | None:
        try:
            async with session.get(u + "/taper/stats",
                                   timeout=aiohttp.ClientTimeout(total=5)) as r:
                return json.loads(await r.text()) if r.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    while True:
        stats = await asyncio.gather(*(one(u) for u in urls))
        if all(st is not None for st in stats):
            out.append({"t": time.monotonic() - t0,
                        **{k: sum(st.get(k, 0) for st in stats) for k in COUNTERS}})
        await asyncio.sleep(period)


async def replay(url: str, programs: list[Program], max_concurrency: int | None = None,
                 progress=None, poll: float = 0.5, drain_timeout: float = 120.0,
                 stats_urls: list[str] | None = None
                 ) -> tuple[list[ProgramRecord], list[dict]]:
    """Run every program; returns their records and the server's stats samples
    (the counters summed over `stats_urls`, default `url`: a router has no
    /taper/stats of its own, its workers do).

    A program still running `drain_timeout` seconds after the last arrival is
    cut off (recorded with error "timeout") and the server's requests are
    aborted, so an overloaded policy cannot stall the benchmark.
    """
    # A fresh connection per request: reusing a keep-alive connection the server
    # had just closed failed a request with ServerDisconnectedError in a live run.
    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=conn) as session:
        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        samples: list[dict] = []
        t0 = time.monotonic()
        poller = asyncio.create_task(_poll(session, stats_urls or [url], t0, samples, poll))
        run_id = uuid.uuid4().hex[:8]
        tasks = {asyncio.create_task(run_program(session, url, p, t0, sem, run_id)): p
                 for p in programs}
        deadline = t0 + max((p.arrival for p in programs), default=0.0) + drain_timeout
        records = []
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, timeout=max(0.0, deadline
                                                                    - time.monotonic()),
                                               return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                records.append(fut.result())
                if progress is not None:
                    progress.update(1)
            if not done and time.monotonic() >= deadline:
                break
        for fut in pending:
            fut.cancel()
            p = tasks[fut]
            records.append(ProgramRecord(p.pid, p.kind, p.arrival, p.arrival,
                                         time.monotonic() - t0, p.ttft_slo, p.tpot_slo,
                                         error="timeout"))
        if pending:
            try:
                async with session.post(url + "/abort_request", json={"abort_all": True},
                                        timeout=aiohttp.ClientTimeout(total=10)):
                    pass
            except (aiohttp.ClientError, TimeoutError):
                pass
        poller.cancel()
    records.sort(key=lambda r: r.pid)
    return records, samples
