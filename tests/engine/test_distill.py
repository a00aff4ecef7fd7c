"""``tandem distill`` end to end on the tiny test Llama (seconds): the command writes a draft the
engine loads as ``speculative: {method: draft_model}``, greedy output with it equals output
without it (lossless), a rerun of the same command resumes (no new corpus, same weights), and a
rerun with other options or a draft with another vocabulary is refused."""

import json

import pytest
import torch
from safetensors.torch import load_file

from router.cli import main
from services.engine import LLM, SamplingParams
from services.engine.model_catalog import embedded_model_path

TINY = ["--prompts", "12", "--max-new-tokens", "8", "--shard-size", "8", "--hidden", "32", "--layers", "1",
        "--heads", "2", "--kv-heads", "1", "--ffn", "64", "--steps", "6", "--batch-size", "4",
        "--checkpoint-every", "2", "--top-k", "8", "--no-progress"]


@pytest.fixture(scope="module")
def target(model_dir):
    return model_dir("tiny-llama")


@pytest.fixture(scope="module")
def draft(target, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "draft"
    assert main(["distill", target, str(out), *TINY]) == 0
    return out


def test_the_draft_is_a_checkpoint_with_the_target_s_tokenizer(draft, target):
    config = json.loads((draft / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["hidden_size"] == 32 and config["vocab_size"] == 512
    weights = load_file(draft / "model.safetensors")
    assert all(w.dtype == torch.bfloat16 for w in weights.values()) and "lm_head.weight" not in weights
    assert (draft / "tokenizer.json").read_text() == (draft / "tokenizer.json").read_text()
    readme = (draft / "README.md").read_text()
    assert "tandem distill" in readme and "load average" in readme
    shards = sorted(p.name for p in (draft / "work").glob("shard-*.safetensors"))
    assert shards == ["shard-0000.safetensors", "shard-0001.safetensors"]


def test_greedy_output_with_the_distilled_draft_equals_output_without(draft, target):
    prompts = [[5, 6, 7, 8], [100, 3, 99], list(range(20, 50))]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    base = dict(device="cpu", block_size=16, num_kv_blocks=64)
    expected = [o.token_ids for o in LLM(target, **base).generate(prompts, params)]
    spec = LLM(target, **base, speculative_config={"method": "draft_model", "model": str(draft),
                                                   "num_speculative_tokens": 3, "adaptive": False})
    assert [o.token_ids for o in spec.generate(prompts, params)] == expected
    assert spec.engine.stats.spec_num_drafts > 0


def test_rerunning_the_same_command_resumes_and_changes_nothing(draft, target):
    before = load_file(draft / "model.safetensors")
    stamps = {p.name: p.stat().st_mtime_ns for p in (draft / "work").glob("shard-*")}
    assert main(["distill", target, str(draft), *TINY]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (draft / "work").glob("shard-*")} == stamps  # not regenerated
    after = load_file(draft / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_other_options_or_another_vocabulary_are_refused(draft, target, tmp_path, capsys):
    assert main(["distill", target, str(draft), *TINY[:-1], "--seed", "3", "--no-progress"]) == 2
    assert "train.seed: was 0, now 3" in capsys.readouterr().err
    # OUT_DIR already holding a model of another vocabulary (the embedded model's 4,096 tokens)
    import shutil

    other = tmp_path / "other"
    shutil.copytree(embedded_model_path(), other)
    assert main(["distill", target, str(other), *TINY]) == 2
    err = capsys.readouterr().err
    assert "out_dir: the draft model must use the target's tokenizer" in err
    assert "vocab_size is 4096, the target's 512" in err and "first differing ids" in err
