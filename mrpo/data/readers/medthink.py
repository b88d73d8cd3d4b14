"""MedThink rationales (Gai et al., NAACL 2025: R-RAD, R-SLAKE, R-PathVQA) to attach as `gold_reasoning`.

As published (github Tang-xiaoxiao/Medthink, Medthink_Dataset/):

    R-RAD/{open-end,closed-end}/{trainset,testset}.json        R-RAD/images/synpic54610.jpg
    R-SLAKE/{open-end,closed-end}/{train,test}.json            R-SLAKE/images/xmlab0/source.jpg
    R-PathVQA/{open-end,closed-end}/{trainset,testset}.json    R-PathVQA/images/{Train,Test}_images/...

Each file is a JSON object of id -> item {"question", "choices": [...], "answer": <index into choices>,
"solution": <the rationale>, "image": "synpic54610.jpg" (R-SLAKE: "img_id", "img_name":
"xmlab0/source.jpg")}. The answer text is `choices[answer]` when `answer` is an integer index, as the
MRPO paper's code takes it (dmis-lab/MRPO Data_code/Medthink_preprocessing.py `medthink_answer`);
an index outside `choices` makes the row malformed. The image is `img_name`, else `image` (the
paper's order). A folder is read whole (open-end and closed-end files: closed-end rationales serve the
yes/no questions; the paper keeps only open-ended ones), except anything under an images/ folder
(R-SLAKE/images/xmlabN/*.json are per-image annotations, not rationales).

Also accepted: the paper's merged medthink_train.json / medthink_test.json (a list of {"image_path",
"question", "answer", "solution"}) and any JSON (list, {"data": [...]}, object of records), JSONL, CSV
or TSV file or folder of them. Columns (case-insensitive; override with `columns`, e.g.
"image=img,question=q,answer=gt,rationale=why"):
    image      img_name, image, image_name, image_path, img_path, figure_path, img, image_id, img_id
    question   question, query
    answer     answer, gt_answer, label, answers      (an integer with a "choices" list: an index)
    rationale  rationale, gold_reasoning, reasoning, explanation, solution, rationales
Only the fields in the alignment key (default image, question, answer) and the rationale are
required; images are not opened here. Alignment itself lives in `mrpo.data.prepare.align_medthink`;
`image_folders` names the MedThink image folders it may match images against by content.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .common import DataError, Row, as_text, load_table, parse_columns, pick, record_to_row
from .generic import table_files

MEDTHINK_ALIASES: dict[str, tuple[str, ...]] = {
    "image": ("img_name", "image", "image_name", "image_path", "img_path", "figure_path", "img",
              "image_id", "img_id"),
    "question": ("question", "query"),
    "answer": ("answer", "gt_answer", "label", "answers"),
    "rationale": ("rationale", "gold_reasoning", "reasoning", "explanation", "solution", "rationales"),
}


def medthink_files(path: Path) -> list[Path]:
    """Rationale tables of a MedThink file or folder: every table file not under an images/ folder."""
    if path.is_file():
        return [path]
    files = [f for f in table_files(path)
             if "images" not in (p.lower() for p in f.relative_to(path).parts[:-1])]
    if not files:
        raise DataError(f"{path}: no MedThink .json/.jsonl/.csv/.tsv files found (outside images/)")
    return files


def image_folders(path: Path | str) -> list[Path]:
    """MedThink image folders beside a rationale file or inside a folder (R-X/images, X/R-*/images)."""
    path = Path(path).resolve()
    if path.is_file():
        found = [path.parent / "images", path.parent.parent / "images"]
    else:
        found = [path / "images"] + [d / "images" for d in sorted(path.iterdir()) if d.is_dir()]
    return [f for f in found if f.is_dir()]


def choice_answer(answer: Any, choices: Any) -> tuple[Any, str | None]:
    """(answer, error): `choices[answer]` for an integer index (bool excluded) into a choices list,
    else `answer` unchanged; error names an index outside the list."""
    if isinstance(answer, int) and not isinstance(answer, bool) and isinstance(choices, list):
        if not 0 <= answer < len(choices):
            return None, f"answer index {answer} outside choices (len {len(choices)})"
        return choices[answer], None
    return answer, None


def read_medthink(path: Path | str, columns: str | Mapping[str, str] | None = None,
                  key: Sequence[str] = ("image", "question", "answer")) -> Iterator[Row]:
    """Rationale rows (image_key/question/answer/rationale set; image_path left None)."""
    path = Path(path).resolve()
    if not path.exists():
        raise DataError(f"{path}: MedThink file or folder not found")
    columns = parse_columns(columns)
    base = path if path.is_dir() else path.parent
    for file in medthink_files(path):
        rel = file.relative_to(base).as_posix()
        for label, record in load_table(file):
            row = record_to_row(record, rel, label, "train", columns, None, aliases=MEDTHINK_ALIASES,
                                required=(*key, "rationale"))
            if row.error is None:
                _, answer = pick(record, "answer", columns, MEDTHINK_ALIASES)
                _, choices = pick(record, "choices", columns, {"choices": ("choices",)})
                answer, row.error = choice_answer(answer, choices)
                if row.error is None:
                    row.answer = as_text(answer)
            if row.error is None and not row.rationale:
                row.error = "empty rationale"
            yield row
