"""Our paged-cache models against transformers on the same random checkpoints.

Every tiny architecture: one prefill of the prompt, then greedy decode steps, and the same
sequence as two chunks (the second attends to the cached first). Log-probabilities must
match transformers' full-sequence forward within 1e-4 and the argmax must be identical.
Each case runs twice: the plain torch modules, and the CPU backend the engine installs (the
compiled kernels where this machine builds them; see services/engine/model/cpu_backend.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from services.engine.kernels.cpu_features import cpu_features
from services.engine.kernels.variants import runnable_variants
from services.engine.make_model import make_model
from services.engine.model.attention import AttentionMetadata, PrefillSlice, causal_mask, decode_mask, kv_cache_shape
from services.engine.model.cpu_backend import use_cpu_backend
from services.engine.model.registry import load_model

transformers = pytest.importorskip("transformers")

BLOCK_SIZE = 16
NUM_BLOCKS = 10
SEQ_BLOCKS = [5, 2, 7, 0]  # a sequence's blocks, deliberately out of order
OTHER_BLOCKS = [9, 1, 4]  # a second sequence's blocks (batch test)
PROMPT_LEN = 20
DECODE_STEPS = 3
ATOL = 1e-4

# case id -> (shape name, config.json overrides)
CASES = {
    "tiny-llama": ("tiny-llama", None),
    "tiny-llama3-sharded": ("tiny-llama3", None),
    "tiny-llama-linear-rope": ("tiny-llama", {"rope_scaling": {"type": "linear", "factor": 2.0}}),
    "tiny-llama-head12": ("tiny-llama", {"head_dim": 12}),  # not a multiple of 8: torch attention, kernels elsewhere
    "tiny-mistral": ("tiny-mistral", None),
    "tiny-mistral-window8": ("tiny-mistral", {"sliding_window": 8}),
    "tiny-qwen2": ("tiny-qwen2", None),
    "tiny-qwen2-tied": ("tiny-qwen2-tied", None),
    "tiny-qwen3": ("tiny-qwen3", None),
    "tiny-mixtral": ("tiny-mixtral", None),
    "tiny-qwen2-moe-sharded": ("tiny-qwen2-moe", None),
    "tiny-qwen3-moe": ("tiny-qwen3-moe", None),
    "tiny-qwen3-moe-sparse-step2": ("tiny-qwen3-moe", {"decoder_sparse_step": 2}),
}


# "cpu-backend": what the engine installs (the best kernel variant here); "kernels-<name>": each
# other ISA build this CPU runs (an AVX-512 machine checks its avx2 build too)
LESSER_VARIANTS = [f"kernels-{v.name}" for v in runnable_variants(cpu_features())[1:]]


@pytest.fixture(scope="module", params=["torch", "cpu-backend", *LESSER_VARIANTS])
def checkpoints(request, tmp_path_factory):
    """case id -> (our model, transformers model), built lazily once per module and backend."""
    cache = {}

    def get(case: str):
        if case not in cache:
            name, overrides = CASES[case]
            path = make_model(name, tmp_path_factory.mktemp(case), seed=1, overrides=overrides)
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                   attn_implementation="eager").eval()
            ours = load_model(path)
            if request.param == "cpu-backend":
                use_cpu_backend(ours)
            elif request.param.startswith("kernels-"):
                assert use_cpu_backend(ours, variant=request.param.removeprefix("kernels-")) == "kernels"
            cache[case] = (ours, hf)
        return cache[case]

    return get


def _slots(blocks: list[int], start: int, end: int) -> torch.Tensor:
    return torch.tensor([blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end)])


def _prefill(row: int, blocks: list[int], start: int, end: int, window: int | None) -> PrefillSlice:
    """Rows [row, row + end - start) hold positions [start, end) of a sequence on ``blocks``."""
    return PrefillSlice(q_start=row, q_end=row + end - start, seq_len=end,
                        block_ids=torch.tensor(blocks[:math.ceil(end / BLOCK_SIZE)]),
                        mask=causal_mask(end - start, end, window, torch.device("cpu")))


def _prefill_meta(blocks: list[int], start: int, end: int, window: int | None) -> AttentionMetadata:
    return AttentionMetadata(slot_mapping=_slots(blocks, start, end), num_decodes=0,
                             decode_block_tables=torch.zeros(0, 1, dtype=torch.long),
                             decode_mask=torch.zeros(0, 1, BLOCK_SIZE), decode_seq_lens=torch.zeros(0, dtype=torch.long),
                             prefills=(_prefill(0, blocks, start, end, window),))


def _decode_fields(blocks: list[int], pos: int, window: int | None) -> dict:
    n = pos // BLOCK_SIZE + 1
    return dict(slot_mapping=_slots(blocks, pos, pos + 1), num_decodes=1,
                decode_block_tables=torch.tensor([blocks[:n]]),
                decode_mask=decode_mask(torch.tensor([pos + 1]), n * BLOCK_SIZE, window, torch.float32),
                decode_seq_lens=torch.tensor([pos + 1]))


def _kv_caches(model) -> list[torch.Tensor]:
    c = model.config
    return [torch.zeros(kv_cache_shape(NUM_BLOCKS, BLOCK_SIZE, c.num_kv_heads, c.head_dim)) for _ in range(c.num_layers)]


def _prompt(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(4, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def _run_ours(model, prompt: list[int], chunks: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Prefill ``prompt`` in chunks ending at ``chunks``, then greedy-decode DECODE_STEPS tokens.

    Returns logits [len(prompt) + DECODE_STEPS, V] (one row per input token) and the tokens.
    """
    window = model.config.sliding_window
    caches, rows, seq, start = _kv_caches(model), [], list(prompt), 0
    for end in chunks:
        hidden = model(torch.tensor(seq[start:end]), torch.arange(start, end), caches,
                       _prefill_meta(SEQ_BLOCKS, start, end, window))
        rows.append(model.compute_logits(hidden))
        start = end
    for _ in range(DECODE_STEPS):
        seq.append(int(rows[-1][-1].argmax()))
        pos = len(seq) - 1
        meta = AttentionMetadata(prefills=(), **_decode_fields(SEQ_BLOCKS, pos, window))
        rows.append(model.compute_logits(model(torch.tensor(seq[-1:]), torch.tensor([pos]), caches, meta)))
    return torch.cat(rows), seq


@torch.inference_mode()
def _hf_logits(hf, seq: list[int]) -> torch.Tensor:
    return hf(torch.tensor([seq])).logits[0].float()


def _assert_match(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.log_softmax(-1), ref.log_softmax(-1), atol=ATOL, rtol=0)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunks", [[PROMPT_LEN], [7, PROMPT_LEN]], ids=["one-prefill", "two-chunks"])
def test_prefill_and_decode_match_transformers(checkpoints, case, chunks):
    ours, hf = checkpoints(case)
    prompt = _prompt(ours.config.vocab_size, PROMPT_LEN, seed=len(case))
    logits, seq = _run_ours(ours, prompt, chunks)
    _assert_match(logits, _hf_logits(hf, seq))


@pytest.mark.parametrize("case", ["tiny-llama", "tiny-qwen2-moe-sharded", "tiny-mistral-window8"])
@torch.inference_mode()
def test_mixed_batch_decode_and_prefill(checkpoints, case):
    """One step holding sequence A's decode token and sequence B's whole prompt."""
    model, hf = checkpoints(case)
    window = model.config.sliding_window
    a = _prompt(model.config.vocab_size, 18, seed=3)
    b = _prompt(model.config.vocab_size, 21, seed=4)
    caches = _kv_caches(model)
    model(torch.tensor(a[:-1]), torch.arange(17), caches, _prefill_meta(SEQ_BLOCKS, 0, 17, window))
    decode = _decode_fields(SEQ_BLOCKS, 17, window)
    meta = AttentionMetadata(
        slot_mapping=torch.cat([decode.pop("slot_mapping"), _slots(OTHER_BLOCKS, 0, len(b))]),
        prefills=(_prefill(1, OTHER_BLOCKS, 0, len(b), window),), **decode)
    hidden = model(torch.tensor(a[-1:] + b), torch.cat([torch.tensor([17]), torch.arange(len(b))]), caches, meta)
    logits = model.compute_logits(hidden)
    _assert_match(logits[:1], _hf_logits(hf, a)[-1:])
    _assert_match(logits[1:], _hf_logits(hf, b))


def test_greedy_margins_are_clear(checkpoints):
    """The random init gives peaked logits: top-1 beats top-2 by a wide margin on average."""
    model, _ = checkpoints("tiny-llama")
    logits, _ = _run_ours(model, _prompt(model.config.vocab_size, PROMPT_LEN, seed=0), [PROMPT_LEN])
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).median() > 0.5
