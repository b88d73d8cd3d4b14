"""The user turn of a prompt: the paper's instruction as a format string (data.prompt_template), and the
error of a prompt longer than data.max_prompt_length."""
from __future__ import annotations

import functools
import string
from pathlib import Path

# The instruction of the MRPO paper (dmis-lab/MRPO, grpo_vqa_MRPO.py QUESTION_TEMPLATE), for every backbone;
# reasoning_tag is "thinking" for Qwen3-VL and "think" otherwise.
DEFAULT_PROMPT_TEMPLATE = ("{question} Think step-by-step and enclose your reasoning in "
                           "<{reasoning_tag}>...</{reasoning_tag}> tags. Then provide your answer in "
                           "<{answer_tag}>...</{answer_tag}> tags.")
PROMPT_FIELDS = ("question", "reasoning_tag", "answer_tag")
ANSWER_TAG = "answer"   # what mrpo.rewards.answer extracts


@functools.lru_cache(maxsize=32)
def load_prompt_template(spec: str | None) -> str:
    """The prompt template (data.prompt_template) as a format string.

    spec: None = DEFAULT_PROMPT_TEMPLATE (the paper's instruction); a string holding "{question}" is the
    template itself; any other string is the path of a UTF-8 text file holding one (read once; a
    trailing newline is dropped). Fields: {question} (required), {reasoning_tag} ("think", or "thinking"
    for Qwen3-VL), {answer_tag} ("answer"); write literal braces as {{ and }}.
    Raises FileNotFoundError / ValueError naming the file, a missing {question} or an unknown field."""
    if spec is None:
        return DEFAULT_PROMPT_TEMPLATE
    template, where = spec, "data.prompt_template"
    if "{question}" not in spec:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data.prompt_template: {spec!r} holds no {{question}} field and is not a "
                                    f"file (a template, or the path of a text file holding one)")
        template, where = path.read_text(encoding="utf-8").removesuffix("\n"), f"data.prompt_template file {path}"
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ValueError(f"{where}: not a valid format string ({e}); write literal braces as {{{{ and }}}}") from None
    unknown = sorted(fields - set(PROMPT_FIELDS))
    if unknown or "question" not in fields:
        why = f"unknown fields {unknown}" if unknown else "no {question} field"
        raise ValueError(f"{where}: {why}; allowed fields: {', '.join('{' + f + '}' for f in PROMPT_FIELDS)}")
    return template


def format_prompt(prompt_template: str | None, question: str, reasoning_tag: str) -> str:
    """The user turn's text for one question (see load_prompt_template)."""
    return load_prompt_template(prompt_template).format(question=question, reasoning_tag=reasoning_tag,
                                                        answer_tag=ANSWER_TAG)


class PromptTooLongError(ValueError):
    """A prompt (text + image tokens) is longer than max_prompt_length. `index`: the first such row of
    the batch, `indices`: all of them, `lengths`: their token counts."""

    def __init__(self, index: int, indices: list[int] | None = None, lengths: list[int] | None = None,
                 limit: int | None = None):
        self.index, self.indices, self.lengths, self.limit = index, indices or [index], lengths or [], limit
        super().__init__(f"prompt {index} has {self.lengths[0] if self.lengths else '?'} tokens > "
                         f"max_prompt_length={limit} (over-long rows in this batch: {self.indices})")
