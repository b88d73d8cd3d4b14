"""Answer reward R_ans in [0, 1]: exact/equivalent match, else a weighted text similarity.

    R_ans = 1.0                                          if answers_match(pred, gold)
          = 0.25 * ROUGE-1 F1 + 0.25 * BLEU-1 + 0.5 * BERTScore F1    (BERT model at a local path)
          = 0.5  * ROUGE-1 F1 + 0.5  * BLEU-1                          (no BERT model: fallback, warned once)
          = 0.0                                          if no answer, or a closed yes/no question
                                                         answered otherwise (no partial credit: the
                                                         similarity of "no" and "yes" is high)

answers_match: normalised exact match (case, punctuation, articles, whitespace), yes/no equivalence
("Yes, there is ..." == "yes"), numeric equivalence ("2" == "two" == "2.0" == "4/2"), and symbolic
equivalence through math-verify (`pip install math-verify`) when it is installed and both answers
look like math; without it only the numeric check runs (no eval-based sympy parsing of model output).
"""
from __future__ import annotations

import os
import re
import threading
import unicodedata
import warnings
from fractions import Fraction

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[^\W_]+")
_ARTICLES = frozenset({"a", "an", "the"})
_YES = frozenset({"yes", "true", "correct", "yeah", "yep"})
_NO = frozenset({"no", "false", "incorrect", "nope"})
_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * (i + 2) for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}

try:  # optional: symbolic equivalence of math answers
    from math_verify import parse as _mv_parse, verify as _mv_verify
except ImportError:  # pragma: no cover - depends on the environment
    _mv_parse = _mv_verify = None

_FALLBACK_WARNED = False


def extract_answer(text: str) -> str | None:
    """Content of the last <answer>...</answer> (stripped), None when absent or empty."""
    found = _ANSWER.findall(text)
    if not found or not found[-1].strip():
        return None
    return found[-1].strip()


def normalize_answer(s: str) -> str:
    """NFKC, lower case, punctuation and articles removed, single spaces ("The Left-Lung." -> "left lung").

    Numbers keep their decimal point / thousands separators ("2.5" stays "2.5").
    """
    tokens = _TOKEN.findall(unicodedata.normalize("NFKC", s).lower())
    return " ".join(t for t in tokens if t not in _ARTICLES)


def _polarity(s: str) -> str | None:
    """'yes' / 'no' when the answer starts with a yes/no word ("No.", "Yes, there is ..."), else None."""
    tokens = normalize_answer(s).split()
    if tokens and tokens[0] in _YES:
        return "yes"
    if tokens and tokens[0] in _NO:
        return "no"
    return None


def _is_yes_no(s: str) -> bool:
    """A closed yes/no answer: the whole normalised answer is one yes/no word."""
    tokens = normalize_answer(s).split()
    return len(tokens) == 1 and _polarity(s) is not None


def _number(s: str) -> Fraction | None:
    """The value of a purely numeric answer ("2", "2.0", "1,000", "1/2", "-3e2", "twenty one"), else None."""
    t = unicodedata.normalize("NFKC", s).strip().lower().rstrip(".").strip()
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", t):
        t = t.replace(",", "")
    if re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)(e[+-]?\d+)?|[+-]?\d+\s*/\s*\d+", t):
        try:
            return Fraction(t.replace(" ", ""))
        except (ValueError, ZeroDivisionError):
            return None
    words = [w for w in re.split(r"[\s-]+", t) if w and w != "and"]
    if not words or not all(w in _UNITS or w in _TENS or w in ("hundred", "thousand") for w in words):
        return None
    total = current = 0
    for w in words:
        if w in _UNITS:
            current += _UNITS[w]
        elif w in _TENS:
            current += _TENS[w]
        elif w == "hundred":
            current = max(current, 1) * 100
        else:
            total, current = total + max(current, 1) * 1000, 0
    return Fraction(total + current)


def _looks_math(s: str) -> bool:
    """Digits or LaTeX and no plain words of 2+ letters (so "3 lesions" is not treated as math)."""
    if len(s) > 200 or not re.search(r"[\d\\]", s):
        return False
    return re.search(r"[A-Za-z]{2,}", re.sub(r"\\[A-Za-z]+", " ", s)) is None


def _math_verify(pred: str, gold: str) -> bool:
    """Symbolic equivalence by math-verify; its timeouts use signal.alarm, so only in the main thread."""
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    wrap = lambda s: s if "$" in s else f"${s}$"  # noqa: E731  (LaTeX extraction needs delimiters)
    try:
        return bool(_mv_verify(_mv_parse(wrap(gold), parsing_timeout=timeout),
                               _mv_parse(wrap(pred), parsing_timeout=timeout), timeout_seconds=timeout))
    except Exception:  # unparsable or timed out: not equivalent
        return False


def answers_match(pred: str, gold: str) -> bool:
    """True when pred and gold are equivalent answers (see module docstring)."""
    p, g = normalize_answer(pred), normalize_answer(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    if _is_yes_no(gold):
        return _polarity(pred) == _polarity(gold)
    pn, gn = _number(pred), _number(gold)
    if pn is not None and gn is not None:
        return pn == gn
    if _mv_verify is not None and _looks_math(pred) and _looks_math(gold):
        return _math_verify(pred, gold)
    return False


def _bert_num_layers(path: str) -> int:
    """BERTScore's tuned layer when the folder is named like a known model, else 3/4 of the depth
    (bert-base: 9 of 12, the tuned value)."""
    from bert_score.utils import model2layers
    from transformers import AutoConfig

    name = os.path.basename(os.path.normpath(path))
    for key, layers in model2layers.items():
        if key.split("/")[-1] == name:
            return layers
    depth = AutoConfig.from_pretrained(path).num_hidden_layers
    return max(1, round(0.75 * depth))


class AnswerScorer:
    """R_ans for (prediction, gold) pairs. bert_model_path: local HF BERT folder (e.g. BiomedBERT);
    None = ROUGE/BLEU fallback. The BERT model is loaded on first use, never from a hub."""

    def __init__(self, bert_model_path: str | None = None, device: str = "cpu", num_layers: int | None = None,
                 batch_size: int = 64):
        global _FALLBACK_WARNED
        from nltk.translate.bleu_score import SmoothingFunction
        from rouge_score import rouge_scorer

        if bert_model_path is not None and not os.path.isdir(bert_model_path):
            raise FileNotFoundError(f"AnswerScorer: reward.bert_model_path={bert_model_path!r} is not a folder")
        if bert_model_path is None and not _FALLBACK_WARNED:
            warnings.warn("AnswerScorer: no reward.bert_model_path; answer reward for non-matching answers "
                          "uses the fallback 0.5*ROUGE-1 F1 + 0.5*BLEU-1 (no BERTScore)", stacklevel=2)
            _FALLBACK_WARNED = True
        self.bert_model_path, self.device = bert_model_path, device
        self.num_layers, self.batch_size = num_layers, batch_size
        self._rouge = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
        self._smooth = SmoothingFunction().method1
        self._bert = None

    def _bert_f1(self, preds: list[str], golds: list[str]) -> list[float]:
        if self._bert is None:
            from bert_score import BERTScorer
            from transformers import AutoConfig

            layers = self.num_layers or _bert_num_layers(self.bert_model_path)
            self._bert = BERTScorer(model_type=self.bert_model_path, num_layers=layers, lang=None,
                                    device=self.device, batch_size=self.batch_size)
            # tokenizers saved without model_max_length report 1e30, which breaks truncation
            max_pos = AutoConfig.from_pretrained(self.bert_model_path).max_position_embeddings
            self._bert._tokenizer.model_max_length = min(self._bert._tokenizer.model_max_length, max_pos)
        _, _, f1 = self._bert.score(preds, golds, verbose=False)
        return [min(1.0, max(0.0, float(x))) for x in f1]

    def similarity(self, pred: str, gold: str) -> tuple[float, float]:
        """(ROUGE-1 F1, smoothed BLEU-1) of pred against gold, each in [0, 1]."""
        from nltk.translate.bleu_score import sentence_bleu

        rouge = self._rouge.score(gold, pred)["rouge1"].fmeasure
        hyp, ref = normalize_answer(pred).split(), normalize_answer(gold).split()
        bleu = sentence_bleu([ref], hyp, weights=(1.0,), smoothing_function=self._smooth) if hyp and ref else 0.0
        return float(rouge), float(bleu)

    def score_many(self, preds: list[str | None], golds: list[str]) -> list[float]:
        """R_ans per pair; BERTScore runs once over all pairs that need it."""
        if len(preds) != len(golds):
            raise ValueError(f"AnswerScorer: {len(preds)} predictions but {len(golds)} gold answers")
        out: list[float] = [0.0] * len(preds)
        partial: list[int] = []
        for i, (p, g) in enumerate(zip(preds, golds)):
            if p is None or _is_yes_no(g):
                out[i] = float(p is not None and answers_match(p, g))
            elif answers_match(p, g):
                out[i] = 1.0
            else:
                partial.append(i)
        if not partial:
            return out
        sims = [self.similarity(preds[i], golds[i]) for i in partial]
        if self.bert_model_path is None:
            for i, (r, b) in zip(partial, sims):
                out[i] = 0.5 * r + 0.5 * b
        else:
            f1 = self._bert_f1([preds[i] for i in partial], [golds[i] for i in partial])
            for i, (r, b), f in zip(partial, sims, f1):
                out[i] = 0.25 * r + 0.25 * b + 0.5 * f
        return out

    def score(self, pred: str | None, gold: str) -> float:
        """R_ans in [0, 1] of one prediction (None = no answer -> 0.0)."""
        return self.score_many([pred], [gold])[0]
