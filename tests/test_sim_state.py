"""The simulator's request state against plain Python models of it: the running
set's columns and token times, and the waiting queue's latency-critical columns."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from bench.sim.state import GENERATED, RID, RunningSet, WaitingQueue, _compact


@pytest.mark.parametrize("removed", [[0], [5], [39], [3, 4, 5], [0, 39], list(range(0, 40, 2))])
def test_compacting_keeps_the_order_of_the_rest(removed):
    block = np.arange(3 * 50).reshape(3, 50)
    expected = np.delete(block[:, :40], removed, axis=1)
    _compact(block, 40, np.array(removed))
    assert (block[:, :40 - len(removed)] == expected).all()


def test_the_running_set_matches_a_list_of_sequences():
    rng = np.random.default_rng(5)
    running = RunningSet(capacity=4)  # grows, and packs its token buffer, on the way
    model: list[dict] = []  # rid, generated, max_new, token times
    rid = 0
    for step in range(400):
        for _ in range(int(rng.integers(0, 4))):
            rid += 1
            max_new = int(rng.integers(2, 40))
            running.add(rid, int(rng.integers(-1, 5)), 0, 1, 0, max_new, 100, 1.0, 0.05,
                        0.0, float(step))
            model.append({"rid": rid, "gen": 1, "max_new": max_new, "times": [float(step)]})
        if not model:
            continue
        view = running.view(float(step), 0)
        assert view.ids.tolist() == [m["rid"] for m in model]
        assert view.generated.tolist() == [m["gen"] for m in model]
        keep = np.sort(rng.choice(len(model), int(rng.integers(1, len(model) + 1)),
                                  replace=False))
        end = step + 0.5
        done = running.advance(keep, end)
        for i in keep.tolist():
            model[i]["gen"] += 1
            model[i]["times"].append(end)
        assert done.tolist() == [i for i in keep.tolist()
                                 if model[i]["gen"] >= model[i]["max_new"]]
        # The view holds copies: the step wrote the running set, not the view.
        assert view.generated.tolist() == [m["gen"] - (i in set(keep.tolist()))
                                           for i, m in enumerate(model)]
        assert running.ints[GENERATED, :running.n].tolist() == [m["gen"] for m in model]
        if len(done):
            out = running.pop(done)
            gone = [model[i] for i in done.tolist()]
            assert out == [(m["rid"], m["gen"], m["times"]) for m in gone]
            model = [m for i, m in enumerate(model) if i not in set(done.tolist())]
        assert running.ints[RID, :running.n].tolist() == [m["rid"] for m in model]


def test_the_waiting_queues_critical_columns_follow_the_queue():
    rng = np.random.default_rng(2)
    queue, model = WaitingQueue(capacity=2), deque()
    handed = []  # columns handed out earlier stay as they were
    for i in range(3000):
        if rng.random() < 0.55 or not model:
            critical = bool(rng.random() < 0.4)
            arrival, ttft = float(i), float(rng.uniform(0.5, 3))
            queue.append(i, critical, arrival, ttft)
            model.append((i, critical, arrival, ttft))
        else:
            assert queue.popleft() == model.popleft()[0]
        arrival, ttft = queue.critical()
        crit = [m for m in model if m[1]]
        assert arrival.tolist() == [m[2] for m in crit]
        assert ttft.tolist() == [m[3] for m in crit]
        assert list(queue) == [m[0] for m in model] and len(queue) == len(model)
        if i % 97 == 0:
            handed.append((arrival, arrival.tolist()))
    assert all(a.tolist() == values for a, values in handed)
