"""PathVQA (He et al., 2020), as released by its authors (pvqa/):

    ROOT/qas/{train,val,test}/{split}_qa.pkl   pickled list of {"image": "train_0422", "question", "answer"}
    ROOT/images/{train,val,test}/train_0422.jpg
Also read when no *_qa.pkl exists: the LXMERT-style ROOT/qas/{split}_vqa.pkl (list of {"img_id", "sent",
"label": {answer: score}, ...}; the best-scored label is the answer), and the Hugging Face release
(flaviagiammarino/path-vqa parquet: image, question, answer) through `read_hf`.
Split from the file name; pickles are loaded with an unpickler that accepts plain containers only.

The MRPO paper's data folder (Data_RAW/pathvqa/ as dmis-lab/MRPO Data_code/Download_datasets.py
leaves it) is read too: train.json / test.json, lists of {"image": "images/<name>", "problem",
"solution"}, images in images/. The paper's download names each image after the MedThink R-PathVQA
image with the same bytes (md5 match against Medthink/R-PathVQA/images/{Train,Test}_images), else
after the Hugging Face file name or "{split}_{index}.jpg"; `prepare` matches MedThink rationales by
that name, and by content against the MedThink images for copies named otherwise (Hugging Face).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

from .common import (DataError, ImageIndex, Row, as_text, find_files, load_plain_pickle, load_table,
                     split_from_path)
from .hf import has_hf_files, read_hf


def _question_answer(rec: dict) -> tuple[str, str, str] | None:
    """(image, question, answer) of a *_qa.pkl or *_vqa.pkl entry, None if it has neither shape."""
    if {"image", "question", "answer"} <= rec.keys():
        return as_text(rec["image"]), as_text(rec["question"]), as_text(rec["answer"])
    if {"img_id", "sent", "label"} <= rec.keys() and isinstance(rec["label"], dict):
        label = rec["label"]
        answer = max(label, key=label.get) if label else ""
        return as_text(rec["img_id"]), as_text(rec["sent"]), as_text(answer)
    return None


def read_pathvqa(root: Path | str, columns: str | Mapping[str, str] | None = None, *,
                 image_root: Path | None = None, **_: Any) -> Iterator[Row]:
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(f"{root}: PathVQA root folder not found")
    pickles = [p for p in find_files(root, ("_qa.pkl",))] or [p for p in find_files(root, ("_vqa.pkl",))]
    paper = [root / n for n in ("train.json", "test.json") if (root / n).is_file()]
    if not pickles and paper:
        yield from _read_paper_json(root, paper, image_root)
        return
    if not pickles:
        if has_hf_files(root):
            yield from read_hf(root, columns, image_root=image_root)
            return
        raise DataError(f"{root}: no qas/*/*_qa.pkl, qas/*_vqa.pkl, train.json/test.json or parquet/arrow "
                        "files found")
    images = ImageIndex(root / "images" if (root / "images").is_dir() else root, image_root)
    for path in pickles:
        split = split_from_path(path, root)
        if split is None:
            raise DataError(f"{path}: cannot tell the split from the file name (train/val/test)")
        rel = path.relative_to(root).as_posix()
        data = load_plain_pickle(path)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a pickled list of question records, got {type(data).__name__}")
        for i, rec in enumerate(data, start=1):
            row = Row(file=rel, row=str(i), split=split)
            fields = _question_answer(rec) if isinstance(rec, dict) else None
            if fields is None:
                row.error = "expected {image, question, answer} or {img_id, sent, label}"
                yield row
                continue
            row.image_key, row.question, row.answer = fields
            row.image_path = images.find(row.image_key, near=path, split=split)
            yield row


def _read_paper_json(root: Path, files: list[Path], image_root: Path | None) -> Iterator[Row]:
    """Rows of the MRPO paper's pathvqa/train.json and test.json ({image, problem, solution})."""
    images = ImageIndex(root, image_root)
    for path in files:
        split = split_from_path(path, root)
        for label, rec in load_table(path):
            row = Row(file=path.name, row=label, split=split or "train")
            if not isinstance(rec, dict) or not {"image", "problem", "solution"} <= rec.keys():
                row.error = "expected an object with image, problem, solution"
                yield row
                continue
            row.image_key, row.question, row.answer = (as_text(rec["image"]), as_text(rec["problem"]),
                                                       as_text(rec["solution"]))
            row.image_path = images.find(row.image_key, near=path, split=row.split)
            yield row
