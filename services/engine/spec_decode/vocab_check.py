"""Draft and target must share one vocabulary: the check, and an error that says how they differ.

A draft proposes token *ids*; the target verifies those ids. If id 17 means "ab" to the draft and
"cd" to the target, every proposal is noise (never wrong output: verification stays lossless, but
nothing is ever accepted). So ``draft_model`` refuses such a draft at load time, and
``tandem distill`` refuses to resume a run whose output folder holds another vocabulary.

Compared: the model's ``vocab_size`` (embedding rows), the tokenizer's token -> id map (added
tokens included), and the special tokens (bos/eos/unk/pad texts).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_EXAMPLES = 3  # differing ids / tokens quoted in the message


@dataclass(frozen=True)
class Vocabulary:
    """What must match between a draft and its target."""

    vocab_size: int  # rows of the model's embedding (ModelConfig.vocab_size)
    token_ids: dict[str, int]  # every token text -> id (Tokenizer.vocab(), added tokens included)
    special_tokens: dict[str, str]  # "bos_token" / "eos_token" / ... -> token text (Tokenizer.special_tokens)

    @classmethod
    def of(cls, tokenizer, vocab_size: int) -> "Vocabulary":
        """From a ``services.engine.tokenizer.Tokenizer`` and the model's vocab_size."""
        return cls(vocab_size, tokenizer.vocab(), dict(tokenizer.special_tokens))


def vocabulary_differences(draft: Vocabulary, target: Vocabulary) -> list[str]:
    """Human-readable differences, empty when the two vocabularies are the same. In order: model
    vocab_size, tokenizer size, the first ids (ascending) whose token differs, tokens mapped to
    different ids (count), special tokens."""
    problems = []
    if draft.vocab_size != target.vocab_size:
        problems.append(f"the draft's vocab_size is {draft.vocab_size}, the target's {target.vocab_size}")
    if len(draft.token_ids) != len(target.token_ids):
        problems.append(f"the draft's tokenizer has {len(draft.token_ids)} tokens, the target's {len(target.token_ids)}")
    d_by_id = {i: t for t, i in draft.token_ids.items()}
    t_by_id = {i: t for t, i in target.token_ids.items()}
    ids = sorted(i for i in d_by_id.keys() | t_by_id.keys() if d_by_id.get(i) != t_by_id.get(i))
    if ids:
        shown = ", ".join(f"{i}: draft {d_by_id.get(i)!r} vs target {t_by_id.get(i)!r}" for i in ids[:MAX_EXAMPLES])
        problems.append(f"first differing ids ({shown})")
    differ = sorted(t for t in draft.token_ids.keys() | target.token_ids.keys()
                    if draft.token_ids.get(t) != target.token_ids.get(t))
    if differ:
        shown = ", ".join(f"{t!r}: draft {draft.token_ids.get(t)} vs target {target.token_ids.get(t)}"
                          for t in differ[:MAX_EXAMPLES])
        problems.append(f"{len(differ)} token(s) map to different ids ({shown})")
    names = sorted(draft.special_tokens.keys() | target.special_tokens.keys())
    special = [f"{n} draft {draft.special_tokens.get(n)!r} vs target {target.special_tokens.get(n)!r}"
               for n in names if draft.special_tokens.get(n) != target.special_tokens.get(n)]
    if special:
        problems.append("special tokens differ (" + ", ".join(special) + ")")
    return problems


def check_same_vocabulary(draft: Vocabulary, target: Vocabulary, field: str = "speculative.model") -> None:
    """ValueError naming ``field`` and saying how the draft's vocabulary differs, if it does."""
    problems = vocabulary_differences(draft, target)
    if problems:
        raise ValueError(f"{field}: the draft model must use the target's tokenizer; " + "; ".join(problems))
