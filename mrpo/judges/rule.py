"""Rule-based step judge for the synthetic data set: checks each step against JudgeRequest.facts.

A step *states* a fact when it mentions it in an assertion (sentences that ask or hedge - a "?",
"whether", "if ...", "the question ..." - state nothing). Facts read from free text:
  modality  CT / MRI / X-ray / histology (and synonyms: "computed tomography", "radiograph", "slide")
  organ     brain / lung / liver / kidney (plurals, "hepatic", "renal", "pulmonary", "cerebral")
  count     "two lesions", "3 nodules", "a single mass", "no lesions" (= 0)
  presence  "no lesion", "without lesions", "lesions are absent" (False); any other lesion assertion (True)
  side      left / right / both ("bilateral", "each side", "left and right")
  size      small / large (and "tiny", "big", ...)
  answer    "the answer is X" / "answer: X"
alignment    = 1 when the step states at least one fact and every stated fact agrees with the facts
contribution = 1 when the step states, correctly, the fact the question asks about or the gold answer
Requests without facts are unjudged (None) and counted in `stats.failures`.
"""
from __future__ import annotations

import re
from typing import Sequence

from mrpo.judges.base import JudgeRequest, JudgeStats, StepVerdict

_WORD_NUMBERS = {"zero": 0, "no": 0, "none": 0, "one": 1, "single": 1, "solitary": 1, "two": 2, "three": 3,
                 "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
_LESION = r"(?:lesions?|mass(?:es)?|nodules?|tumou?rs?|spots?|opacit(?:y|ies)|foc(?:us|i)|nests?|abnormalit(?:y|ies))"
_MODALITY = {
    "ct": re.compile(r"\bct\b|computed tomograph|\bcat scan"),
    "mri": re.compile(r"\bmri?\b|magnetic resonance|\bt[12][- ]weighted"),
    "x-ray": re.compile(r"\bx[\s-]?rays?\b|radiograph|\bxr\b"),
    "histology": re.compile(r"histolog|histopatholog|microscop|\bslides?\b|\bh&e\b|\bbiopsy\b|\bstain"),
}
_ORGAN = {
    "brain": re.compile(r"\bbrains?\b|cerebr|intracranial"),
    "lung": re.compile(r"\blungs?\b|pulmonar|\bchest\b|thora"),
    "liver": re.compile(r"\blivers?\b|hepat"),
    "kidney": re.compile(r"\bkidneys?\b|\brenal\b|nephr"),
}
_SIZE = {
    "small": re.compile(r"\b(?:small|tiny|little|minute|punctate)\b"),
    "large": re.compile(r"\b(?:large|big|huge|sizable|sizeable|massive)\b"),
}
_HEDGE = re.compile(r"\?|\bwhether\b|\bif\b|\bquestion\b|\bmight\b|\bmay\b|\bcould\b|\bneed to\b|\bcheck\b")
_BOTH = re.compile(r"\bboth sides\b|\bbilateral(?:ly)?\b|\beach side\b"
                   r"|\bleft and (?:the )?right\b|\bright and (?:the )?left\b")
_NEGATED = re.compile(
    rf"\b(?:no|without|zero|0|absence of|free of|not (?:\w+ ){{0,3}}?(?:any )?)(?:[a-z-]+ ){{0,2}}?{_LESION}\b"
    rf"|\b{_LESION} (?:is |are )?(?:absent|not (?:present|seen|visible|detected|identified))"
    r"|\b(?:none|nothing abnormal)\b")
_COUNT = re.compile(rf"\b(\d+|{'|'.join(_WORD_NUMBERS)})\s+(?!of\b)(?:[a-z-]+\s+){{0,2}}?{_LESION}\b")
_ANSWER = re.compile(r"\banswer\s*(?:is|:|=|would be|should be|will be)\s*(.+)$")
_ARTICLE = re.compile(r"^(?:the|a|an)\s+")
_CANON = [  # (pattern, replacement) applied to answers before comparison
    (re.compile(r"\bx[\s-]?rays?\b|\bradiographs?\b"), "x-ray"),
    (re.compile(r"\bcomputed tomography\b"), "ct"),
    (re.compile(r"\bmagnetic resonance(?: imaging)?\b"), "mri"),
    (re.compile(r"\b(lung|kidney|brain|liver|lesion)s\b"), r"\1"),
    (re.compile(r"\s+(?:scan|image|tissue|side|sides|lesion|organ)$"), ""),
]


def _canon_answer(text: str) -> str:
    """Lower-case, strip punctuation and articles, number words -> digits, modality/organ synonyms."""
    t = re.sub(r"[^a-z0-9&\s-]", " ", text.lower())
    t = re.sub(r"\s+", " ", t).strip()
    t = _ARTICLE.sub("", t)
    for pat, rep in _CANON:
        t = pat.sub(rep, t)
    return " ".join(str(_WORD_NUMBERS[w]) if w in _WORD_NUMBERS and w not in ("no", "none") else w
                    for w in t.split())


def _total_count(counts: list[int]) -> int:
    """One total from several count mentions: "three lesions, two left and one right" -> 3,
    "two lesions on the left and one lesion on the right" -> 3."""
    if len(counts) == 1:
        return counts[0]
    top = max(counts)
    rest = sum(counts) - top
    return top if rest == top else sum(counts)


def extract_facts(step: str) -> dict:
    """Facts asserted by one step: any of modality, organ (sets of values), count (int),
    presence (bool), side ("left" | "right" | "both"), size (set), answer (canonical str)."""
    text = " ".join(step.lower().split())
    if not text or _HEDGE.search(text):
        return {}
    out: dict = {}
    m = _ANSWER.search(text)
    if m:  # the answer clause states only the answer ("the answer is left" is not a side finding)
        out["answer"] = _canon_answer(m.group(1))
        text = text[: m.start()]
    for key, table in (("modality", _MODALITY), ("organ", _ORGAN)):
        found = {name for name, pat in table.items() if pat.search(text)}
        if found:
            out[key] = found
    sizes = set()
    for name, pat in _SIZE.items():  # "not large" states small (size is binary here)
        for m in pat.finditer(text):
            negated = re.search(r"\bnot (?:very |too |so |that )?$", text[: m.start()])
            sizes.add(("large" if name == "small" else "small") if negated else name)
    if sizes:
        out["size"] = sizes
    counts = [int(n) if n.isdigit() else _WORD_NUMBERS[n] for n in _COUNT.findall(text)]
    if _NEGATED.search(text) and not any(counts):
        out["count"], out["presence"] = 0, False
    elif counts:
        out["count"] = _total_count(counts)
        out["presence"] = out["count"] > 0
    elif re.search(rf"\b{_LESION}\b", text):
        out["presence"] = True
    if _BOTH.search(text):
        out["side"] = "both"
    else:
        sides = [s for s in ("left", "right") if re.search(rf"\b{s}\b", text)]
        if sides:
            out["side"] = "both" if len(sides) == 2 else sides[0]
    return out


def _agrees(key: str, stated, facts: dict) -> bool | None:
    """Whether a stated fact matches the ground truth; None when the truth for it is unknown."""
    count = facts.get("lesion_count")
    if key in ("modality", "organ"):
        truth = facts.get(key)
        return None if truth is None else stated == {truth}
    if key == "count":
        return None if count is None else stated == count
    if key == "presence":
        return None if count is None else stated == (count > 0)
    if key == "side":
        return None if count is None else stated == facts.get("side")  # side is None without lesions
    if key == "size":
        return None if count is None else stated == {facts.get("size")}
    if key == "answer":
        truth = facts.get("answer")
        if truth is None:
            return None
        gold = _canon_answer(str(truth))
        return stated == gold or (gold in ("yes", "no") and stated.split()[:1] == [gold])
    return None


_ASKED_KEYS = {"modality": ("modality",), "organ": ("organ",), "presence": ("presence", "count"),
               "count": ("count",), "laterality": ("side",), "size": ("size",)}


class RuleJudge:
    """StepJudge for requests that carry `facts` (the synthetic data set). Deterministic, no I/O."""

    def __init__(self, cfg=None):
        self.cfg = cfg
        self.stats = JudgeStats()

    def judge_steps(self, steps: Sequence[str], facts: dict) -> StepVerdict:
        asked = _ASKED_KEYS.get(facts.get("question_type", ""), ())
        alignment, contribution = [], []
        for step in steps:
            stated = extract_facts(step)
            verdicts = {k: _agrees(k, v, facts) for k, v in stated.items()}
            checked = [ok for ok in verdicts.values() if ok is not None]
            alignment.append(int(bool(checked) and all(checked)))
            contribution.append(int(any(verdicts.get(k) for k in (*asked, "answer"))))
        return StepVerdict(alignment=alignment, contribution=contribution)

    def judge(self, requests: Sequence[JudgeRequest]) -> list[StepVerdict | None]:
        out: list[StepVerdict | None] = []
        for req in requests:
            self.stats.requests += 1
            if not req.facts:
                self.stats.add_failure("no_label", f"sample {req.sample_id} has no ground-truth facts")
                out.append(None)
                continue
            out.append(self.judge_steps(req.steps, req.facts))
        return out
