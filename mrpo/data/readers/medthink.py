"""MedThink rationales (Gai et al., NAACL 2025: R-RAD, R-SLAKE, R-Path) to attach as `gold_reasoning`.

Accepted files: one JSON (list, {"data": [...]}, or object of records keyed by id, as in
MM-CoT-style problems.json), JSONL, CSV or TSV file, or a folder of them. Columns (case-insensitive;
override with `columns`, e.g. "image=img,question=q,answer=gt,rationale=why"):
    image      image, image_name, img_name, image_path, img_path, figure_path, img, image_id, img_id
    question   question, query
    answer     answer, gt_answer, label, answers
    rationale  rationale, gold_reasoning, reasoning, explanation, solution, rationales
Only the fields in the alignment key (default image, question, answer) and the rationale are
required; images are not opened here. Alignment itself lives in `mrpo.data.prepare.align_medthink`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping, Sequence

from .common import DataError, Row, load_table, parse_columns, record_to_row
from .generic import table_files

MEDTHINK_ALIASES: dict[str, tuple[str, ...]] = {
    "image": ("image", "image_name", "img_name", "image_path", "img_path", "figure_path", "img",
              "image_id", "img_id"),
    "question": ("question", "query"),
    "answer": ("answer", "gt_answer", "label", "answers"),
    "rationale": ("rationale", "gold_reasoning", "reasoning", "explanation", "solution", "rationales"),
}


def read_medthink(path: Path | str, columns: str | Mapping[str, str] | None = None,
                  key: Sequence[str] = ("image", "question", "answer")) -> Iterator[Row]:
    """Rationale rows (image_key/question/answer/rationale set; image_path left None)."""
    path = Path(path).resolve()
    if not path.exists():
        raise DataError(f"{path}: MedThink file or folder not found")
    columns = parse_columns(columns)
    base = path if path.is_dir() else path.parent
    for file in table_files(path):
        rel = file.relative_to(base).as_posix()
        for label, record in load_table(file):
            row = record_to_row(record, rel, label, "train", columns, None, aliases=MEDTHINK_ALIASES,
                                required=(*key, "rationale"))
            if row.error is None and not row.rationale:
                row.error = "empty rationale"
            yield row
