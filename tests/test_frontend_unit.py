"""Request shaping without a server: TaperEndpoint's tags on fork branches and
their copies, and the server-side tag of n>1 requests (one function each)."""

from __future__ import annotations

import json
import pkgutil
from types import SimpleNamespace

import pytest
from sglang.lang.interpreter import ProgramState, StreamExecutor

from sglang_taper import TaperEndpoint
from sglang_taper.adapter import frontend, server
from sglang_taper.meta import parse_meta


def _endpoint() -> TaperEndpoint:
    ep = TaperEndpoint.__new__(TaperEndpoint)  # no server: __init__ would query it
    ep.ttft, ep.tpot, ep.critical_branches = 0.5, 0.01, False
    frontend._patch_fork()
    return ep


def test_prefix_warm_ups_are_untagged_and_unchanged():
    data = {"text": "prefix", "sampling_params": {"max_new_tokens": 0}}
    _endpoint()._add_images(SimpleNamespace(images_=[]), data)
    assert data["sampling_params"] == {"max_new_tokens": 0}


def test_a_programs_prefix_commit_names_only_its_program(executors):
    ep, root = executors
    data = {"text": "prefix", "sampling_params": {"max_new_tokens": 0}}
    ep._add_images(root, data)
    custom = data["sampling_params"]["custom_params"]
    assert custom == {"taper_program": f"prog-{root.sid}"}  # placed with it, not a branch
    assert json.loads(data["custom_labels"]["taper"]) == custom  # what a router passes on


def test_generations_keep_their_sampling_and_carry_the_slo():
    sp = {"max_new_tokens": 8, "temperature": 0.7}
    _endpoint()._add_images(SimpleNamespace(images_=[]), {"text": "x", "sampling_params": sp})
    assert sp["temperature"] == 0.7
    assert sp["custom_params"]["taper_ttft"] == 0.5
    assert sp["custom_params"]["taper_tpot"] == 0.01


def _sent_meta(ep: TaperEndpoint, exe: StreamExecutor):
    """The metadata a generation from `exe` would carry."""
    sp = {"max_new_tokens": 8}
    ep._add_images(exe, {"text": "x", "sampling_params": sp})
    return parse_meta(sp["custom_params"])


@pytest.fixture()
def executors():
    """A root executor (no thread, nothing to send) and every executor forked from
    it during the test, ended afterwards (forked ones run a worker thread each)."""
    ep = _endpoint()
    made: list[StreamExecutor] = []
    root = StreamExecutor(ep, {}, None, chat_template=object(), stream=False,
                          use_thread=False)
    original = StreamExecutor.fork

    def recording(self, *args, **kwargs):
        exes = original(self, *args, **kwargs)
        made.extend(exes)
        return exes

    StreamExecutor.fork = recording
    try:
        yield ep, root
    finally:
        StreamExecutor.fork = original
        for exe in made:
            exe.end()


def test_a_copy_or_fork_1_of_a_branch_keeps_its_tag(executors):
    ep, root = executors
    branches = root.fork(3)
    group = _sent_meta(ep, branches[1])
    assert (group.branch, group.width, group.parent) == (1, 3, None)
    (again,) = branches[1].fork(1)
    with ProgramState(branches[1]).copy() as state:
        copied = state.stream_executor
    for exe in (again, copied):
        assert _sent_meta(ep, exe) == group
    # A copy of a copy, and a nested fork inside a copy, still know their branch.
    (deeper,) = again.fork(1)
    assert _sent_meta(ep, deeper) == group
    nested = copied.fork(2)
    inner = [_sent_meta(ep, e) for e in nested]
    assert [m.branch for m in inner] == [0, 1] and {m.width for m in inner} == {2}
    assert inner[0].group == inner[1].group != group.group
    assert {m.parent for m in inner} == {group.group}


def test_a_copy_of_serial_work_stays_serial(executors):
    ep, root = executors
    (copy,) = root.fork(1)
    meta = _sent_meta(ep, copy)
    assert meta.group is None and meta.tpot == 0.01


# ------------------------------------------------------------- n > 1 on the server


def _normalized(**kwargs):
    from sglang.srt.managers.io_struct import GenerateReqInput

    obj = GenerateReqInput(**kwargs)
    obj.normalize_batch_and_arguments()
    return obj


def _groups(obj, count: int) -> list:
    return [parse_meta(obj[i].sampling_params.get("custom_params")) for i in range(count)]


def test_the_n_sample_tag_hooks_a_method_sglang_has():
    target = pkgutil.resolve_name(server._NORMALIZE.rsplit(".", 1)[0])
    assert callable(getattr(target, server._NORMALIZE.rsplit(".", 1)[1]))


def test_each_prompt_of_an_n_request_is_one_group_of_width_n():
    obj = _normalized(text=["a", "b"], sampling_params={"n": 3, "max_new_tokens": 4,
                                                        "custom_params": {"taper_tpot": 0.2}})
    obj[0]  # SGLang caches sub-requests; a cached one must carry the tag too
    server._tag_parallel_sampling(obj)
    # The tokenizer manager expands prompt i from obj[i], i < batch_size.
    first, second = _groups(obj, 2)
    assert first.group.startswith("n-") and second.group.startswith("n-")
    assert first.group != second.group
    assert first.width == second.width == 3 and first.branch is None  # numbered on arrival
    assert first.tpot == 0.2  # the client's other keys stay
    assert [m.group for m in _groups(obj, 6)] == [first.group, second.group] * 3


def test_a_single_prompt_n_request_is_tagged_and_a_client_group_is_kept():
    single = _normalized(text="a", sampling_params={"n": 4, "max_new_tokens": 4})
    server._tag_parallel_sampling(single)
    (meta,) = _groups(single, 1)
    assert meta.width == 4 and meta.group.startswith("n-")
    own = {"taper_group": "mine", "taper_width": 2}
    client = _normalized(text="a", sampling_params={"n": 2, "custom_params": own})
    server._tag_parallel_sampling(client)
    assert client[0].sampling_params["custom_params"] == own


def test_n_1_and_invalid_custom_params_are_left_alone():
    plain = _normalized(text=["a", "b"], sampling_params={"max_new_tokens": 4})
    server._tag_parallel_sampling(plain)
    assert "custom_params" not in plain[0].sampling_params
    # Left for verify's 400: a group added here would make taper_branch look valid.
    for custom in ("x", [1], {"taper_branch": 1}):
        odd = _normalized(text="a", sampling_params={"n": 2, "custom_params": custom})
        server._tag_parallel_sampling(odd)
        assert odd[0].sampling_params["custom_params"] == custom
    with pytest.raises(ValueError, match="custom_params must be a JSON object"):
        parse_meta("x")


def test_the_server_restores_keys_carried_in_custom_labels():
    """What passes through SGLang's router (custom_labels) becomes custom_params
    again, on every prompt; the request's own custom_params win; the label is
    not left behind as a metrics label; a malformed one is the client's 400."""
    obj = SimpleNamespace(custom_labels={"taper": json.dumps({"taper_group": "g",
                                                              "taper_width": 2}),
                                         "team": "a"},
                          sampling_params=[{"max_new_tokens": 4},
                                           {"custom_params": {"taper_width": 3}}])
    server._restore_labelled_meta(obj)
    assert obj.custom_labels == {"team": "a"}
    assert obj.sampling_params[0]["custom_params"] == {"taper_group": "g", "taper_width": 2}
    assert obj.sampling_params[1]["custom_params"] == {"taper_group": "g", "taper_width": 3}
    bare = SimpleNamespace(custom_labels={"taper": '{"taper_group": "h"}'},
                           sampling_params=None)
    server._restore_labelled_meta(bare)
    assert bare.sampling_params == {"custom_params": {"taper_group": "h"}}
    assert bare.custom_labels is None
    for bad in ("not json", '["taper_group"]', '{"group": "g"}'):
        with pytest.raises(ValueError, match="custom_labels"):
            server._restore_labelled_meta(SimpleNamespace(custom_labels={"taper": bad},
                                                          sampling_params={}))
