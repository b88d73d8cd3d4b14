"""SLAKE 1.0 (Liu et al., ISBI 2021), English subset:

    ROOT/train.json, ROOT/validate.json, ROOT/test.json   (also under ROOT/Slake1.0/)
        list of {"img_id", "img_name": "xmlab102/source.jpg", "question", "answer", "q_lang": "en"|"zh",
                 "location", "modality", "answer_type": "OPEN"|"CLOSED", "base_type", "content_type",
                 "triple", "qid"}
    ROOT/imgs/xmlab102/source.jpg

validate.json rows have split "val". Rows with q_lang other than "en" are reported as filtered
(not written). A Hugging Face parquet copy is read through `read_hf` (filter applied when it has q_lang).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

from .common import DataError, ImageIndex, Row, as_text, load_table
from .hf import has_hf_files, read_hf

FILES = {"train.json": "train", "validate.json": "val", "validation.json": "val", "test.json": "test"}


def non_english(record: Mapping[str, Any]) -> str | None:
    """Skip reason for a record whose q_lang is set and not "en" (None keeps it)."""
    lang = as_text(record.get("q_lang"))
    return f"non-English question (q_lang={lang})" if lang and lang != "en" else None


def read_slake(root: Path | str, columns: str | Mapping[str, str] | None = None, *,
               image_root: Path | None = None, **_: Any) -> Iterator[Row]:
    root = Path(root).resolve()
    base = next((d for d in (root, root / "Slake1.0", root / "slake1.0")
                 if any((d / n).is_file() for n in FILES)), None)
    if base is None:
        if root.is_dir() and has_hf_files(root):
            yield from read_hf(root, columns, image_root=image_root, skip=non_english)
            return
        raise DataError(f"{root}: no SLAKE train.json/validate.json/test.json (nor parquet/arrow) found")
    images = ImageIndex(base / "imgs", image_root, base)
    for name, split in FILES.items():
        path = base / name
        if not path.is_file():
            continue
        for label, rec in load_table(path):
            row = Row(file=name, row=label, split=split)
            if isinstance(rec, dict) and rec.get("qid") is not None:
                row.row = f"{label} (qid {rec['qid']})"
            if not isinstance(rec, dict) or not {"img_name", "question", "answer"} <= rec.keys():
                row.error = "expected an object with img_name, question, answer"
                yield row
                continue
            row.question, row.answer = as_text(rec["question"]), as_text(rec["answer"])
            row.image_key = as_text(rec["img_name"])
            row.image_path = images.find(row.image_key, near=path, split=split)
            row.skip = non_english(rec)
            yield row
