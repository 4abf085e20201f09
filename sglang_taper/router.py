"""`taper router`: many `taper serve` workers behind SGLang's router
(`sglang-router`, an optional dependency), with program affinity.

A TAPER program (all its serial stages and every branch of every fork) must
run on one worker: its branches share the prefix KV there, and TAPER regulates
a group only where all of it runs. Clients say which program a request belongs
to with the routing-key header; `TaperEndpoint` and `taper bench` send it on
every request. What sglang-router 0.3.2 does with it (checked on loopback, see
README "Behind SGLang's router"):

- `--policy manual` (the default here): the first request of a key picks a
  worker (`--assignment-mode`: random, min_load, min_group), every later one
  goes to the same worker while it is available. A request with no key, or an
  empty one, goes to a random worker: manual cannot fall back to cache_aware,
  and the router has no per-request policy.
- any other policy ignores the key (and `x-smg-target-worker`).
- a dead worker: requests to it fail at the connection and are retried (up to
  `--retry-max-retries` attempts, the worker chosen again each time); once
  `--cb-failure-threshold` failures open its circuit breaker the key moves to a
  live worker. We set the threshold to 3, below the 5 attempts, so that a
  request the router had not yet sent, and a non-streaming one cut off in
  flight (re-sent from scratch), go to a live worker. A streaming response
  already under way cannot be retried: the client sees it end early.
- it re-serializes /generate bodies without `sampling_params.custom_params`:
  TAPER's metadata does not reach the workers on /generate (/v1/completions
  keeps it), so groups behind this router are not regulated (known gap).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sglang_taper.serve import has_flag
from sglang_taper.server import ServerProcess, free_port, log_tail, stop_group

# The header sglang-router reads for sticky routing (policy `manual`).
ROUTING_KEY_HEADER = "x-smg-routing-key"
ROUTER_VERSION = "0.3.2"
INSTALL_HINT = ("install it with: pip install 'sglang-taper[router]' "
                f"(or pip install sglang-router=={ROUTER_VERSION})")
POLICIES = ("manual", "cache_aware", "round_robin", "random", "power_of_two")

# Router flags we set unless the user passed them (flag -> value, None: a switch).
ROUTER_DEFAULTS: tuple[tuple[str, str | None], ...] = (
    ("--policy", "manual"),
    # A new program goes to the worker with the fewest programs in flight.
    ("--assignment-mode", "min_group"),
    # Fewer failures than the 5 attempts a request gets: a dead worker's circuit
    # opens within one request's retries, whose last attempts reach a live worker.
    ("--cb-failure-threshold", "3"),
    ("--log-level", "warn"),
    ("--shutdown-grace-period-secs", "5"),
)


class RouterMissing(RuntimeError):
    """sglang-router is not installed; the message says how to install it."""


def require_router() -> None:
    if importlib.util.find_spec("sglang_router") is None:
        raise RouterMissing(f"sglang-router is not installed; {INSTALL_HINT}")


def router_command(worker_urls: Sequence[str], host: str, port: int,
                   router_args: Sequence[str] = ()) -> list[str]:
    """The `python -m sglang_router.launch_router` command line: our defaults for
    the flags `router_args` does not set, then `router_args` unchanged."""
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", host,
           "--port", str(port), "--worker-urls", *worker_urls]
    for flag, value in ROUTER_DEFAULTS:
        if not has_flag(router_args, flag):
            cmd += [flag] if value is None else [flag, value]
    if not has_flag(router_args, "--prometheus-port"):  # its default 29000 may be taken
        cmd += ["--prometheus-port", str(free_port())]
    return cmd + list(router_args)


class RouterProcess:
    """sglang-router in front of `worker_urls`, in its own session (like ServerProcess)."""

    def __init__(self, worker_urls: Sequence[str], *, host: str = "127.0.0.1",
                 port: int | None = None, router_args: Sequence[str] = (),
                 log_path: Path | str | None = None) -> None:
        require_router()
        self.worker_urls = list(worker_urls)
        self.host = host
        self.port = port or free_port()
        self.cmd = router_command(self.worker_urls, host, self.port, router_args)
        self.log_path = Path(log_path or f"/tmp/taper-router-{self.port}.log")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def readiness(self) -> dict:
        """The router's /readiness ({} if it cannot answer yet)."""
        try:
            with urllib.request.urlopen(self.url + "/readiness", timeout=2) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # 503 while not ready, with the same body
            try:
                return json.loads(e.read())
            except ValueError:
                return {}
        except (OSError, ValueError):
            return {}

    def start(self, timeout: float = 120.0) -> RouterProcess:
        """Start and wait until every worker is registered and healthy."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited with code {self.proc.returncode} during "
                                   f"start; log {self.log_path}:\n{log_tail(self.log_path)}")
            if self.readiness().get("healthy_workers") == len(self.worker_urls):
                return self
            time.sleep(0.25)
        last = self.readiness()
        self.stop()
        raise RuntimeError(f"router not ready within {timeout:.0f} s ({last}); log "
                           f"{self.log_path}:\n{log_tail(self.log_path)}")

    def stop(self, timeout: float = 15.0) -> None:
        # SIGTERM starts a graceful shutdown, which can wait on open connections
        stop_group(self.proc, timeout)

    def __enter__(self) -> RouterProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def worker_args(serve_args: Sequence[str]) -> list[str]:
    """`taper serve` arguments for workers started side by side. On the CPU
    engine SGLang checks at start that the memory fraction leaves room for the
    KV cache, and counts a sibling worker's allocation under way as used: the
    0.05 default can fail when two load at once. The KV size there is
    `--max-total-tokens`, so a larger fraction changes nothing else."""
    from sglang_taper.cpu import assets

    args = list(serve_args)
    if not assets.has_gpu() and not has_flag(args, "--mem-fraction-static"):
        args += ["--mem-fraction-static", "0.3"]
    return args


class Fleet:
    """`workers` fresh `taper serve` processes (started side by side) behind one
    router; or the router alone in front of `worker_urls`."""

    def __init__(self, workers: int = 0, serve_args: Sequence[str] = (),
                 worker_urls: Sequence[str] = (), *, host: str = "127.0.0.1",
                 port: int | None = None, router_args: Sequence[str] = (),
                 log_dir: Path | str = "/tmp/taper-router-logs") -> None:
        require_router()
        if bool(workers) == bool(worker_urls):
            raise ValueError("give either a number of workers or worker URLs")
        self.log_dir = Path(log_dir)
        self.servers = [ServerProcess(worker_args(serve_args),
                                      log_path=self.log_dir / f"worker-{i}.log")
                        for i in range(workers)]
        urls = list(worker_urls) or [s.url for s in self.servers]
        self.router = RouterProcess(urls, host=host, port=port, router_args=router_args,
                                    log_path=self.log_dir / "router.log")

    @property
    def url(self) -> str:
        return self.router.url

    @property
    def worker_urls(self) -> list[str]:
        return self.router.worker_urls

    def start(self, timeout: float = 300.0) -> Fleet:
        try:
            if self.servers:
                with ThreadPoolExecutor(len(self.servers)) as pool:
                    for f in [pool.submit(s.start, timeout) for s in self.servers]:
                        f.result()
            self.router.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.router.stop()
        for s in self.servers:
            s.stop()

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="taper router", allow_abbrev=False,
        description="Start sglang-router in front of `taper serve` workers, with program "
        "affinity: requests that carry the routing-key header (" + ROUTING_KEY_HEADER
        + "; TaperEndpoint and taper bench send the program id) stay on one worker. "
        "Unknown flags go to the router (python -m sglang_router.launch_router --help); "
        "after --, arguments for every `taper serve` started with --workers.",
        epilog="example: taper router --workers 2 --port 30000 -- --taper-policy taper")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workers", type=int, metavar="N", help="start N `taper serve` workers "
                     "on free loopback ports")
    src.add_argument("--worker-urls", nargs="+", metavar="URL", help="running workers")
    p.add_argument("--host", default="127.0.0.1", help="router address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=30000, help="router port (default 30000)")
    p.add_argument("--policy", choices=POLICIES, default="manual",
                   help="manual (default): sticky per routing key, random without one; any "
                   "other policy ignores the key")
    p.add_argument("--log-dir", default="taper-router-logs",
                   help="worker and router logs (default ./taper-router-logs)")
    return p


def main(argv: list[str]) -> int:
    own, serve_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) \
        if "--" in argv else (argv, [])
    ns, router_args = _parser().parse_known_args(own)
    try:
        require_router()
        if ns.workers is not None and ns.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {ns.workers}")
        if serve_args and ns.workers is None:
            raise ValueError("arguments after -- are for workers started with --workers")
        fleet = Fleet(ns.workers or 0, serve_args, ns.worker_urls or (), host=ns.host,
                      port=ns.port, router_args=["--policy", ns.policy, *router_args],
                      log_dir=ns.log_dir)
    except (RouterMissing, ValueError) as e:
        print(f"taper router: error: {e}", file=sys.stderr)
        return 2
    if ns.policy != "manual":
        print(f"taper router: policy {ns.policy} ignores the routing key: programs are not "
              "kept on one worker", file=sys.stderr)
    # Unwind on SIGTERM as on Ctrl-C, so that the workers this started stop too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.monotonic()
    try:
        with fleet:
            print(f"[router] {fleet.url} -> {' '.join(fleet.worker_urls)} (ready in "
                  f"{time.monotonic() - t0:.0f} s; logs in {ns.log_dir})", flush=True)
            while fleet.router.proc.poll() is None:
                time.sleep(1)
            print(f"[router] router exited with code {fleet.router.proc.returncode}; log "
                  f"{fleet.router.log_path}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        return 0
    except RuntimeError as e:
        print(f"taper router: error: {e}", file=sys.stderr)
        return 1
