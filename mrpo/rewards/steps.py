"""Reasoning steps: extract the reasoning block, split it into sentences, map steps to generated tokens.

All spans are character offsets [start, end) into the completion text, and the token <-> step map is
built from the character span of every *generated* token in the decoded text (never by re-tokenising
sentences and searching, which breaks on BPE merges such as ".\\nThe" being a single token).

Sentence rule (the paper's default): split after `.`, `!` or `?` (optionally followed by closing
quotes/brackets) when whitespace follows; a piece that is only a numbering fragment ("1.", "b.",
"(2).", "iv.", "Step 3.") merges into the next sentence; a line break before a list item ("2. ",
"3) ", "- ", "Step 4:") also ends a piece (lists whose items lack a final period); a few common
abbreviations ("e.g.", "i.e.", "vs.", "Dr.", "Fig.", "approx.", ...) do not end a sentence.
Whitespace is stripped from every span and empty pieces are skipped.

Special tokens (EOS, pad, the chat end token such as <|im_end|>, from the tokenizer: see
`special_token_strings`) never become part of a step: each occurrence ends the current piece and is left
out of every step, so reasoning cut off without its closing tag ("<think>A. B<|im_end|>") gives the steps
"A." and "B", and the judge never sees the token.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

# Do not end a sentence after these (lower-cased, with their final dot).
ABBREVIATIONS = frozenset({
    "e.g.", "i.e.", "vs.", "cf.", "dr.", "mr.", "mrs.", "ms.", "prof.", "fig.", "figs.", "approx.",
    "al.", "st.", "resp.",
})

# end of a sentence: . ! ? (plus closing quotes/brackets) followed by whitespace
_BOUNDARY = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(?=\s)")
# a line break before a list item ("2. ", "3) ", "- ", "* ", "Step 4:") also ends the previous piece
_LIST_BREAK = re.compile(r"\n(?=[ \t]*(?:\d{1,3}[.)]|[-*\u2022]|(?:step|Step|STEP)[ \t]*\d{1,3}[.:)]?)\s)")
# a piece that is only a numbering fragment merges into the next sentence
_NUMBERING = re.compile(r"\(?(?:\d{1,3}|[A-Za-z]|[ivxlcIVXLC]{1,5})\)?\.|(?:step|Step|STEP)[ \t]*\d{1,3}\.")


@dataclass
class Step:
    text: str
    start: int  # char offset in the completion text (inclusive)
    end: int    # char offset (exclusive); text == completion[start:end]


def extract_reasoning(text: str, tag: str = "think") -> tuple[str, int] | None:
    """The reasoning inside <tag>...</tag> and its char offset in `text`, or None when there is none.

    Cut at "<answer>" if it appears inside. A missing closing tag is tolerated (the reasoning runs to
    "<answer>" or the end); so is a missing *opening* tag when the closing tag is present (chat
    templates that put "<think>" in the prompt), in which case the reasoning starts at offset 0.
    """
    open_tag, close_tag = f"<{tag}>", f"</{tag}>"
    i = text.find(open_tag)
    if i >= 0:
        start = i + len(open_tag)
    elif close_tag in text:
        start = 0
    else:
        return None
    end = text.find(close_tag, start)
    end = len(text) if end < 0 else end
    a = text.find("<answer>", start, end)
    end = a if a >= 0 else end
    return text[start:end], start


def _strip_span(text: str, s: int, e: int) -> tuple[int, int]:
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    return s, e


def _ends_with_abbreviation(text: str, end: int) -> bool:
    words = text[:end].split()
    return bool(words) and words[-1].lstrip("([{\"'").lower() in ABBREVIATIONS


@functools.lru_cache(maxsize=16)
def _exclusion_pattern(exclude: tuple[str, ...]) -> re.Pattern:
    # longest first, so a token that contains another ("<|im_end|>" vs "<|im_end|>x") matches whole
    return re.compile("|".join(re.escape(t) for t in sorted(set(exclude), key=len, reverse=True)))


def split_steps(text: str, offset: int = 0, exclude: Sequence[str] = ()) -> list[Step]:
    """Split `text` into sentence steps; spans are shifted by `offset` (char units). Every occurrence of
    a string of `exclude` (special tokens) ends a piece and belongs to no step."""
    excluded = [m.span() for m in _exclusion_pattern(tuple(exclude)).finditer(text)] if exclude else []
    cuts = {m.end() for m in _BOUNDARY.finditer(text)
            if not (m.group(0)[0] == "." and _ends_with_abbreviation(text, m.start() + 1))}
    cuts |= {m.start() for m in _LIST_BREAK.finditer(text)}
    cuts = {c for c in cuts if not any(s < c < e for s, e in excluded)} | {c for span in excluded for c in span}
    bounds = [0, *sorted(cuts), len(text)]

    steps: list[Step] = []
    pending: int | None = None  # start of numbering fragments waiting for their sentence

    def flush_pending(end: int) -> None:  # numbering fragment with no sentence after it: keep it as a step
        s, e = _strip_span(text, pending, end)
        steps.append(Step(text[s:e], s + offset, e + offset))

    excluded_set = set(excluded)
    for s, e in zip(bounds[:-1], bounds[1:]):
        if (s, e) in excluded_set:
            if pending is not None:
                flush_pending(s)
                pending = None
            continue
        s, e = _strip_span(text, s, e)
        if s == e:
            continue
        if _NUMBERING.fullmatch(text[s:e]):
            pending = s if pending is None else pending
            continue
        if pending is not None:
            s, pending = pending, None
        steps.append(Step(text[s:e], s + offset, e + offset))
    if pending is not None:
        flush_pending(len(text))
    return steps


def segment_steps(completion: str, tag: str = "think", exclude: Sequence[str] = ()) -> list[Step]:
    """Steps of a completion's reasoning, spans in completion coordinates; [] when no reasoning.
    exclude: special-token strings that never belong to a step (see `special_token_strings`)."""
    found = extract_reasoning(completion, tag)
    if found is None:
        return []
    reasoning, offset = found
    return split_steps(reasoning, offset, exclude)


def special_token_strings(tokenizer, keep: Iterable[str] = ()) -> tuple[str, ...]:
    """The tokenizer's special tokens as text (its all_special_tokens and every added token marked
    special: EOS, pad, the chat end token, vision tokens, ...), minus `keep`, longest first.

    tokenizer: a Hugging Face tokenizer or a processor holding one (`.tokenizer`). keep: the reasoning
    and answer tags, which some tokenizers register as special tokens (see `reasoning_tags`).
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    names = set(getattr(tok, "all_special_tokens", None) or ())
    names |= {t.content for t in (getattr(tok, "added_tokens_decoder", None) or {}).values() if t.special}
    names -= set(keep)
    return tuple(sorted((n for n in names if n), key=len, reverse=True))


def special_token_ids(tokenizer, strings: Iterable[str]) -> frozenset[int]:
    """Ids of the special-token strings (from `special_token_strings`); strings that are no single
    token of the vocabulary are skipped."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    strings = list(strings)
    ids = tok.convert_tokens_to_ids(strings) if strings else []
    return frozenset(i for s, i in zip(strings, ids) if i is not None and tok.convert_ids_to_tokens(i) == s)


def reasoning_tags(tag: str = "think") -> tuple[str, ...]:
    """The tags a completion is made of: <tag>, </tag>, <answer>, </answer>."""
    return (f"<{tag}>", f"</{tag}>", "<answer>", "</answer>")


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _token_chunks(tokenizer, ids: list[int], window: int | None) -> list[str]:
    """The text each token adds to the decoded text (incremental decoding, as in vLLM/TGI detokenizers).

    Decodes ids[lo:i+1] and emits what it adds over the text already emitted. lo trails the last
    "clean" token boundary (no incomplete character before it) by `window` tokens of context, so the
    cost is O(T * window); window=None decodes from the start every time (O(T^2)). Trailing U+FFFD
    (bytes of a character not yet complete) are held back: each character goes to the token that
    completes it, and a token that completes none gets an empty chunk.
    """
    chunks: list[str] = []
    lo, base, since = 0, "", 0  # window start, decode(ids[lo:clean]), chars emitted after `clean`
    for i in range(len(ids)):
        new = _decode(tokenizer, ids[lo:i + 1])
        complete = new.rstrip("\ufffd")
        c = complete[len(base) + since:] if new.startswith(base) else ""
        chunks.append(c)
        since += len(c)
        if window is not None and len(complete) == len(new):  # clean boundary after token i
            lo = max(0, i + 1 - window)
            base, since = _decode(tokenizer, ids[lo:i + 1]), 0
    return chunks


def token_offsets(tokenizer, ids) -> tuple[str, list[tuple[int, int]]]:
    """Decoded text (skip_special_tokens=False) and each generated token's char span [s, e) in it.

    tokenizer: any HF tokenizer (or processor) with .decode; ids: [T] generated token ids (list or 1-D
    tensor). Spans are contiguous and cover the text exactly. With byte-level BPE a character whose
    bytes span several tokens belongs to the token holding its last byte; the others may get an empty
    span. Checked: the spans must rebuild the decoded text, else the O(T^2) prefix method is tried,
    else ValueError.
    """
    ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    text = _decode(tokenizer, ids)
    for window in (8, None):
        chunks = _token_chunks(tokenizer, ids, window)
        joined = "".join(chunks)
        if chunks and joined != text and text.startswith(joined):
            chunks[-1] += text[len(joined):]  # generation stopped inside a character: last token
            joined = text
        if joined == text:
            offsets, pos = [], 0
            for c in chunks:
                offsets.append((pos, pos + len(c)))
                pos += len(c)
            return text, offsets
    raise ValueError(f"token_offsets: incremental decoding of {len(ids)} ids with "
                     f"{type(tokenizer).__name__} does not reproduce the decoded text")


def token_step_index(offsets: list[tuple[int, int]], steps: list[Step],
                     special: Sequence[bool] | None = None) -> list[int]:
    """Per token: index of the step its span overlaps most (ties -> earlier step), -1 if none.

    offsets: [T] char spans from token_offsets; steps: sorted, non-overlapping spans in the same text.
    An empty span at position p (a token ending inside a multi-byte character) takes the step that
    contains the character starting at p. special: [T], True for a special token (EOS, pad, chat end),
    which always gets -1 (the plain advantage), even where its span touches a step.
    """
    out: list[int] = []
    j = 0  # first step whose end is after the current token's start (tokens and steps are sorted)
    for t, (s, e) in enumerate(offsets):
        if special is not None and special[t]:
            out.append(-1)
            continue
        while j < len(steps) and steps[j].end <= s:
            j += 1
        best, best_overlap = -1, 0
        if s == e:
            if j < len(steps) and steps[j].start <= s < steps[j].end:
                best = j
        else:
            k = j
            while k < len(steps) and steps[k].start < e:
                overlap = min(e, steps[k].end) - max(s, steps[k].start)
                if overlap > best_overlap:
                    best, best_overlap = k, overlap
                k += 1
        out.append(best)
    return out
