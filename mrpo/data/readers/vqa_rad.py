"""VQA-RAD (Lau et al., Sci. Data 2018), as published on OSF:

    ROOT/VQA_RAD Dataset Public.json    list of {"qid", "image_name": "synpic54610.jpg", "image_organ",
                                         "answer", "answer_type": "CLOSED"|"OPEN", "question_type",
                                         "question", "phrase_type", ...}
    ROOT/VQA_RAD Image Folder/*.jpg

Split: phrase_type "test_freeform" / "test_para" -> test (451 questions), every other phrase type
("freeform", "para", "frame", ...) -> train. Also read: the MEVF copy (trainset.json / testset.json
with the same fields, split from the file name, images in images/), the MRPO paper's data folder
(Data_RAW/vqa-rad/ as dmis-lab/MRPO Data_code/Download_datasets.py leaves it: train.json / test.json,
lists of {"image": "images/synpic54610.jpg", "question", "answer"}, split at download by the same
phrase_type rule, images in images/) and the Hugging Face release
(flaviagiammarino/vqa-rad parquet: image, question, answer) through `read_hf`. Answers published as
numbers are kept as their literal text.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

from .common import DataError, ImageIndex, Row, as_text, find_files, load_table, split_from_path
from .hf import has_hf_files, read_hf


def _annotation_files(root: Path) -> list[tuple[Path, str | None]]:
    """(json file, forced split or None = from phrase_type) of an OSF or MEVF copy."""
    jsons = find_files(root, (".json",))
    public = [p for p in jsons if "vqa_rad" in p.name.lower() and "public" in p.name.lower()]
    if public:
        return [(public[0], None)]
    mevf = [p for p in jsons if p.stem.lower() in ("trainset", "testset")]
    if mevf:
        return [(p, split_from_path(p)) for p in mevf]
    return [(root / n, s) for n, s in (("train.json", "train"), ("test.json", "test")) if (root / n).is_file()]


def read_vqa_rad(root: Path | str, columns: str | Mapping[str, str] | None = None, *,
                 image_root: Path | None = None, **_: Any) -> Iterator[Row]:
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(f"{root}: VQA-RAD root folder not found")
    annotations = _annotation_files(root)
    if not annotations:
        if has_hf_files(root):
            yield from read_hf(root, columns, image_root=image_root)
            return
        raise DataError(f"{root}: no 'VQA_RAD Dataset Public.json', trainset.json/testset.json, "
                        "train.json/test.json or parquet/arrow files found")
    images = ImageIndex(root, image_root)
    for path, forced_split in annotations:
        rel = path.relative_to(root).as_posix()
        for label, rec in load_table(path):
            row = Row(file=rel, row=label)
            if isinstance(rec, dict) and rec.get("qid") is not None:
                row.row = f"{label} (qid {rec['qid']})"
            image_field = "image_name" if isinstance(rec, dict) and "image_name" in rec else "image"
            if not isinstance(rec, dict) or not {image_field, "question", "answer"} <= rec.keys():
                row.error = "expected an object with image_name (or image), question, answer"
                yield row
                continue
            phrase = as_text(rec.get("phrase_type")).lower()
            row.split = forced_split or ("test" if phrase.startswith("test") else "train")
            row.question, row.answer = as_text(rec["question"]), as_text(rec["answer"])
            row.image_key = as_text(rec[image_field])
            row.image_path = images.find(row.image_key, near=path, split=row.split)
            yield row
