"""Generic JSON / JSONL / CSV / TSV files with configurable column names.

ROOT is one table file or a folder of them (all *.json, *.jsonl, *.csv, *.tsv below it, or only the
`files` given). A folder holding .parquet/.arrow files is read as a Hugging Face folder instead
(`mrpo.data.readers.hf`). Column names come from `columns` ("image=img,question=q,answer=a"; fields:
image, question, answer, split, rationale, id), else from `COLUMN_ALIASES` (case-insensitive).
Split, in order: the row's split column, the file's or its folders' names (train/val/test tokens),
`default_split`. Images: absolute path, relative to the table's folder, ROOT or `image_root`, else
found by file name (or stem) anywhere under those folders.

Presets for evaluation sets without a fixed published layout (Rad-VQA, MIMIC-VQA and Quilt-VQA
style files) are this reader with `default_split="test"`; MIMIC-CXR-VQA's list-valued answers are
joined with ", ".
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .common import (TABLE_EXTS, DataError, ImageIndex, Row, find_files, load_table, parse_columns,
                     record_to_row, split_from_path)
from .hf import has_hf_files, read_hf


def table_files(root: Path, files: Sequence[str] | str | None = None) -> list[Path]:
    """`files` (comma list or sequence, relative to `root`) or every table file under `root`."""
    if files:
        names = files.split(",") if isinstance(files, str) else list(files)
        paths = [(root / n.strip()) for n in names if n.strip()]
        for p in paths:
            if not p.is_file():
                raise DataError(f"{p}: file not found")
        return paths
    found = find_files(root, TABLE_EXTS)
    if not found:
        raise DataError(f"{root}: no .json/.jsonl/.csv/.tsv files found")
    return found


def read_generic(root: Path | str, columns: str | Mapping[str, str] | None = None, *,
                 files: Sequence[str] | str | None = None, split: str | None = None,
                 default_split: str = "train", image_root: Path | None = None, **_: Any) -> Iterator[Row]:
    """Rows of generic table files (or of a Hugging Face folder when it holds parquet/arrow files)."""
    root = Path(root).resolve()
    if not root.exists():
        raise DataError(f"{root}: no such file or folder")
    if not files and root.is_dir() and has_hf_files(root):
        yield from read_hf(root, columns, split=split, default_split=default_split, image_root=image_root)
        return
    columns = parse_columns(columns)
    base = root if root.is_dir() else root.parent
    images = ImageIndex(base, image_root)
    for path in table_files(root, files):
        file_split = split or split_from_path(path, base) or default_split
        rel = path.relative_to(base).as_posix()
        for label, record in load_table(path):
            yield record_to_row(record, rel, label, file_split, columns, images, near=path)

