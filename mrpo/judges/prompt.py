"""The step-judge prompt shared by the HTTP and local judges, and strict parsing of its JSON reply.

Reply format (steps numbered from 1, as shown to the judge):
    {"steps": [{"index": 1, "alignment": 0|1, "contribution": 0|1}, ...]}   exactly K entries
"""
from __future__ import annotations

import base64
import json
import mimetypes
import re
from pathlib import Path

from mrpo.judges.base import JudgeRequest, StepVerdict

PROMPT_VERSION = "mrpo-step-judge-v1"  # part of the cache key: bump when the prompt text changes

SYSTEM_PROMPT = """You are an expert radiologist and medical educator grading the reasoning of a \
medical visual question answering model, one step at a time.
For every numbered reasoning step give two binary labels:
- "alignment": 1 if the step is consistent with the reference rationale and with the image \
(it states nothing that contradicts them), else 0.
- "contribution": 1 if the step helps to derive the reference answer, else 0.
Judge each step on its own content; do not penalise a step for errors in other steps.
Reply with one JSON object and nothing else:
{"steps": [{"index": 1, "alignment": 0 or 1, "contribution": 0 or 1}, ...]}
with exactly one entry per step, in order, indices starting at 1."""


class JudgeResponseError(ValueError):
    """The judge's reply is not a valid verdict (bad JSON, wrong step count, labels not 0/1)."""


def user_text(req: JudgeRequest) -> str:
    """The user turn: question, reference answer and rationale, the K numbered steps."""
    steps = "\n".join(f"Step {i + 1}: {s}" for i, s in enumerate(req.steps))
    return (f"Question: {req.problem}\n"
            f"Reference answer: {req.gold_answer}\n"
            f"Reference rationale: {req.gold_reasoning or '(not available)'}\n\n"
            f"Reasoning steps to grade (K = {len(req.steps)}):\n{steps}\n\n"
            f"Return the JSON object with exactly {len(req.steps)} entries.")


def image_data_url(path: str) -> str:
    """data:<mime>;base64,<bytes> of an image file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"judge prompt: image file not found: {path}")
    mime = mimetypes.guess_type(p.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(p.read_bytes()).decode('ascii')}"


def build_messages(req: JudgeRequest, with_image: bool) -> list[dict]:
    """OpenAI chat messages [system, user]; with_image and a request with images: the user turn carries
    every image of the record, in order, as data URLs before the text; else it is plain text."""
    text = user_text(req)
    if with_image and req.image_paths:
        content: str | list = [{"type": "image_url", "image_url": {"url": image_data_url(p)}}
                               for p in req.image_paths] + [{"type": "text", "text": text}]
    else:
        content = text
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def _load_json(text: str) -> object:
    s = re.sub(r"^\s*```(?:json|JSON)?\s*|\s*```\s*$", "", text.strip())
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        pass
    i, j = s.find("{"), s.rfind("}")  # e.g. a reasoning model's preamble before the object
    if 0 <= i < j:
        try:
            return json.loads(s[i:j + 1])
        except json.JSONDecodeError:
            pass
    raise JudgeResponseError(f"not valid JSON: {text[:200]!r}")


def _label(item: dict, name: str, k: int) -> int:
    v = item.get(name)
    if isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)):
        return int(v)
    raise JudgeResponseError(f"step {k}: '{name}' must be 0 or 1, got {v!r}")


def parse_verdict(text: str, num_steps: int) -> StepVerdict:
    """StepVerdict from the judge's reply (```json fences tolerated); JudgeResponseError when the JSON
    is bad, the step count differs from num_steps, indices are not 1..K, or a label is not 0/1."""
    obj = _load_json(text)
    if not isinstance(obj, dict) or not isinstance(obj.get("steps"), list):
        raise JudgeResponseError(f"expected an object with a 'steps' list, got: {str(obj)[:200]!r}")
    items = obj["steps"]
    if len(items) != num_steps:
        raise JudgeResponseError(f"expected {num_steps} steps, got {len(items)}")
    if not all(isinstance(it, dict) for it in items):
        raise JudgeResponseError("every entry of 'steps' must be an object")
    with_index = [("index" in it) for it in items]
    if any(with_index):
        idx = [it.get("index") for it in items]
        if not all(with_index) or sorted(idx, key=str) != sorted(range(1, num_steps + 1), key=str):
            raise JudgeResponseError(f"step indices must be 1..{num_steps}, got {idx}")
        items = sorted(items, key=lambda it: it["index"])
    return StepVerdict(alignment=[_label(it, "alignment", k + 1) for k, it in enumerate(items)],
                       contribution=[_label(it, "contribution", k + 1) for k, it in enumerate(items)])
