"""Real request traces replayed as workloads: `--dataset FORMAT:PATH`.

Formats (each parsed into `TraceRequest`s, sorted by arrival):
- `mooncake`: kvcache-ai/Mooncake's JSONL (`FAST25-release/traces/*.jsonl`): one
  object a line with `timestamp` (ms), `input_length`, `output_length` and
  `hash_ids`, the ids of the prompt's blocks of `BLOCK_TOKENS` tokens (the last
  one partial); equal ids mean an equal prefix up to the end of that block.
- `azure`: the Azure LLM inference traces (2023, 2024): CSV
  `TIMESTAMP,ContextTokens,GeneratedTokens`, TIMESTAMP a date and time of day
  (any number of fractional digits, an optional UTC offset). No sharing.
- `burstgpt`: BurstGPT's CSV, columns `Timestamp` (seconds), `Request tokens`,
  `Response tokens` (others, such as `Model` or `Log Type`, ignored). No sharing.

A trace becomes `Program`s (`to_programs`): each request is a chat request
(one serial stage) with the trace's arrival and lengths, or, for a seeded
`branch_fraction` of them, a branch program over the same prompt. Prompt text
is built block by block so that requests sharing hash ids share text, and a
prefix cache sees the trace's reuse (`prompt_text`, `predicted_hit_rate`).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from bench.workload import KINDS, Program, Stage, WorkloadConfig

FORMATS = ("mooncake", "azure", "burstgpt")
BLOCK_TOKENS = 512  # Mooncake's prefix block, unscaled tokens
BRANCH_FRACTION = 0.3  # default share of trace requests replayed as branch programs
# Words that are one token each, with their leading space, for the tiny model's
# tokenizer (sglang_taper/cpu/tiny_model.py); a space-led word is its own
# pre-token in byte-level BPE, so text joined from blocks tokenizes block by block.
WORDS = (
    "the of to and in is that for it as with was on be by this are or from at an which but "
    "not have has had were they their there what when where who would can could should may "
    "might must shall do does did done make made take given plan step tool call search answer "
    "question reason think branch path result first second third next then"
).split()
_TAG_WORDS = 4  # a block opens with its id in base len(WORDS), lowest digit first
_BLOCK_SALT, _REQUEST_SALT = 0x5EED0001, 0x5EED0002  # keep block and request texts apart
_SPACED = np.array([" " + w for w in WORDS])


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival: float  # seconds after the trace's first request
    input_tokens: int  # prompt tokens, as the trace states them
    output_tokens: int  # generated tokens, as the trace states them
    hash_ids: tuple[int, ...] = ()  # prompt blocks (BLOCK_TOKENS each); () shares nothing


# ------------------------------------------------------------------ parsing


def parse_spec(text: str) -> tuple[str, Path] | None:
    """`FORMAT:PATH` -> (format, path); None for a plain path (a JSONL of programs).
    Raises ValueError for an unknown FORMAT prefix."""
    m = re.fullmatch(r"([A-Za-z][\w-]*):(.+)", text)
    if m is None:
        return None
    if m.group(1) in FORMATS:
        return m.group(1), Path(m.group(2))
    if Path(text).exists():  # a plain path with a colon in it
        return None
    raise ValueError(f"--dataset: unknown trace format {m.group(1)!r} in {text!r} "
                     f"(one of {', '.join(FORMATS)}, or a JSONL of programs)")


def load(fmt: str, path: str | Path) -> list[TraceRequest]:
    """The requests of a trace file, by arrival (seconds from the first)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--dataset: no such file: {path}")
    rows = _mooncake(path) if fmt == "mooncake" else _csv_trace(fmt, path)
    if not rows:
        raise ValueError(f"{path}: no requests in this {fmt} trace")
    rows.sort(key=lambda r: r[0])  # stable: requests of one instant keep file order
    t0 = rows[0][0]
    return [TraceRequest(t - t0, n_in, n_out, ids) for t, n_in, n_out, ids in rows]


def _count(where: str, name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) \
            or value < low:
        raise ValueError(f"{where}: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _mooncake(path: Path) -> list[tuple]:
    rows = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                d = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where}: not JSON: {e}") from None
            if not isinstance(d, dict) or not {"timestamp", "input_length",
                                                  "output_length"} <= d.keys():
                raise ValueError(f"{where}: expected an object with timestamp, input_length, "
                                 "output_length and hash_ids")
            t = d["timestamp"]
            if isinstance(t, bool) or not isinstance(t, int | float) or not t >= 0:
                raise ValueError(f"{where}: timestamp must be milliseconds >= 0, got {t!r}")
            n_in = _count(where, "input_length", d["input_length"], 1)
            n_out = _count(where, "output_length", d["output_length"], 0)
            ids = d.get("hash_ids", [])
            if not isinstance(ids, list) or not all(
                    isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in ids):
                raise ValueError(f"{where}: hash_ids must be a list of integers >= 0")
            if ids and len(ids) != math.ceil(n_in / BLOCK_TOKENS):
                raise ValueError(f"{where}: input_length {n_in} is "
                                 f"{math.ceil(n_in / BLOCK_TOKENS)} blocks of {BLOCK_TOKENS} "
                                 f"tokens, but hash_ids has {len(ids)}")
            rows.append((t / 1e3, n_in, n_out, tuple(ids)))
    return rows


def _csv_rows(path: Path, needed: tuple[str, ...]):
    """(line number, row dict) of a CSV whose header has the `needed` columns."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in needed if c not in header]
        if missing:
            raise ValueError(f"{path}:1: header lacks {', '.join(missing)} "
                             f"(has {', '.join(header) or 'nothing'})")
        reader.fieldnames = header
        for row in reader:
            if any(row.get(c) is None for c in needed):
                raise ValueError(f"{path}:{reader.line_num}: expected {len(header)} columns")
            yield reader.line_num, row


def _int(where: str, name: str, text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: {name} must be an integer, got {text!r}") from None
    return _count(where, name, value, 0)


_DATETIME = re.compile(r"(\d{4})-(\d\d)-(\d\d)[ T](\d\d):(\d\d):(\d\d)(?:\.(\d+))?"
                       r"\s*(Z|[+-]\d\d:?\d\d)?")


def parse_timestamp(text: str) -> float:
    """Seconds since the epoch of `2023-11-16 18:15:46.6805900` (any number of
    fractional digits; an optional `Z` or `+HH:MM` offset, else UTC)."""
    m = _DATETIME.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a date and time like 2023-11-16 18:15:46.68: {text!r}")
    y, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
    tz = timezone.utc
    if m.group(8) and m.group(8) != "Z":
        off = m.group(8).replace(":", "")
        sign = -1 if off[0] == "-" else 1
        tz = timezone(sign * timedelta(hours=int(off[1:3]), minutes=int(off[3:5])))
    try:
        t = datetime(y, mo, d, h, mi, s, tzinfo=tz).timestamp()
    except ValueError as e:
        raise ValueError(f"not a valid date and time: {text!r} ({e})") from None
    return t + (float("0." + m.group(7)) if m.group(7) else 0.0)


def _seconds(text: str) -> float:
    """Seconds >= 0 (BurstGPT's Timestamp, from the start of its trace)."""
    try:
        t = float(text)
    except ValueError:
        t = math.nan
    if not t >= 0:
        raise ValueError(f"must be seconds >= 0, got {text!r}")
    return t


# A CSV trace format: its timestamp column and how to read it, then its prompt
# and output token columns.
_CSV_FORMATS = {
    "azure": ("TIMESTAMP", parse_timestamp, "ContextTokens", "GeneratedTokens"),
    "burstgpt": ("Timestamp", _seconds, "Request tokens", "Response tokens"),
}


def _csv_trace(fmt: str, path: Path) -> list[tuple]:
    time_col, read_time, in_col, out_col = _CSV_FORMATS[fmt]
    rows = []
    for n, row in _csv_rows(path, (time_col, in_col, out_col)):
        where = f"{path}:{n}"
        try:
            t = read_time(row[time_col])
        except ValueError as e:
            raise ValueError(f"{where}: {time_col}: {e}") from None
        rows.append((t, max(1, _int(where, in_col, row[in_col])),
                     _int(where, out_col, row[out_col]), ()))
    return rows


# ------------------------------------------------------------- prompt text


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a fixed, well-spread hash of uint64s."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _words(salt: int, keys: Sequence[int], tokens: Sequence[int]) -> str:
    """The texts named (salt, key), the first `tokens[i]` words of key i's, joined.

    A key's text opens with the key in `_TAG_WORDS` base-len(WORDS) digits,
    lowest first (two keys' texts differ within those words), then has words
    hashed from (key, position): fewer tokens give a prefix of more. Each word
    is led by a space, so texts join on word boundaries.
    """
    n = np.asarray(tokens, dtype=np.int64)
    key = np.repeat(np.asarray(keys, dtype=np.uint64), n)
    pos = (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)).astype(np.uint64)
    base = np.uint64(len(WORDS))
    seed = _mix(np.uint64(salt) ^ (key * np.uint64(0x9E3779B97F4A7C15)))
    digit = (key // base ** np.minimum(pos, np.uint64(_TAG_WORDS - 1))) % base
    idx = np.where(pos < _TAG_WORDS, digit, _mix(seed + pos) % base)
    return "".join(_SPACED[idx].tolist())


def block_text(hash_id: int, tokens: int) -> str:
    """The text of prompt block `hash_id` cut to `tokens` words (one token each
    with the tiny model's tokenizer): every request that holds this block holds
    the same text, or a prefix of it (a partial last block)."""
    return _words(_BLOCK_SALT, [hash_id], [tokens])


def scaled_blocks(req: TraceRequest, length_scale: float = 1.0) -> list[int]:
    """Tokens of each of the request's blocks after `length_scale`: block i
    spans tokens round(i B) to round((i + 1) B), B = BLOCK_TOKENS * length_scale,
    so a block has one length wherever it is whole; the last block ends at the
    scaled prompt length (`scaled(input_tokens)`)."""
    total = scaled(req.input_tokens, length_scale)
    size = BLOCK_TOKENS * length_scale
    ends = [min(total, round((i + 1) * size)) for i in range(len(req.hash_ids) - 1)] + [total]
    return [b - a for a, b in zip([0, *ends[:-1]], ends)]


def scaled(tokens: int, length_scale: float) -> int:
    """A token length after `length_scale`, at least 1 token."""
    return max(1, round(tokens * length_scale))


def prompt_text(req: TraceRequest, index: int, length_scale: float = 1.0) -> str:
    """About `scaled(req.input_tokens)` tokens of text: the request's blocks'
    texts joined, or (no hash ids) text of its own, keyed by its `index`."""
    if not req.hash_ids:
        return _words(_REQUEST_SALT, [index], [scaled(req.input_tokens, length_scale)])
    return _words(_BLOCK_SALT, req.hash_ids, scaled_blocks(req, length_scale))


def predicted_hit_rate(requests: Sequence[TraceRequest], length_scale: float = 1.0) -> float:
    """Share of prompt tokens (after `length_scale`) a prefix cache finds, from
    the hash ids alone: cached / prompt tokens over all requests, in arrival order.

    Assumes a radix cache of unbounded capacity (nothing evicted) that holds
    every earlier request's prompt by the time a request arrives (no overlap
    with a predecessor's prefill), with prompts built by `prompt_text`. A
    request finds the leading blocks of its hash ids that form a chain some
    earlier request held (block i only after blocks 0..i-1); a block an earlier
    request held shorter (its partial last block) counts that shorter length
    and ends the match. As in SGLang, at most all but one prompt token are
    cached. Requests without hash ids find nothing. Ignored: a BOS token, and
    tokens that match by chance (the first words of unrelated blocks differ).
    """
    children: dict[tuple[int, int], int] = {}  # (parent node, hash id) -> node
    held: list[int] = [0]  # tokens of each node's block that some request held
    cached = total = 0
    for req in requests:
        sizes = scaled_blocks(req, length_scale) if req.hash_ids else []
        n_prompt = scaled(req.input_tokens, length_scale)
        total += n_prompt
        node, hit, matching = 0, 0, True
        for h, size in zip(req.hash_ids, sizes):
            child = children.get((node, h))
            if child is None:
                child = children[(node, h)] = len(held)
                held.append(0)
                matching = False
            elif matching:
                hit += min(size, held[child])
                matching = held[child] >= size
            held[child] = max(held[child], size)
            node = child
        cached += min(hit, n_prompt - 1)
    return cached / total if total else 0.0


# -------------------------------------------------------------- programs


def native_rate(requests: Sequence[TraceRequest]) -> float:
    """The trace's mean arrival rate (requests/s) over its span; inf if every
    request arrives at once."""
    span = requests[-1].arrival - requests[0].arrival if requests else 0.0
    return (len(requests) - 1) / span if span > 0 else math.inf


def tick(requests: Sequence[TraceRequest]) -> float:
    """The trace's timestamp resolution in seconds when its arrivals come in ticks
    (at least half of the gaps between consecutive requests are 0: Mooncake's
    conversation trace stamps about 9 requests alike every 3 s), else 0. The
    tick is the most common positive gap, rounded to the millisecond."""
    gaps = np.diff([r.arrival for r in requests])
    if len(gaps) < 2 or (gaps == 0).mean() < 0.5 or not (gaps > 0).any():
        return 0.0
    vals, counts = np.unique(np.round(gaps[gaps > 0], 3), return_counts=True)
    return float(vals[counts.argmax()])


def to_programs(requests: Sequence[TraceRequest], cfg: WorkloadConfig,
                branch_fraction: float = BRANCH_FRACTION,
                spread_ticks: bool = True) -> tuple[list[Program], float]:
    """The trace as programs arriving at a mean 1 program/s from 0 on (scale
    them with `bench.workload.at_rate`), and its native rate (programs/s,
    `native_rate`).

    Lengths are scaled by `cfg.length_scale`. A request is a chat (its input
    and output lengths) unless a draw from `cfg.seed` makes it, with
    probability `branch_fraction`, a branch program of one of `cfg.kinds`
    over the same prompt, its stages drawn as `bench.workload.generate` draws
    them from cfg's ranges (the trace's output length then unused).

    `spread_ticks`: a trace stamped in ticks (`tick`) says only in which tick a
    request arrived; its requests are spread uniformly over their tick (a draw
    from `cfg.seed` of its own), not replayed as simultaneous bursts that no
    real arrival process has. Programs keep the trace's order in their ids.
    """
    if not 0 <= branch_fraction <= 1:
        raise ValueError(f"branch_fraction must be in [0, 1], got {branch_fraction}")
    rate = native_rate(requests)
    rng = np.random.default_rng(cfg.seed)
    kinds = getattr(cfg, "kinds", KINDS)
    k = cfg.length_scale
    width = tick(requests) if spread_ticks else 0.0
    jitter = (np.random.default_rng([cfg.seed, 0x71C]).uniform(0.0, width, len(requests))
              if width else np.zeros(len(requests)))
    out = []
    for i, req in enumerate(requests):
        branch = rng.random() < branch_fraction
        kind = kinds[int(rng.integers(len(kinds)))] if branch else "chat"
        stages = (_branch_stages(kind, cfg, rng) if branch
                  else [Stage("serial", [scaled(req.output_tokens, k)])])
        arrival = ((req.arrival + jitter[i] - requests[0].arrival) * rate
                   if math.isfinite(rate) else 0.0)
        out.append(Program(f"p{i:05d}", kind, arrival, prompt_text(req, i, k), cfg.ttft_slo,
                           cfg.tpot_slo, stages, scaled(req.input_tokens, k)))
    out.sort(key=lambda p: p.arrival)
    return out, rate


def _branch_stages(kind: str, cfg: WorkloadConfig, rng: np.random.Generator) -> list[Stage]:
    """A branch program's stages, drawn as `bench.workload.generate` draws them."""
    def ri(lo_hi: tuple[int, int], size: int | None = None):
        return rng.integers(lo_hi[0], lo_hi[1] + 1, size=size)

    serial_r, branch_r = cfg.tokens("serial_tokens"), cfg.tokens("branch_tokens")

    def serial() -> Stage:
        return Stage("serial", [int(ri(serial_r))])

    def parallel() -> Stage:
        return Stage("parallel", ri(branch_r, int(ri(cfg.width))).tolist())

    if kind == "agentic_tools":
        half = (max(1, branch_r[0] // 2), max(1, branch_r[1] // 2))
        rounds_r = getattr(cfg, "rounds", (1, 1))
        stages = [serial()]
        for _ in range(1 if rounds_r == (1, 1) else int(ri(rounds_r))):
            w = int(ri(cfg.width))
            stages += [Stage("tools", ri(half, w).tolist(), float(rng.uniform(*cfg.tool_delay)),
                             ri(half, w).tolist()), serial()]
        return stages
    if kind == "tree_of_thought":
        return [serial(), parallel(), serial(), parallel(), serial()]
    return [serial(), parallel(), serial()]


def describe(fmt: str, path: str | Path, requests: Sequence[TraceRequest],
             length_scale: float, branch_fraction: float) -> dict:
    """What a run replayed, for its result: the trace, its native rate
    (programs/s; None if all arrive at once) and predicted prefix-cache hit rate."""
    rate = native_rate(requests)
    return {"format": fmt, "path": str(path), "requests": len(requests),
            "native_rate": rate if math.isfinite(rate) else None,
            "predicted_hit_rate": predicted_hit_rate(requests, length_scale),
            "length_scale": length_scale, "branch_fraction": branch_fraction,
            "tick_s": tick(requests)}
