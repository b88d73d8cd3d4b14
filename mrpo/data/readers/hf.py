"""Hugging Face `datasets` folders on disk, read with pyarrow (the `datasets` package is not needed).

Two layouts are accepted under ROOT:
    hub snapshot      data/train-00000-of-00001.parquet, data/test-...parquet   (split from file name)
    save_to_disk      train/data-00000-of-00001.arrow (Arrow IPC stream), test/... (split from folder)
Columns are mapped like the generic reader (`--columns`, else aliases image/question/answer/...); an
image column holding the `Image` feature struct {"bytes", "path"} is carried as embedded bytes and
written to OUT/images/ by `prepare`. Needs pyarrow (`pip install 'mrpo[data]'`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .common import DataError, ImageIndex, Row, find_files, parse_columns, record_to_row, split_from_path

HF_EXTS = (".parquet", ".arrow")


def has_hf_files(root: Path) -> bool:
    return bool(find_files(Path(root), HF_EXTS))


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise DataError("reading parquet/arrow files needs pyarrow: pip install 'mrpo[data]'") from e
    return pyarrow


def iter_arrow_records(path: Path, batch_size: int = 256) -> Iterator[dict[str, Any]]:
    """Records of one .parquet or .arrow (IPC stream or file) file, a batch at a time."""
    pa = _pyarrow()
    try:
        if path.suffix == ".parquet":
            for batch in pa.parquet.ParquetFile(path).iter_batches(batch_size=batch_size):
                yield from batch.to_pylist()
            return
        with pa.memory_map(str(path)) as source:
            try:
                batches = iter(pa.ipc.open_stream(source))
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            for batch in batches:
                yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read as {path.suffix[1:]}: {e}") from e


def read_hf(root: Path | str, columns: str | Mapping[str, str] | None = None, *, split: str | None = None,
            default_split: str | None = None, image_root: Path | None = None,
            skip: Callable[[Mapping[str, Any]], str | None] | None = None, **_: Any) -> Iterator[Row]:
    """Rows of every .parquet/.arrow file under `root`.

    Split: `split` if given (forced for all files), else the file's or folder's name, else
    `default_split`; a file with none of these is an error. `skip(record)` may return a reason to
    exclude a row on purpose (reported as filtered).
    """
    root = Path(root).resolve()
    files = find_files(root, HF_EXTS)
    if not files:
        raise DataError(f"{root}: no .parquet or .arrow files found")
    columns = parse_columns(columns)
    images = ImageIndex(root, image_root)
    for path in files:
        file_split = split or split_from_path(path, root) or default_split
        if file_split is None:
            raise DataError(f"{path}: cannot tell the split from its name or folder (expected train/val/test)")
        rel = path.relative_to(root).as_posix() if path != root else path.name
        for i, record in enumerate(iter_arrow_records(path), start=1):
            row = record_to_row(record, rel, str(i), file_split, columns, images, near=path)
            if skip is not None and row.error is None:
                row.skip = skip(record)
            yield row
