"""Start and stop a real SGLang server process (for tests and benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_group(proc: subprocess.Popen | None, timeout: float,
               first: signal.Signals = signal.SIGTERM) -> None:
    """Send `first` (SIGTERM) to the process group `proc` leads; SIGKILL it after
    `timeout` seconds."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, first)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


def _record_start(cmd: Sequence[str], seconds: float) -> None:
    """Append one JSON line per server start to $TAPER_SERVER_START_LOG, if set:
    the test suite counts its server starts (and the time they take) with it."""
    path = os.environ.get("TAPER_SERVER_START_LOG")
    if not path:
        return
    import json

    row = {"seconds": round(seconds, 2), "args": list(cmd[3:]),
           "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


class ServerProcess:
    """One server: `taper serve ...` by default, or any SGLang command line.

    The process runs in its own session; stop() signals the whole process group,
    so SGLang's scheduler and detokenizer children go with it.
    """

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        cmd: Sequence[str] | None = None,
        port: int | None = None,
        log_path: Path | str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        base = [sys.executable, "-m", "sglang_taper", "serve"] if cmd is None else list(cmd)
        self.cmd = [*base, "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.log_path = Path(log_path or f"/tmp/taper-server-{self.port}.log")
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> ServerProcess:
        """Start and wait for /health; on failure stop it and raise with the log's tail."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        log.close()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with code {self.proc.returncode} during start; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            if self.healthy():
                self.start_seconds = time.monotonic() - t0
                _record_start(self.cmd, self.start_seconds)
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(
            f"server not healthy within {timeout:.0f} s; log {self.log_path}:\n"
            f"{log_tail(self.log_path)}"
        )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """SGLang's own shutdown: it drains, then waits about 5 s before exiting."""
        stop_group(self.proc, timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group at once: for a server whose work is
        over and checked (the test suite's), where the drain buys nothing.
        SGLang leaves the same /dev/shm and /tmp files as after stop()."""
        stop_group(self.proc, 10.0, first=signal.SIGKILL)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
