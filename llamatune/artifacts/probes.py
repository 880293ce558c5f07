"""Texts that tell tokenizers apart: the strings an exported GGUF must tokenize in llama.cpp exactly as the
training tokenizer does. Each group targets a part of pre-tokenization that differs between llama.cpp's
pre-tokenizer families (contractions, digit runs, whitespace runs, punctuation next to spaces, scripts,
emoji and joiners, code, special-token text); the last group recombines them so that boundaries between
kinds are crossed too. Original text written for llamatune.
"""

from __future__ import annotations

_PLAIN = [
    "Hello world", "hello World", "HELLO WORLD", "The patient's fever resolved after 3 days.",
    "It's a test, isn't it? I'm sure (mostly) — yes.", "We've seen they'll go; you'd agree, wouldn't you?",
    "'S 'T 'RE 'VE 'M 'LL 'D", "don't DON'T Don'T", "rock 'n' roll", "O'Neill v. O'Brien, 2nd Cir.",
    "e.g. i.e. etc. vs. Dr. Mrs. St.", "Section 1983 claims (42 U.S.C. § 1983)", "A–B—C‒D―E", "«quotes» „German“ “curly”",
    "ellipsis… and more...", "?!?!", "!!!!!!?????? ......", "semi;colon:colon,comma.", "(parenthesis) [bracket] {brace}",
    " (leading space paren", " {leading space brace", " —leading space dash",
]
_DIGITS = [
    "1", "12", "123", "1234", "12345", "1234567", "3.14159", "1,452.4 million", "$12,000.50", "-0.5e-10",
    "2026-12-03T16:48:18Z", "+1 (555) 010-9999", "0x1F 0b1010 0o17", "100%", "3..3 3...3", "v1.2.3-rc.4",
    "¹²³ ½ ¼ ⅓", "٣٤٥ १२३ ๑๒๓", "Q4 2025 EBITDA rose 12.5% YoY to $3.2bn",
]
_SPACE = [
    "  two leading", "trailing two  ", "\ttab\tseparated\tvalues", "line\nbreak", "crlf\r\nline", "\n\n\nnewlines",
    "     five spaces", "mixed \t \n whitespace", " ", "\n", "\t", "word  \n  word", "a\u00a0nbsp", "em\u2003space",
]
_SCRIPTS = [
    "naïve café façade", "Ünïcödé ÀÉÎÕÜ", "日本語のテキスト", "我想在apple工作1314151天～", "한국어 문장입니다",
    "нещо на Български", "Ελληνικά κείμενα", "עברית מימין לשמאל", "العربية من اليمين", "हिन्दी पाठ", "ไทยภาษา",
    "កាន់តែពិសេសអាច", "Tiếng Việt có dấu", "ẞtraße groß",
]
_EMOJI = [
    "🦙", "🦙🦙🦙", "🚀 (normal) 😶\u200d🌫️", "👩\u200d⚕️ doctor", "👍🏽 thumbs", "🇺🇸🇫🇷 flags", "✅ done ❌ failed",
    "zero\u200bwidth", "combining e\u0301 vs é",
]
_CODE = [
    "def f(x): {return x}", "for (int i = 0; i < n; ++i) { s += a[i]; }", "    indented = True\n        deeper()",
    "x = {'a': [1, 2], \"b\": None}", "SELECT * FROM t WHERE id = 42;", "<div class=\"x\">&amp;</div>",
    "```python\nprint('hi')\n```", "a==b!=c<=d>=e", "path/to/file.txt C:\\Users\\me", "#include <stdio.h>",
    "lambda: x ** 2 // 3 % 4", "$ ls -la | grep '^d'",
]
_SPECIAL_TEXT = ["<|im_start|>user", "<|im_end|>", "</s> <s>", "<|endoftext|>", "<unk>"]


def tokenizer_probes() -> list[str]:
    """100 varied strings: the groups above, then crossings of their kinds."""
    groups = [_PLAIN, _DIGITS, _SPACE, _SCRIPTS, _EMOJI, _CODE, _SPECIAL_TEXT]
    texts = [t for g in groups for t in g]
    kinds = [_PLAIN, _DIGITS, _SPACE, _SCRIPTS, _EMOJI, _CODE]
    i = 0
    while len(texts) < 100:  # deterministic crossings: one piece of two different kinds, joined
        a, b = kinds[i % len(kinds)], kinds[(i * 5 + 1) % len(kinds)]
        texts.append(a[(i * 7) % len(a)] + b[(i * 3) % len(b)])
        i += 1
    return texts[:100]
