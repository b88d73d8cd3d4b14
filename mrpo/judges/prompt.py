"""The step-judge prompt shared by the HTTP and local judges, and strict parsing of its JSON reply.

Reply format (steps numbered from 1, as shown to the judge):
    {"steps": [{"index": 1, "alignment": 0|1, "contribution": 0|1}, ...]}   exactly K entries

The prompt can be replaced by a file (judge.prompt_template; JudgePrompt.from_file), YAML with two keys:
    system: plain text of the system message (optional; default: the paper's SYSTEM_PROMPT; no fields)
    user:   the user turn, a Python str.format template (literal braces doubled) with the fields
            {question} {gold_answer} {gold_reasoning} ("(not available)" when unknown)
            {steps} (the K steps, one "Step i: ..." line each; required) {num_steps} (K)
The reply format above stays the same (the parser is fixed), so the prompt must keep asking for it.
A prompt other than the default gets its own cache key (PROMPT_VERSION + a hash of the two texts).
"""
from __future__ import annotations

import base64
import difflib
import hashlib
import json
import mimetypes
import re
import string
from dataclasses import dataclass
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


USER_TEMPLATE = """Question: {question}
Reference answer: {gold_answer}
Reference rationale: {gold_reasoning}

Reasoning steps to grade (K = {num_steps}):
{steps}

Return the JSON object with exactly {num_steps} entries."""

PROMPT_FIELDS = ("question", "gold_answer", "gold_reasoning", "steps", "num_steps")


class PromptTemplateError(ValueError):
    """judge.prompt_template is unusable; the message names the file and the key or field."""


def prompt_fields(req: JudgeRequest) -> dict:
    """The values of PROMPT_FIELDS for one request."""
    return {"question": req.problem, "gold_answer": req.gold_answer,
            "gold_reasoning": req.gold_reasoning or "(not available)",
            "steps": "\n".join(f"Step {i + 1}: {s}" for i, s in enumerate(req.steps)), "num_steps": len(req.steps)}


@dataclass(frozen=True)
class JudgePrompt:
    system: str = SYSTEM_PROMPT
    user: str = USER_TEMPLATE      # str.format template over PROMPT_FIELDS
    source: str = "built-in"       # where it came from (errors, repr)

    @property
    def version(self) -> str:
        """Part of the cache key: PROMPT_VERSION for the paper's prompt, else with a hash of both texts."""
        if (self.system, self.user) == (SYSTEM_PROMPT, USER_TEMPLATE):
            return PROMPT_VERSION
        digest = hashlib.sha256(f"{self.system}\0{self.user}".encode("utf-8")).hexdigest()[:16]
        return f"{PROMPT_VERSION}+template-{digest}"

    def user_text(self, req: JudgeRequest) -> str:
        return self.user.format(**prompt_fields(req))

    def messages(self, req: JudgeRequest, with_image: bool) -> list[dict]:
        """OpenAI chat messages [system, user]; with_image and a request with images: the user turn carries
        every image of the record, in order, as data URLs before the text; else it is plain text."""
        text = self.user_text(req)
        if with_image and req.image_paths:
            content: str | list = [{"type": "image_url", "image_url": {"url": image_data_url(p)}}
                                   for p in req.image_paths] + [{"type": "text", "text": text}]
        else:
            content = text
        return [{"role": "system", "content": self.system}, {"role": "user", "content": content}]

    @classmethod
    def load(cls, path: str | None) -> "JudgePrompt":
        """The prompt of judge.prompt_template (None = the paper's)."""
        return cls() if path is None else cls.from_file(path)

    @classmethod
    def from_file(cls, path: str | Path) -> "JudgePrompt":
        """Read and check a template file (see the module docstring); PromptTemplateError naming the file
        and the offending key or field."""
        import yaml

        where = f"judge.prompt_template={str(path)!r}"
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PromptTemplateError(f"{where}: file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise PromptTemplateError(f"{where}: cannot read it: {e}") from None
        except yaml.YAMLError as e:
            raise PromptTemplateError(f"{where}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            raise PromptTemplateError(f"{where}: expected a YAML mapping with keys 'system' (optional) and 'user'")
        for key in data:
            if key not in ("system", "user"):
                raise PromptTemplateError(f"{where}: unknown key '{key}' (keys: system, user)")
        if not isinstance(data.get("user"), str) or not data["user"].strip():
            raise PromptTemplateError(f"{where}: 'user' must be a non-empty text (the user turn with {{steps}})")
        system = data.get("system", SYSTEM_PROMPT)
        if not isinstance(system, str) or not system.strip():
            raise PromptTemplateError(f"{where}: 'system' must be a non-empty text (or left out for the default)")
        _check_template(data["user"], where)
        return cls(system=system, user=data["user"], source=str(path))


def _check_template(template: str, where: str) -> None:
    """Refuse a user template whose fields are not PROMPT_FIELDS, or that cannot be rendered."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:   # a lone { or }
        raise PromptTemplateError(f"{where}: 'user' is not a valid template ({e}; write literal braces as "
                                  f"{{{{ and }}}})") from None
    names = set()
    for _, field, _, _ in parsed:
        if field is None:
            continue
        if field == "" or field.isdigit():
            raise PromptTemplateError(f"{where}: positional field {{{field}}} in 'user'; name one of "
                                      f"{', '.join(PROMPT_FIELDS)}")
        if field not in PROMPT_FIELDS:
            close = difflib.get_close_matches(field, PROMPT_FIELDS, n=1)
            hint = f" (did you mean {{{close[0]}}}?)" if close else ""
            raise PromptTemplateError(f"{where}: unknown field {{{field}}} in 'user'{hint}; fields: "
                                      f"{', '.join(PROMPT_FIELDS)}")
        names.add(field)
    if "steps" not in names:
        raise PromptTemplateError(f"{where}: 'user' has no {{steps}} field: the judge would not see the steps")
    probe = JudgeRequest(sample_id="probe", problem="q", image=None, gold_answer="a", gold_reasoning="r",
                         steps=["s1", "s2"])
    try:
        template.format(**prompt_fields(probe))
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise PromptTemplateError(f"{where}: 'user' cannot be rendered: {e}") from None


DEFAULT_PROMPT = JudgePrompt()


def user_text(req: JudgeRequest) -> str:
    """The paper's user turn: question, reference answer and rationale, the K numbered steps."""
    return DEFAULT_PROMPT.user_text(req)


def image_data_url(path: str) -> str:
    """data:<mime>;base64,<bytes> of an image file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"judge prompt: image file not found: {path}")
    mime = mimetypes.guess_type(p.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(p.read_bytes()).decode('ascii')}"


def build_messages(req: JudgeRequest, with_image: bool, prompt: JudgePrompt = DEFAULT_PROMPT) -> list[dict]:
    """prompt.messages(req, with_image) (the paper's prompt by default)."""
    return prompt.messages(req, with_image)


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
