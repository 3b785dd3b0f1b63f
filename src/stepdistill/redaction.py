"""Secrets never stored: API keys and key-shaped strings replaced by [redacted].

A teacher's completions pass through `redact_secrets` before the store sees them (a server may
echo the key it was sent), and so does the command line a run records in env.json.
"""

from __future__ import annotations

import re

REDACTED = "[redacted]"
# Shapes of API keys and tokens no rationale needs, so a completion never carries one into the
# store (a server may echo the key it was sent, or a model repeat one from its context). Each
# needs its provider's prefix and a long run of key characters: ordinary words stay untouched.
SECRET_PATTERN = re.compile("|".join([
    r"(?<![\w-])(?:sk|xai)-[A-Za-z0-9_-]{20,}",  # OpenAI sk-..., sk-proj-...; Anthropic sk-ant-...; DeepSeek; xAI
    r"(?<![\w-])(?:hf|gsk|ghp|gho|ghu|ghs|ghr|github_pat|glpat)_[A-Za-z0-9_]{20,}",  # HF, Groq, GitHub
    r"(?<![\w-])glpat-[A-Za-z0-9_-]{20,}",  # GitLab
    r"(?<![\w-])xox[abposr]-[A-Za-z0-9-]{10,}",  # Slack
    r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Za-z0-9])",  # AWS access key id
    r"(?<![\w-])AIza[0-9A-Za-z_-]{35}",  # Google API key
    r"\b[Bb]earer\s+[A-Za-z0-9._~+/-]{16,}=*",  # an Authorization header's token
]))
MIN_KEY_REDACTED = 8  # a key this short is replaced only where it matches SECRET_PATTERN: "abc" is in words


def redact_secrets(text: str, key: str | None = None) -> tuple[str, int]:
    """`text` with `key` and anything shaped like an API key replaced by [redacted], and how many.

    >>> redact_secrets("my key is sk-proj-abcdefghijklmnopqrstuvwx, 2 + 2 = 4")
    ('my key is [redacted], 2 + 2 = 4', 1)
    """
    n = 0
    if key and len(key) >= MIN_KEY_REDACTED:
        n = text.count(key)
        text = text.replace(key, REDACTED)
    text, m = SECRET_PATTERN.subn(REDACTED, text)
    return text, n + m
