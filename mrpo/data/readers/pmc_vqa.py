"""PMC-VQA (Zhang et al., 2023): multiple-choice questions on PubMed Central figures.

    ROOT/train_2.csv, ROOT/test_2.csv (version 2; else train.csv / test.csv; `files` picks others,
    e.g. test_clean.csv)   columns: Figure_path, Question, Answer, Choice A, Choice B, Choice C,
    Choice D, Answer_label
    ROOT/images/PMC1064097_F1.jpg   (any folder under ROOT or `image_root`; found by file name)

The choices ("A:Left hemithorax") are appended to the question as lines "A: Left hemithorax";
`solution` is the Answer text (the text of the labelled choice when Answer is empty). A row whose
Answer_label names no non-empty choice is malformed.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .common import DataError, ImageIndex, Row, as_text, load_table, split_from_path
from .generic import table_files

LETTERS = "ABCD"
_CHOICE_PREFIX = re.compile(r"^\s*[A-D]\s*[:.)]\s*")


def choice_text(cell: Any) -> str:
    """'A:Left hemithorax ' -> 'Left hemithorax'."""
    return _CHOICE_PREFIX.sub("", as_text(cell)).strip()


def _default_files(root: Path) -> list[Path]:
    for names in (("train_2.csv", "test_2.csv"), ("train.csv", "test.csv")):
        found = [root / n for n in names if (root / n).is_file()]
        if found:
            return found
    raise DataError(f"{root}: no PMC-VQA train_2.csv/test_2.csv or train.csv/test.csv found")


def read_pmc_vqa(root: Path | str, columns: str | Mapping[str, str] | None = None, *,
                 files: Sequence[str] | str | None = None, image_root: Path | None = None,
                 **_: Any) -> Iterator[Row]:
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(f"{root}: PMC-VQA root folder not found")
    images = ImageIndex(root, image_root)
    for path in table_files(root, files) if files else _default_files(root):
        split = split_from_path(path, root) or "test"
        rel = path.relative_to(root).as_posix()
        for label, rec in load_table(path):
            row = Row(file=rel, row=label, split=split)
            if isinstance(rec, Exception) or not {"Figure_path", "Question"} <= set(rec):
                row.error = str(rec) if isinstance(rec, Exception) else "expected columns Figure_path, Question"
                yield row
                continue
            choices = {c: choice_text(rec.get(f"Choice {c}")) for c in LETTERS}
            choices = {c: t for c, t in choices.items() if t}
            answer = as_text(rec.get("Answer"))
            letter = as_text(rec.get("Answer_label")).upper()
            if letter and letter not in choices:
                row.error = f"Answer_label {letter!r} names no non-empty choice"
                yield row
                continue
            row.answer = answer or (choices[letter] if letter else "")
            question = as_text(rec["Question"])
            lines = [f"{c}: {t}" for c, t in choices.items()]
            row.question = "\n".join([question, *lines]) if question and lines else question
            row.image_key = as_text(rec["Figure_path"])
            row.image_path = images.find(row.image_key, near=path, split=split)
            yield row
