"""Pre-packed oneDNN linears (services/engine/model/packing.py) against the plain model."""

import pytest
import torch

from services.engine.make_model import make_model
from services.engine.model.packing import OneDNNLinear, TiedHead, onednn_available, use_onednn_linears
from services.engine.model.registry import load_model

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2-tied", "tiny-qwen2-moe"])
def test_packed_model_matches_plain(tmp_path, name):
    path = make_model(name, tmp_path / name)
    plain, packed = load_model(path), use_onednn_linears(load_model(path))
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    # packing replaces weights in place: the same parameters, the same bytes
    assert [(n, p.shape, p.numel()) for n, p in plain.named_parameters()] == \
        [(n, p.shape, p.numel()) for n, p in packed.named_parameters()]
    assert all(p.is_mkldnn for m in packed.modules() if isinstance(m, OneDNNLinear) for p in [m.weight])
    assert isinstance(packed.linear_fn, TiedHead) == (plain.lm_head is None)
    torch.manual_seed(0)
    for rows in (1, 3, 40):  # decode, small batch, prompt chunk
        hidden = torch.randn(rows, plain.config.hidden_size)
        with torch.inference_mode():
            want = plain.compute_logits(hidden)
            got = packed.compute_logits(hidden)
            mlp_want, mlp_got = plain.layers[0].mlp(hidden), packed.layers[0].mlp(hidden)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mlp_got, mlp_want, rtol=1e-5, atol=1e-5)


def test_tied_head_refuses_another_weight(tmp_path):
    model = use_onednn_linears(load_model(make_model("tiny-qwen2-tied", tmp_path / "m")))
    with pytest.raises(ValueError, match="another weight"):
        model.linear_fn(torch.randn(1, model.config.hidden_size), torch.randn(8, model.config.hidden_size))
