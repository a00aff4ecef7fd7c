"""A ``tokenizers.Tokenizer`` rebuilt from a GGUF file's ``tokenizer.ggml.*`` metadata.

Supported: ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE: GPT-2, SmolLM, Llama 3, Qwen2).
- vocabulary: ``tokenizer.ggml.tokens`` (id = position); tokens spelled outside the byte-level
  alphabet (some converters store added tokens as raw text) are respelled into it, as
  transformers does when it loads a GGUF tokenizer;
- merges: ``tokenizer.ggml.merges`` ("left right", best first);
- token types (``tokenizer.ggml.token_type``): CONTROL (3) tokens become special added tokens
  (matched whole in text, skipped by ``decode(skip_special_tokens=True)``), USER_DEFINED (4)
  plain added tokens;
- pre-tokenizer: chosen by ``tokenizer.ggml.pre`` the way llama.cpp chooses it (llama-vocab.cpp):
  a regex split, then byte-level mapping. ``smollm`` (StarCoder-style) first splits every
  digit off on its own, as SmolLM2's own tokenizer.json does; transformers 5.24 has no entry
  for it and falls back to GPT-2's split, which differs only where whitespace precedes a
  digit ("  1": ours ``ĠĠ 1``, theirs ``Ġ Ġ1`` -> ``Ġ Ġ 1``).

End of generation: llama.cpp stops on the eos id, on ``tokenizer.ggml.eot_token_id`` /
``eom_token_id``, and on CONTROL tokens whose text is a known end-of-turn marker
(``<|im_end|>``, ``<|eot_id|>``, ...); ``end_of_generation_ids`` returns that set.
"""

from __future__ import annotations

import functools

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from services.engine.gguf_file import GGUFFile

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types (tokenizer.ggml.token_type)
# GPT-2's split (also what pre_tokenizers.ByteLevel(use_regex=True) applies)
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> regex splits applied in order before the byte-level mapping
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,), "gpt2": (_GPT2_SPLIT,), "gpt-2": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT), "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "llama-bpe": (_LLAMA3_SPLIT,), "llama3": (_LLAMA3_SPLIT,), "llama-v3": (_LLAMA3_SPLIT,),
    "smaug-bpe": (_LLAMA3_SPLIT,), "dbrx": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,), "deepseek-r1-qwen": (_QWEN2_SPLIT,),
}
# texts of CONTROL tokens that end a turn or a document (llama.cpp's end-of-generation set)
END_OF_GENERATION_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
                           "<|endoftext|>", "<|end_of_text|>", "<EOT>", "<|return|>")


@functools.lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (bytes that print as themselves keep their
    character; the rest take code points from 256 upwards, in byte order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def build_tokenizer(file: GGUFFile) -> Tokenizer:
    """The byte-level BPE a GGUF file describes. ValueError names an unsupported tokenizer."""
    kind = file.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{file.path}: tokenizer.ggml.model={kind!r} is not supported (supported: 'gpt2', "
                         "byte-level BPE)")
    tokens = file.get("tokenizer.ggml.tokens")
    merges = file.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not tokens or not isinstance(merges, list):
        raise ValueError(f"{file.path}: tokenizer.ggml.tokens and tokenizer.ggml.merges must be string arrays")
    types = file.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{file.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    alphabet = set(byte_alphabet().values())
    spelled = [t if set(t) <= alphabet else _respell(t) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(file)
    tok.decoder = decoders.ByteLevel()
    control = [t for t, k in zip(tokens, types) if k == CONTROL and set(t) <= alphabet]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    if tok.get_vocab_size(with_added_tokens=True) != len(vocab):
        raise ValueError(f"{file.path}: the tokenizer's added tokens are not all in tokenizer.ggml.tokens")
    return tok


def _respell(text: str) -> str:
    table = byte_alphabet()
    return "".join(table[b] for b in text.encode("utf-8"))


def _pre_tokenizer(file: GGUFFile):
    pre = file.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise ValueError(f"{file.path}: tokenizer.ggml.pre={pre!r} is not supported; supported: "
                         f"{', '.join(sorted(PRE_TOKENIZER_SPLITS))}")
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_SPLITS[pre]]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def special_token_ids(file: GGUFFile) -> dict[str, int]:
    """{"bos_token": id, "eos_token": id, "unk_token": id, "pad_token": id} for the ids the file sets."""
    keys = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
            "pad_token": "padding_token_id"}
    n = len(file.get("tokenizer.ggml.tokens") or [])
    out = {}
    for name, key in keys.items():
        value = file.get(f"tokenizer.ggml.{key}")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
            raise ValueError(f"{file.path}: tokenizer.ggml.{key}={value!r} is not a token id (vocab {n})")
        out[name] = value
    return out


def end_of_generation_ids(file: GGUFFile) -> list[int]:
    """Token ids that end generation by default: eos, eot, eom, and end-of-turn CONTROL tokens."""
    tokens = file.get("tokenizer.ggml.tokens") or []
    types = file.get("tokenizer.ggml.token_type") or []
    ids = [file.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    ids += [i for i, (t, k) in enumerate(zip(tokens, types)) if k == CONTROL and t in END_OF_GENERATION_TEXTS]
    out: list[int] = []
    for i in ids:
        if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(tokens) and i not in out:
            out.append(i)
    return out
