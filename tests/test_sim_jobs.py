"""`taper sim` spreads a sweep over worker processes (--jobs): each grid rate and
each bisection is a task, and the results are those of one process."""

from __future__ import annotations

import json

from bench.sim import cli


def _runs(path) -> list[dict]:
    runs = json.loads((path / "result.json").read_text())["runs"]
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in runs]


def test_a_grid_on_two_workers_gives_one_workers_results(tmp_path, monkeypatch):
    tasks = []
    task = cli._task
    monkeypatch.setattr(cli, "_task", lambda args: tasks.append(args[3]) or task(args))
    args = ["--policies", "off,taper", "--num-prompts", "12", "--sweep", "0.4,0.8,1.6",
            "--quiet", "--no-plots"]
    assert cli.main(args + ["--jobs", "1", "--result-dir", str(tmp_path / "one")]) == 0
    # One task per (policy, rate): a grid of one policy uses as many cores as rates.
    assert [spec.grid for spec in tasks] == [(r,) for r in (0.4, 0.8, 1.6)] * 2
    monkeypatch.undo()  # the workers take the module's own function
    assert cli.main(args + ["--jobs", "2", "--result-dir", str(tmp_path / "two")]) == 0
    one, two = _runs(tmp_path / "one"), _runs(tmp_path / "two")
    assert one == two and len(one) == 6
    assert [r["probe"] for r in one] == [0, 1, 2, 0, 1, 2]
