"""ImageCLEF VQA-Med (2019-2021) question files: one question per line, fields separated by "|".

    img_id|question|answer              e.g. All_QA_Pairs_train.txt, All_QA_Pairs_val.txt,
                                         VQAnswering_2020_Train_QA_Pairs.txt
    img_id|category|question|answer     e.g. VQAMed2019_Test_Questions_w_Ref_Answers.txt
    img_id|question                     a question-only line inside a QA file: filtered (no answer)

Every *.txt under ROOT is read (or only `files`), except the per-category copies in a
QAPairsByCategory/ folder whose parent also holds an All_QA_Pairs*.txt (they repeat its rows), and
files that are not QA files: image-id lists (train_ImageIDs.txt, VQAMed2019_Test_ImageIDs.txt: one
field a line) and the answer-less test question file (VQAMed2019_Test_Questions.txt: no line with an
answer). Those are told apart by content, skipped whole and named once in `notes` (never counted
as rows).
Split from the file name (train/val/test tokens; "Test" in VQAMed2019_Test_... -> test). Images are
found by id ("synpic12345" -> synpic12345.jpg) under ROOT or `image_root`, preferring a folder named
after the split (Train_images/, Val_images/, VQAMed2019_Test_Images/).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .common import DataError, ImageIndex, Row, as_text, find_files, split_from_path


def _question_files(root: Path, files: Sequence[str] | str | None) -> list[Path]:
    if files:
        names = files.split(",") if isinstance(files, str) else list(files)
        paths = [root / n.strip() for n in names if n.strip()]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"file(s) not found: {', '.join(missing)}")
        return paths
    out = []
    for path in find_files(root, (".txt",)):
        parent = path.parent
        if parent.name.lower() == "qapairsbycategory" and any(
                p.name.lower().startswith("all_qa_pairs") for p in parent.parent.glob("*.txt")):
            continue
        out.append(path)
    if not out:
        raise DataError(f"{root}: no VQA-Med *.txt question files found")
    return out


def file_kind(path: Path) -> str:
    """"qa" when some line has 3+ '|'-separated fields, else "questions without answers" (two fields
    at most), "image-id list" (one word a line) or "no '|'-separated fields" (any other text)."""
    widest, one_word = 0, True
    with open(path, encoding="utf-8-sig") as f:
        for line in f:
            if line.strip():
                widest = max(widest, len(line.split("|")))
                one_word = one_word and len(line.split()) == 1
                if widest >= 3:
                    return "qa"
    if widest == 2:
        return "questions without answers"
    return "image-id list" if one_word else "no '|'-separated fields"


def read_vqa_med(root: Path | str, columns: str | Mapping[str, str] | None = None, *,
                 files: Sequence[str] | str | None = None, image_root: Path | None = None,
                 notes: list[str] | None = None, **_: Any) -> Iterator[Row]:
    """Rows of the QA files under `root`; files that are not QA files are named in `notes`."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(f"{root}: VQA-Med root folder not found")
    images = ImageIndex(root, image_root)
    for path in _question_files(root, files):
        rel = path.relative_to(root).as_posix()
        kind = file_kind(path)
        if kind != "qa":
            if notes is not None:
                notes.append(f"{rel}: skipped, {kind} (not a QA file)")
            continue
        split = split_from_path(path, root)
        if split is None:
            raise DataError(f"{path}: cannot tell the split from the file name (train/val/test)")
        with open(path, encoding="utf-8-sig") as f:
            for i, line in enumerate(f, start=1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                row = Row(file=rel, row=str(i), split=split)
                parts = [p.strip() for p in line.split("|")]
                if len(parts) == 3:
                    row.image_key, row.question, row.answer = parts
                elif len(parts) == 4:
                    row.image_key, _, row.question, row.answer = parts
                elif len(parts) == 2:
                    row.image_key, row.question = parts
                    row.skip = "question without reference answer"
                else:
                    row.error = f"expected 3 or 4 '|'-separated fields, got {len(parts)}"
                    yield row
                    continue
                row.question, row.answer = as_text(row.question), as_text(row.answer)
                row.image_path = images.find(row.image_key, near=path, split=split)
                yield row
