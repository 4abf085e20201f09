"""TaperEndpoint's request shaping, without a server (one function each)."""

from __future__ import annotations

from types import SimpleNamespace

from sglang_taper import TaperEndpoint


def _endpoint() -> TaperEndpoint:
    ep = TaperEndpoint.__new__(TaperEndpoint)  # no server: __init__ would query it
    ep.ttft, ep.tpot, ep.critical_branches = 0.5, 0.01, False
    return ep


def test_prefix_warm_ups_are_greedy_and_untagged():
    data = {"text": "prefix", "sampling_params": {"max_new_tokens": 0}}
    _endpoint()._add_images(SimpleNamespace(images_=[]), data)
    assert data["sampling_params"] == {"max_new_tokens": 0, "temperature": 0.0}


def test_generations_keep_their_sampling_and_carry_the_slo():
    sp = {"max_new_tokens": 8, "temperature": 0.7}
    _endpoint()._add_images(SimpleNamespace(images_=[]), {"text": "x", "sampling_params": sp})
    assert sp["temperature"] == 0.7
    assert sp["custom_params"]["taper_ttft"] == 0.5
    assert sp["custom_params"]["taper_tpot"] == 0.01
