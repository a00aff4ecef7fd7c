"""The bf16 kernel path (cpu_backend.use_bf16_kernels: bf16 weights in pair panels, fp32
activations, a bf16 KV cache) against transformers in bf16 on the same random checkpoints.

Our numerics differ from transformers-bf16 by design: transformers rounds every activation to
bf16, we keep them fp32 (only the weights, the KV entries and, on AVX512_BF16 CPUs, the linears'
inputs are bf16). Both are approximations of the fp32 model on the same bf16-rounded weights
("rounded" below), the reference of the accuracy test. Measured on these tiny random models
(their log-probabilities span ~70, so bf16 rounding moves them by tenths), 2026-12-02, AMD EPYC
Zen 4, max |log p| difference:

    case               ours(dot)-rounded  ours(convert)-rounded  transformers-bf16 - rounded
    tiny-llama         0.225              0.051                  0.409
    tiny-qwen2         0.228              0.078                  0.481
    tiny-qwen2-tied    0.331              0.180                  0.823
    tiny-qwen3         0.357              0.160                  0.605
    tiny-mistral (w8)  0.187              0.069                  0.411

Hence the tests: against transformers-bf16 within BF16_ATOL = 1.25 (measured up to 1.01: the
distance between two bf16 approximations); against the rounded fp32 model at most
ACCURACY_RATIO = 0.8 times transformers-bf16's own error (measured 0.2-0.6); greedy tokens equal
to the rounded model's wherever its top-2 margin exceeds MARGIN = 1.0.
"""

from __future__ import annotations

import pytest
import torch

from services.engine.kernels import cpu_supports_kernels
from services.engine.kernels.cpu_features import cpu_features
from services.engine.kernels.variants import runnable_variants
from services.engine.make_model import make_model
from services.engine.model.attention import AttentionMetadata, kv_cache_shape
from services.engine.model.cpu_backend import use_cpu_backend
from services.engine.model.packing import PairPanelLinear
from services.engine.model.registry import load_model
from tests.unit.test_models_vs_hf import SEQ_BLOCKS, _decode_fields, _prefill_meta, _prompt

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not cpu_supports_kernels(), reason="the kernels need an AVX2 + FMA CPU")

BF16_ATOL = 1.25  # max |log p| against transformers in bf16
ACCURACY_RATIO = 0.8  # our max |log p| error / transformers-bf16's, both against the rounded fp32 model
MARGIN = 1.0  # top-2 log p margin of the rounded model above which greedy tokens must agree
PROMPT_LEN, DECODE_STEPS, NUM_BLOCKS, BLOCK_SIZE = 20, 4, 10, 16
CASES = {"tiny-llama": None, "tiny-qwen2": None, "tiny-qwen2-tied": None, "tiny-qwen3": None,
         "tiny-mistral": {"sliding_window": 8}}
VARIANTS_HERE = [v.name for v in runnable_variants(cpu_features())]


def _ours(path, variant: str):
    model = load_model(path, dtype=torch.bfloat16)
    assert use_cpu_backend(model, variant=variant) == "kernels-bf16"
    return model


@torch.inference_mode()
def _run(model, prompt: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Prefill, then greedy decode with a bf16 KV cache -> (logits [len + steps, V], tokens)."""
    c, window = model.config, model.config.sliding_window
    caches = [torch.zeros(kv_cache_shape(NUM_BLOCKS, BLOCK_SIZE, c.num_kv_heads, c.head_dim), dtype=torch.bfloat16)
              for _ in range(c.num_layers)]
    seq = list(prompt)
    hidden = model(torch.tensor(seq), torch.arange(len(seq)), caches, _prefill_meta(SEQ_BLOCKS, 0, len(seq), window))
    rows = [model.compute_logits(hidden)]
    for _ in range(DECODE_STEPS):
        seq.append(int(rows[-1][-1].argmax()))
        pos = len(seq) - 1
        meta = AttentionMetadata(prefills=(), **_decode_fields(SEQ_BLOCKS, pos, window))
        rows.append(model.compute_logits(model(torch.tensor(seq[-1:]), torch.tensor([pos]), caches, meta)))
    return torch.cat(rows), seq


@torch.inference_mode()
def _hf_logprobs(path, seq: list[int], dtype: torch.dtype, round_weights: bool) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
    if round_weights:
        for p in hf.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return hf(torch.tensor([seq])).logits[0].float().log_softmax(-1)


@pytest.mark.parametrize("variant", VARIANTS_HERE)
@pytest.mark.parametrize("case", list(CASES))
def test_bf16_path_matches_transformers_bf16(tmp_path, case, variant):
    path = make_model(case, tmp_path / case, seed=1, overrides=CASES[case])
    model = _ours(path, variant)
    assert any(isinstance(m, PairPanelLinear) for m in model.modules())
    logits, seq = _run(model, _prompt(model.config.vocab_size, PROMPT_LEN, seed=len(case)))
    ours = logits.log_softmax(-1)
    ref_bf16 = _hf_logprobs(path, seq, torch.bfloat16, round_weights=False)
    ref_rounded = _hf_logprobs(path, seq, torch.float32, round_weights=True)
    torch.testing.assert_close(ours, ref_bf16, atol=BF16_ATOL, rtol=0)
    ours_err = (ours - ref_rounded).abs().max().item()
    hf_err = (ref_bf16 - ref_rounded).abs().max().item()
    assert ours_err <= ACCURACY_RATIO * hf_err, f"bf16 path error {ours_err:.3f}, transformers-bf16 {hf_err:.3f}"
    top2 = ref_rounded.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > MARGIN
    assert clear.sum() >= len(seq) // 2, "too few clear-margin positions to test the greedy tokens"
    assert torch.equal(ours.argmax(-1)[clear], ref_rounded.argmax(-1)[clear])


@pytest.mark.parametrize("rows", [1, 3, 8, 32])
def test_bf16_decode_stack_matches_the_module_path(tmp_path, rows):
    """One decode step through the stack over bf16 weights and a bf16 cache gives the hidden
    states and KV writes of the same kernels run module by module."""
    from tests.unit.test_cpu_kernels import _decode_meta

    model = _ours(make_model("tiny-llama", tmp_path / "m"), VARIANTS_HERE[0])
    assert model.decode_stack is not None
    c = model.config
    g = torch.Generator().manual_seed(rows)
    caches = [torch.randn(2, c.num_kv_heads, rows, 16, c.head_dim, generator=g).to(torch.bfloat16)
              for _ in model.layers]
    ids = torch.randint(0, c.vocab_size, (rows,), generator=g)
    meta, pos = _decode_meta(rows, seq_len=5), torch.full((rows,), 4)
    with torch.inference_mode():
        stack_caches = [t.clone() for t in caches]
        via_stack = model(ids, pos, stack_caches, meta)
        stack, model.decode_stack = model.decode_stack, None
        via_modules = model(ids, pos, caches, meta)
        model.decode_stack = stack
    assert via_stack.dtype == torch.float32
    torch.testing.assert_close(via_stack, via_modules, rtol=1e-5, atol=1e-5)
    for a, b in zip(stack_caches, caches):
        assert torch.equal(a, b)


def test_bf16_moe_keeps_plain_torch(tmp_path):
    model = load_model(make_model("tiny-mixtral", tmp_path / "moe"), dtype=torch.bfloat16)
    assert use_cpu_backend(model, variant=VARIANTS_HERE[0]) == "torch"
    assert next(model.parameters()).dtype == torch.bfloat16
