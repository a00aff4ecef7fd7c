"""CPU linear backends (services/engine/model/packing.py) against the plain model: oneDNN with
pre-packed weights, and panel64 weights with the engine's kernels."""

import pytest
import torch

from services.engine.kernels import cpu_supports_kernels, load_cpu_ops
from services.engine.make_model import make_model
from services.engine.model.packing import (OneDNNLinear, PanelLinear, TiedHead, onednn_available,
                                           use_cpu_linears)
from services.engine.model.registry import load_model


def _backend(name: str):
    """(kernels module or None, linear class) of a backend, skipping where it cannot run."""
    if name == "onednn":
        if not onednn_available():
            pytest.skip("this torch build has no oneDNN")
        return None, OneDNNLinear
    if not cpu_supports_kernels():
        pytest.skip("the kernels need an AVX2 + FMA CPU")
    ops = load_cpu_ops()
    assert ops is not None, "the CPU kernels did not build"
    return ops, PanelLinear


@pytest.mark.parametrize("backend", ["onednn", "panel64"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2-tied", "tiny-qwen2-moe"])
def test_packed_model_matches_plain(tmp_path, name, backend):
    ops, linear_cls = _backend(backend)
    path = make_model(name, tmp_path / name)
    plain, packed = load_model(path), use_cpu_linears(load_model(path), ops)
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    assert any(isinstance(m, linear_cls) for m in packed.modules())
    # the weights are replaced, not copied: the same parameter names, no extra parameters
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in packed.named_parameters()]
    if backend == "onednn":  # same shape and bytes; panel64 pads rows to a multiple of 64
        assert [(p.shape, p.numel()) for p in plain.parameters()] == [(p.shape, p.numel()) for p in packed.parameters()]
        assert all(m.weight.is_mkldnn for m in packed.modules() if isinstance(m, OneDNNLinear))
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


@pytest.mark.parametrize("backend", ["onednn", "panel64"])
def test_tied_head_refuses_another_weight(tmp_path, backend):
    ops, _ = _backend(backend)
    model = use_cpu_linears(load_model(make_model("tiny-qwen2-tied", tmp_path / "m")), ops)
    with pytest.raises(ValueError, match="another weight"):
        model.linear_fn(torch.randn(1, model.config.hidden_size), torch.randn(8, model.config.hidden_size))
