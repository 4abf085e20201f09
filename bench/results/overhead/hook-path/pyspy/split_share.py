"""The share of `SchedulerRuntime.regulate`'s py-spy samples spent in the batch
split (`sglang_taper/adapter/batch.py`'s `split`: SGLang's `filter_batch` twice
and the copies), per profile in this folder:

    python bench/results/overhead/hook-path/pyspy/split_share.py
"""

from __future__ import annotations

import gzip
from pathlib import Path


def share(path: Path) -> tuple[int, int]:
    regulate = split = 0
    with gzip.open(path, "rt") as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if "SchedulerRuntime.regulate" in stack:
                regulate += int(n)
                split += int(n) if ";split (" in stack else 0
    return regulate, split


if __name__ == "__main__":
    for path in sorted(Path(__file__).parent.glob("*.txt.gz")):
        regulate, split = share(path)
        print(f"{path.name:24s} regulate {regulate:4d} samples, split {split:3d} "
              f"({split / max(1, regulate):.0%})")
