"""ExpertService (what an ExpertWorker replica runs) against bad calls: whatever arrives over the
handle that does not fit the shard is a ValueError naming the field, nothing is counted, and the
next good call gives the same output as before. A real shard of a tiny Mixtral (shard 1 of 2:
experts 2 and 3 of every MoE layer)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from services.config import ExpertWorkerConfig
from services.engine.llm import build_engine_config
from services.expert_service import ExpertService, to_array
from services.types import ExpertCall

EXPERTS = {"backend": "remote", "num_shards": 2}


@pytest.fixture(scope="module")
def service(model_dir):
    config = build_engine_config(model_dir("tiny-mixtral"), device="cpu", dtype="float32", experts=EXPERTS)
    return ExpertService.from_config(ExpertWorkerConfig("ExpertWorker1", 1, config), "r1")


def good(service, rows=(2, 3)) -> ExpertCall:
    d = service.shard.config.hidden_size
    x = torch.randn(sum(rows), d, generator=torch.Generator().manual_seed(0))
    return ExpertCall(0, [2, 3], list(rows), to_array(x), "float32")


def bad_calls(service):
    """(field the error must name, a call that is wrong in that field)."""
    d, c = service.shard.config.hidden_size, good(service)
    with_ = lambda **kw: dataclasses.replace(c, **kw)
    f32 = lambda n, m: np.zeros((n, m), np.float32)
    return [
        ("layer", with_(layer=service.shard.config.num_layers)),  # one past the last layer
        ("layer", with_(layer=-1)),
        ("layer", with_(layer=True)),
        ("layer", with_(layer="0")),
        ("experts", with_(experts=[0, 3])),  # expert 0 lives in shard 0
        ("experts", with_(experts=[2, 4], counts=[2, 3])),  # past the last expert
        ("experts", with_(experts=[3, 2])),  # not ascending
        ("experts", with_(experts=[2, 2])),
        ("experts", with_(experts=[2.0, 3])),
        ("experts", with_(experts=None)),
        ("experts", with_(experts=[], counts=[], hidden=f32(0, d))),  # an empty batch
        ("counts", with_(counts=[5])),  # fewer counts than experts
        ("counts", with_(counts=[2, 3, 1])),
        ("counts", with_(counts=[0, 5])),
        ("counts", with_(counts=[2, True])),
        ("counts", with_(counts="23")),
        ("hidden", with_(hidden=f32(5, d + 1))),  # the wrong hidden size
        ("hidden", with_(hidden=f32(4, d))),  # rows do not add up to the counts
        ("hidden", with_(hidden=np.zeros((5, d), np.float64))),  # the wrong element type
        ("hidden", with_(hidden=np.zeros((5, d, 1), np.float32))),
        ("hidden", with_(hidden=torch.zeros(5, d))),  # a tensor, not an array
        ("hidden", with_(hidden=None)),
        ("dtype", with_(dtype="bfloat16", hidden=np.zeros((5, d), np.uint16))),  # the shard computes fp32
        ("dtype", with_(dtype="float64")),
        ("dtype", with_(dtype=None)),
        ("call", {"layer": 0, "experts": [2, 3], "counts": [2, 3]}),  # not an ExpertCall
    ]


def test_bad_calls_raise_naming_the_field_and_the_service_keeps_working(service):
    want = service.run(good(service)).output.copy()
    before = service.snapshot()
    for field, call in bad_calls(service):
        with pytest.raises(ValueError, match=rf"^{field}: "):
            service.run(call)
        assert service.snapshot() == before, field  # nothing counted
    np.testing.assert_array_equal(service.run(good(service)).output, want)  # same rows, same output
    assert service.snapshot().num_calls == before.num_calls + 1


def test_a_good_call_matches_each_experts_own_rows(service):
    # one expert at a time gives the same rows as the two together (the shard's row grouping)
    both = service.run(good(service)).output
    call = good(service)
    first = service.run(dataclasses.replace(call, experts=[2], counts=[2], hidden=call.hidden[:2])).output
    second = service.run(dataclasses.replace(call, experts=[3], counts=[3], hidden=call.hidden[2:])).output
    np.testing.assert_array_equal(np.concatenate([first, second]), both)
