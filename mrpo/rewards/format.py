"""Format reward: 1.0 when the completion is exactly one <tag>reasoning</tag> then one <answer>...</answer>."""
from __future__ import annotations

import re

# after </answer> only whitespace and end-of-turn special tokens (<|im_end|>, <|endoftext|>, </s>)
_TRAILER = r"(?:\s*(?:<\|[^|<>\s]*\|>|</s>))*\s*"


def format_reward(text: str, tag: str = "think") -> float:
    """1.0 if `text` is <tag>R</tag> <answer>A</answer> (only whitespace around, R and A non-empty and
    free of further tags of either kind), else 0.0."""
    t = re.escape(tag)
    m = re.fullmatch(rf"\s*<{t}>(.*?)</{t}>\s*<answer>(.*?)</answer>{_TRAILER}", text, re.DOTALL)
    if m is None:
        return 0.0
    reasoning, answer = m.group(1), m.group(2)
    tags = (f"<{tag}>", f"</{tag}>", "<answer>", "</answer>")
    if not reasoning.strip() or not answer.strip() or any(x in reasoning or x in answer for x in tags):
        return 0.0
    return 1.0
