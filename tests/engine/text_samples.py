"""Deterministic test strings for tokenizer comparisons: prose in many scripts, emoji (ZWJ
sequences, skin tones, flags), whitespace runs (spaces, tabs, newlines, CRLF, no-break and
ideographic spaces), code, numbers (integers, decimals, grouped, dates, hex), special-token
text, contractions and byte-level edge cases."""

from __future__ import annotations

import random

WORDS = ["the", "The", "capital", "France", "is", "Paris", "don't", "I'M", "we'll", "it's", "naïve", "café",
         "Straße", "über", "façade", "smörgåsbord", "hello", "world", "tokenizer", "GGUF", "llama.cpp", "SmolLM2"]
SCRIPTS = ["Привет мир", "Γειά σου Κόσμε", "שלום עולם", "مرحبا بالعالم", "नमस्ते दुनिया", "こんにちは世界",
           "你好，世界！", "안녕하세요 세계", "สวัสดีชาวโลก", "Xin chào thế giới", "ሰላም ልዑል", "Բարեւ աշխարհ"]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "🏳️‍🌈", "❤️", "🤖", "🧑🏿‍💻", "✨", "🙃", "🐍", "🚀", "©", "™", "∑", "√2"]
SPACES = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\u2009", "    ", "\n\t  "]
CODE = ["def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
        "SELECT * FROM users WHERE id = 42;", "const x = {a: 1, 'b': [2, 3]};", "#include <stdio.h>",
        "if x != None and y >= 3:\n\tpass", "λx.x", "print(f\"{name!r:>10}\")", "<div class=\"a\">&amp;</div>",
        "$ echo $HOME && ls -la | grep '.py'", "fn main() -> Result<(), Box<dyn Error>> {}", "x<<=2;y>>>=1"]
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\nhi<|im_end|>", "<repo_name>",
           "< |im_end| >", "<|im_end", "im_end|>"]


def numbers(rng: random.Random) -> str:
    kind = rng.randrange(9)
    if kind == 0:
        return str(rng.randrange(10 ** rng.randrange(1, 12)))
    if kind == 1:
        return f"{rng.uniform(-1e4, 1e4):.{rng.randrange(6)}f}"
    if kind == 2:
        return f"{rng.randrange(10 ** 9):,}"
    if kind == 3:
        return f"{rng.randrange(1900, 2100)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
    if kind == 4:
        return hex(rng.randrange(1 << 32))
    if kind == 5:
        return f"{rng.random():.3e}"
    if kind == 6:
        return f"v{rng.randrange(9)}.{rng.randrange(99)}.{rng.randrange(999)}"
    return "٣٤٥" if kind == 7 else "½ ² ⅓ Ⅻ"


def sample_strings(n: int = 1200, seed: int = 15) -> list[str]:
    """``n`` strings, each 1-12 pieces drawn from the pools above and joined with random
    separators; the first strings are the pools' members themselves."""
    rng = random.Random(seed)
    pools = [WORDS, SCRIPTS, EMOJI, SPACES, CODE, SPECIAL]
    out = [s for pool in pools for s in pool] + ["", " ", "  1", "a  1", "\n 2", "1 2  3   4", "x\t7"]
    while len(out) < n:
        pieces = []
        for _ in range(rng.randrange(1, 13)):
            kind = rng.randrange(len(pools) + 2)
            if kind == len(pools):
                pieces.append(numbers(rng))
            elif kind == len(pools) + 1:
                pieces.append("".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(1, 6))))
            else:
                pieces.append(rng.choice(pools[kind]))
        out.append("".join(p + rng.choice(["", " ", " ", "  ", "\n", "\t", ", ", "."]) for p in pieces))
    return out[:n]
