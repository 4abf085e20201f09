"""Local assets for running SGLang without a GPU: the libcuda stand-in and the
tiny model. Both are built on this machine, never downloaded."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

STUB_SOURCE = Path(__file__).with_name("libcuda_stub.c")


def taper_home() -> Path:
    """Where built assets live: $TAPER_HOME, else ~/.cache/sglang-taper."""
    env = os.environ.get("TAPER_HOME")
    return Path(env) if env else Path.home() / ".cache" / "sglang-taper"


def stub_dir() -> Path:
    return taper_home() / "lib"


def tiny_model_dir() -> Path:
    return taper_home() / "models" / "tiny-llama"


def has_gpu() -> bool:
    """An NVIDIA device node is present (cheap: no torch import)."""
    return Path("/dev/nvidiactl").exists() or Path("/dev/nvidia0").exists()


def build_stub() -> Path:
    """Compile libcuda.so.1 from the C source unless a build of this source exists."""
    out = stub_dir() / "libcuda.so.1"
    digest = hashlib.sha256(STUB_SOURCE.read_bytes()).hexdigest()
    stamp = out.with_suffix(".sha256")
    if out.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return out
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler found (gcc or cc) to build the libcuda stand-in")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    subprocess.run(
        [cc, "-shared", "-fPIC", "-O2", "-Wl,-soname,libcuda.so.1", "-o", str(tmp),
         str(STUB_SOURCE)],
        check=True,
    )
    tmp.replace(out)
    stamp.write_text(digest + "\n")
    return out


def ensure_cpu_assets(seed: int = 0) -> tuple[Path, Path]:
    """Build (if needed) and return (stub library dir, tiny model dir)."""
    from sglang_taper.cpu.tiny_model import build_tiny_model

    stub = build_stub()
    model = build_tiny_model(tiny_model_dir(), seed=seed)
    return stub.parent, model


def cpu_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for an SGLang process on a CPU-only machine."""
    env = dict(os.environ if base is None else base)
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    lib = str(stub_dir())
    old = env.get("LD_LIBRARY_PATH", "")
    if lib not in old.split(":"):
        env["LD_LIBRARY_PATH"] = f"{lib}:{old}" if old else lib
    return env
