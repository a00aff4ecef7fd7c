"""The pure parts of ``tandem distill``: prompts, the top-k KL loss, batches, resuming on a tiny
random student, option checks on resume, and the vocabulary check of draft and target."""

import json

import pytest
import torch
import torch.nn.functional as F

from bench.spec_prompts import CHAT
from services.engine.distill.config import CorpusConfig, DistillConfig, identity_differences
from services.engine.distill.loss import topk_kl
from services.engine.distill.prompts import choose_prompts, question_texts, render_prompt
from services.engine.distill.run import _claim, concat, subset
from services.engine.distill.student import StudentShape, projected_embedding
from services.engine.distill.teacher import TeacherScores, _passes
from services.engine.distill.trainer import TrainConfig, batch_indices, lr_at, make_batch, train
from services.engine.default_model.train import Llama, LlamaConfig
from services.engine.spec_decode.vocab_check import Vocabulary, check_same_vocabulary, vocabulary_differences


# ---- prompts ------------------------------------------------------------------------------------

def test_prompts_are_many_distinct_deterministic_and_not_the_benchmark_s():
    texts = question_texts()
    assert len(texts) == len(set(texts)) >= 500
    assert not set(CHAT) & set(texts)  # the bench measures on prompts the draft never saw
    a, b = choose_prompts(300, seed=0), choose_prompts(300, seed=0)
    assert a == b and len(set(a)) == 300 and a != choose_prompts(300, seed=1)
    many = choose_prompts(len(texts) + 5, seed=0)
    assert many[len(texts):] == many[:5]  # cycled past the end
    with pytest.raises(ValueError, match="num_prompts"):
        choose_prompts(0, seed=0)


class _Tok:
    def __init__(self, template):
        self.chat_template = template
        self.seen = []

    def apply_chat_template(self, messages):
        return f"<user>{messages[0]['content']}</user><assistant>"

    def encode(self, text, add_special_tokens=False):
        self.seen.append((text, add_special_tokens))
        return [len(text)]


def test_render_uses_the_chat_template_when_there_is_one():
    tok = _Tok(template=object())
    render_prompt(tok, "Hi?")
    assert tok.seen == [("<user>Hi?</user><assistant>", False)]
    plain = _Tok(template=None)
    render_prompt(plain, "Hi?")
    assert plain.seen == [("Question: Hi?\nAnswer:", True)]


# ---- loss ---------------------------------------------------------------------------------------

def full_kl(teacher_logits, student_logits):
    p = F.log_softmax(teacher_logits, -1)
    return (p.exp() * (p - F.log_softmax(student_logits, -1))).sum(-1).mean()


def test_topk_kl_is_the_full_kl_when_k_covers_the_vocabulary():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    top = F.log_softmax(t, -1).topk(11)
    got = topk_kl(s, top.indices, top.values, torch.ones(5, dtype=torch.bool))
    assert torch.allclose(got, full_kl(t, s), atol=1e-5)


def test_topk_kl_is_the_kl_of_the_coarsened_distributions():
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(4, 9, generator=g) * 2, torch.randn(4, 9, generator=g)
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    top = F.log_softmax(t, -1).topk(3)
    expected = []
    for i in range(4):
        keep = top.indices[i]
        rest = torch.ones(9, dtype=torch.bool)
        rest[keep] = False
        pc = torch.cat([p[i, keep], p[i, rest].sum()[None]])
        qc = torch.cat([q[i, keep], q[i, rest].sum()[None]])
        expected.append((pc * (pc.log() - qc.log())).sum())
    got = topk_kl(s, top.indices, top.values, torch.ones(4, dtype=torch.bool))
    assert torch.allclose(got, torch.stack(expected).mean(), atol=1e-5)
    # zero for a student equal to the teacher; masked rows do not count, even non-finite ones
    assert topk_kl(t, top.indices, top.values, torch.ones(4, dtype=torch.bool)).abs() < 1e-5
    s2 = s.clone()
    s2[3] = float("nan")
    mask = torch.tensor([True, True, True, False])
    sub = topk_kl(s[:3], top.indices[:3], top.values[:3], torch.ones(3, dtype=torch.bool))
    assert torch.allclose(topk_kl(s2, top.indices, top.values, mask), sub)
    with pytest.raises(ValueError, match="mask"):
        topk_kl(s, top.indices, top.values, torch.zeros(4, dtype=torch.bool))


def test_topk_kl_gradient_is_finite_when_the_top_k_hold_all_the_mass():
    t = torch.tensor([[30.0, 0.0, -30.0, -30.0]])
    s = torch.zeros(1, 4, requires_grad=True)
    top = F.log_softmax(t, -1).topk(2)
    loss = topk_kl(s, top.indices, top.values, torch.ones(1, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


# ---- corpus, batches, schedule ---------------------------------------------------------------

def corpus(lengths, k=3, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    logp = F.log_softmax(torch.randn(n, vocab, generator=g), -1).topk(k)
    offsets = torch.tensor([0] + lengths).cumsum(0)
    return TeacherScores(torch.randint(1, vocab, (n,), generator=g), offsets, logp.indices, logp.values)


def test_batches_are_right_padded_and_masked():
    c = corpus([3, 5, 2])
    x, ids, logps, mask = make_batch(c, [2, 1])
    assert x.shape == (2, 5) and ids.shape == (10, 3)
    assert x[0, :2].tolist() == c.tokens[8:10].tolist() and x[0, 2:].tolist() == [0, 0, 0]
    assert x[1].tolist() == c.tokens[3:8].tolist()
    assert mask.view(2, 5).tolist() == [[True, True, False, False, False], [True] * 5]
    assert torch.equal(ids.view(2, 5, 3)[1], c.top_ids[3:8])


def test_batch_order_is_a_pure_function_of_seed_and_step_covering_each_epoch():
    per_epoch = [batch_indices(10, 3, seed=4, step=s) for s in range(3)]
    assert per_epoch == [batch_indices(10, 3, seed=4, step=s) for s in range(3)]
    flat = [i for b in per_epoch for i in b]
    assert len(set(flat)) == 9 and all(len(b) == 3 for b in per_epoch)
    assert batch_indices(10, 3, seed=4, step=3) != per_epoch[0] or batch_indices(10, 3, 4, 4) != per_epoch[1]
    assert batch_indices(2, 8, seed=0, step=5) in ([0, 1], [1, 0])  # an epoch shorter than a batch


def test_lr_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=0.1, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert max(lrs) == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_concat_and_subset_keep_sequences_apart():
    a, b = corpus([2, 3], seed=1), corpus([4], seed=2)
    both = concat([a, b])
    assert both.offsets.tolist() == [0, 2, 5, 9]
    tail = subset(both, 1, 3)
    assert tail.offsets.tolist() == [0, 3, 7]
    assert torch.equal(tail.tokens, torch.cat([a.tokens[2:], b.tokens]))


def test_teacher_passes_pack_sequences_under_the_budget():
    assert _passes([5, 5, 5, 20, 1], budget=10) == [[0, 1], [2], [3], [4]]


# ---- resuming -------------------------------------------------------------------------------------

def tiny_student(seed=0):
    torch.manual_seed(seed)
    return Llama(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    c = corpus([6, 4, 7, 5, 3, 6])
    cfg = TrainConfig(steps=6, batch_size=2, lr=1e-2, checkpoint_every=2)
    straight = tiny_student()
    train(straight, c, cfg, tmp_path / "a.pt")
    resumed = tiny_student()
    train(resumed, c, cfg, tmp_path / "b.pt", stop_after=3)  # "crash" after step 3: checkpoint at 2
    again = tiny_student(seed=99)  # a new process: weights come from the checkpoint
    steps = []
    train(again, c, cfg, tmp_path / "b.pt", on_step=lambda s, loss, lr: steps.append(s))
    assert steps == [3, 4, 5, 6]
    for (name, w1), (_, w2) in zip(straight.state_dict().items(), again.state_dict().items()):
        assert torch.allclose(w1, w2, atol=1e-6), name
    assert train(again, c, cfg, tmp_path / "b.pt") == pytest.approx(torch.load(
        tmp_path / "b.pt", weights_only=True)["loss"])  # nothing left to do


def test_training_lowers_the_kl():
    c = corpus([8] * 8)
    model = tiny_student()
    losses = []
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        train(model, c, TrainConfig(steps=40, batch_size=4, lr=1e-2, checkpoint_every=40), Path(d) / "s.pt",
              on_step=lambda s, loss, lr: losses.append(loss))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_a_rerun_with_other_options_is_refused_naming_them(tmp_path):
    base = DistillConfig("smollm2", tmp_path)
    _claim(tmp_path / "work", base)
    _claim(tmp_path / "work", DistillConfig("smollm2", tmp_path, train=TrainConfig(checkpoint_every=7)))  # same run
    other = DistillConfig("smollm2", tmp_path, corpus=CorpusConfig(num_prompts=10), shape=StudentShape(hidden_size=128))
    with pytest.raises(ValueError, match=r"corpus.num_prompts: was 384, now 10; shape.hidden_size: was 256, now 128"):
        _claim(tmp_path / "work", other)
    assert json.loads((tmp_path / "work" / "run.json").read_text()) == base.identity()
    assert identity_differences({"a": {"b": 1}}, {"a": {"b": 1}}) == []


def test_options_are_checked_naming_the_field():
    with pytest.raises(ValueError, match="temperatures"):
        CorpusConfig(temperatures=(-1.0,))
    with pytest.raises(ValueError, match="num_kv_heads"):
        StudentShape(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)


def test_projected_embedding_keeps_the_principal_directions():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(50, 3, generator=g) @ torch.randn(3, 8, generator=g)  # rank 3 in 8 dims
    p = projected_embedding(e, 3, g)
    assert torch.allclose(p @ p.T, e @ e.T, atol=1e-3)  # rank 3: all geometry kept
    wide = projected_embedding(e, 10, g)
    assert wide.shape == (50, 10) and torch.allclose(wide[:, :8] @ wide[:, :8].T, e @ e.T, atol=1e-3)


# ---- vocabulary check -----------------------------------------------------------------------------

def vocab(tokens, specials=None, size=None):
    return Vocabulary(size or len(tokens), {t: i for i, t in enumerate(tokens)}, specials or {"eos_token": "</s>"})


def test_the_same_vocabulary_passes():
    v = vocab(["a", "b", "</s>"])
    assert vocabulary_differences(v, vocab(["a", "b", "</s>"])) == []
    check_same_vocabulary(v, vocab(["a", "b", "</s>"]))


def test_the_error_says_how_the_vocabularies_differ():
    target = vocab(["a", "b", "c", "</s>"], size=8)
    draft = vocab(["a", "x", "c", "</s>", "extra"], specials={"eos_token": "extra"}, size=6)
    with pytest.raises(ValueError) as err:
        check_same_vocabulary(draft, target, field="distill")
    msg = str(err.value)
    assert msg.startswith("distill: the draft model must use the target's tokenizer")
    assert "the draft's vocab_size is 6, the target's 8" in msg
    assert "the draft's tokenizer has 5 tokens, the target's 4" in msg
    assert "first differing ids (1: draft 'x' vs target 'b', 4: draft 'extra' vs target None)" in msg
    assert "3 token(s) map to different ids" in msg
    assert "special tokens differ (eos_token draft 'extra' vs target '</s>')" in msg
