"""An async streaming client for SGLang's /generate that records token times."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import aiohttp

from sglang_taper.meta import as_label
from sglang_taper.router import ROUTING_KEY_HEADER


@dataclass(slots=True)
class Completion:
    """One /generate call as the client saw it. Times: seconds, time.monotonic()."""

    start: float
    first_token: float | None = None
    end: float | None = None
    token_times: list[float] = field(default_factory=list)  # one per output token
    text: str = ""
    output_tokens: int = 0
    cached_tokens: int = 0
    prompt_tokens: int = 0
    finish: str | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (seconds)."""
        if self.output_tokens < 2 or self.end is None or self.first_token is None:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


async def generate(session: aiohttp.ClientSession, url: str, text: str, max_tokens: int,
                   custom_params: dict | None = None, temperature: float = 0.0,
                   rid: str | None = None, timeout: float = 600.0,
                   routing_key: str | None = None) -> Completion:
    """Stream one generation; never raises for server or network errors (they
    land in `Completion.error`). `routing_key`: the program the request belongs
    to, for SGLang's router (sent in its header; a single server ignores it)."""
    sp = {"max_new_tokens": max_tokens, "temperature": temperature, "ignore_eos": True}
    if routing_key:  # the program, also for group-affine DP inside one server
        custom_params = {**(custom_params or {}), "taper_program": routing_key}
    if custom_params:
        sp["custom_params"] = custom_params
    body = {"text": text, "sampling_params": sp, "stream": True}
    label = as_label(custom_params)
    if label is not None:  # SGLang's router keeps custom_labels, not custom_params
        body["custom_labels"] = label
    if rid is not None:
        body["rid"] = rid
    c = Completion(start=time.monotonic())
    try:
        headers = {ROUTING_KEY_HEADER: routing_key} if routing_key else None
        async with session.post(url + "/generate", json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                c.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                c.end = time.monotonic()
                return c
            async for raw in resp.content:
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                now = time.monotonic()
                data = json.loads(line[5:])
                meta = data.get("meta_info", {})
                n = int(meta.get("completion_tokens", 0))
                if n > c.output_tokens:
                    if c.first_token is None:
                        c.first_token = now
                    c.token_times.extend([now] * (n - c.output_tokens))
                    c.output_tokens = n
                c.text = data.get("text", c.text)
                c.cached_tokens = int(meta.get("cached_tokens", 0))
                c.prompt_tokens = int(meta.get("prompt_tokens", 0))
                fr = meta.get("finish_reason")
                if fr:
                    c.finish = fr.get("type") if isinstance(fr, dict) else str(fr)
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        c.error = f"{type(e).__name__}: {e}"
    c.end = time.monotonic()
    return c
