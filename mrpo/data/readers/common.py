"""Shared pieces of the source readers: the `Row` they yield, table loading, column aliases, image lookup.

A reader turns one published on-disk format into `Row`s and never drops a row on its own: a row it
cannot parse carries `error`, a row it excludes on purpose (e.g. SLAKE's Chinese questions) carries
`skip`; `mrpo.data.prepare` counts both and names the first few in its report.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import pickle
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp")
TABLE_EXTS = (".json", ".jsonl", ".csv", ".tsv")


class DataError(ValueError):
    """Input that cannot be read at all (missing folder, unparsable file); names the path."""


@dataclass
class Row:
    """One question-answer pair as read from a source, before validation.

    file: source file relative to the reader's root; row: 1-based row number or the source's id.
    split: "train" | "val" | "test" as published. image_key: the published image identifier
    (file name, relative path, or "sha1:<hex>" for embedded images); image_path: the resolved file
    (None when not found); image_bytes: embedded image (parquet/arrow sources).
    """
    file: str
    row: str
    split: str = "train"
    question: str = ""
    answer: str = ""
    image_key: str = ""
    image_path: Path | None = None
    image_bytes: bytes | None = None
    rationale: str = ""
    error: str | None = None      # malformed row: why (the row is reported and not written)
    skip: str | None = None       # excluded on purpose: why (reported under "filtered")

    @property
    def where(self) -> str:
        return f"{self.file}:{self.row}"


# ----------------------------------------------------------------------------- text helpers

def as_text(value: Any) -> str:
    """Source cell -> stripped string; numbers keep their literal form, lists are joined with ', '."""
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from CSV-ish sources
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(t for t in (as_text(v) for v in value) if t)
    return " ".join(str(value).split())


def normalize_text(text: str) -> str:
    """Matching form of a question/answer: NFKC, lower case, punctuation -> space, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.sub(r"[^\w]+", " ", text).split())


def rationale_text(value: Any) -> str:
    """Rationale cell -> text keeping its own line breaks; a list of steps is joined one per line."""
    if isinstance(value, (list, tuple)):
        return "\n".join(t for t in (rationale_text(v) for v in value) if t)
    return "" if value is None or (isinstance(value, float) and value != value) else str(value).strip()


_GENERIC_IMAGE_NAMES = {"source", "image", "img", "0", "1"}
# SLAKE's image folder + file, on disk "xmlab102/source.jpg", flattened "xmlab102_source.jpg" by the MRPO
# paper's code (dmis-lab/MRPO Data_code/Medthink_preprocessing.py flat_basename, Eval_code gold_image_key)
_SLAKE_IMAGE = re.compile(r"(xmlab\d+)[/_]([^/]+)$")


def short_image_key(key: str) -> str:
    """Image key for matching across files: lower-cased last path component without extension.

    When that component is a generic name the parent folder is kept; SLAKE's "xmlab102/source.jpg"
    and the flattened "xmlab102_source.jpg" both give "xmlab102/source". Content hashes ("sha1:...")
    are returned unchanged.
    """
    if key.startswith("sha1:"):
        return key
    slake = _SLAKE_IMAGE.search(key.replace("\\", "/").lower())
    if slake:
        name = slake.group(2)
        return f"{slake.group(1)}/{os.path.splitext(name)[0] if name.endswith(IMAGE_EXTS) else name}"
    parts = [p for p in key.replace("\\", "/").lower().split("/") if p not in ("", ".")]
    if not parts:
        return ""
    stem = os.path.splitext(parts[-1])[0] if parts[-1].endswith(IMAGE_EXTS) else parts[-1]
    if stem in _GENERIC_IMAGE_NAMES and len(parts) > 1:
        return f"{parts[-2]}/{stem}"
    return stem


def sha1_hex(data: bytes | str) -> str:
    return hashlib.sha1(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


# ----------------------------------------------------------------------------- splits

def normalize_split(value: str) -> str | None:
    """'train'/'training' -> train; 'val'/'valid'/'validation'/'validate'/'dev' -> val; 'test*' -> test."""
    v = value.strip().lower()
    if v.startswith("test"):
        return "test"
    if v.startswith(("val", "dev")):
        return "val"
    if v.startswith("train"):
        return "train"
    return None


def split_of_name(name: str) -> str | None:
    """Split named by a file or folder name's tokens: 'All_QA_Pairs_val' -> val, 'Train_images' -> train."""
    for token in re.split(r"[^a-z0-9]+", name.lower()):
        if token and (split := normalize_split(token)):
            return split
    return None


def split_from_path(path: Path, root: Path | None = None) -> str | None:
    """Split named by the file's name, else by its folders below `root` (None if none does)."""
    names = [path.stem]
    parent = path.parent
    while root is not None and root in parent.parents:
        names.append(parent.name)
        parent = parent.parent
    for name in names:
        if split := split_of_name(name):
            return split
    return None


# ----------------------------------------------------------------------------- columns

# Default column names tried in order (case-insensitive) when the user gives none.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "image": ("image", "image_path", "img_path", "image_name", "img_name", "figure_path", "img",
              "image_id", "img_id", "file_name", "filename"),
    "question": ("question", "problem", "query", "sent"),
    "answer": ("answer", "solution", "gt_answer", "answers", "label"),
    "split": ("split",),
    "rationale": ("rationale", "gold_reasoning", "reasoning", "explanation"),
    "id": ("id", "qid", "question_id", "idx"),
}


def parse_columns(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """'image=img,question=q' -> {'image': 'img', 'question': 'q'}; a mapping is passed through."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, Mapping):
        items = dict(spec)
    else:
        items = {}
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise DataError(f"bad --columns entry {part!r}: expected field=column, e.g. image=img_name")
            items[key.strip()] = value.strip()
    known = set(COLUMN_ALIASES) | {"choices"}
    for key in items:
        if key not in known:
            raise DataError(f"unknown column field {key!r} in --columns; known: {sorted(known)}")
    return items


def pick(record: Mapping[str, Any], field: str, columns: Mapping[str, str],
         aliases: Mapping[str, tuple[str, ...]] = COLUMN_ALIASES) -> tuple[bool, Any]:
    """(found, value) of `field` in `record`: the user's column if given, else the first alias present."""
    lower = {str(k).lower(): k for k in record}
    names = (columns[field],) if field in columns else aliases.get(field, ())
    for name in names:
        if name in record:
            return True, record[name]
        if name.lower() in lower:
            return True, record[lower[name.lower()]]
    return False, None


# ----------------------------------------------------------------------------- tables

def load_table(path: Path) -> Iterator[tuple[str, Any]]:
    """(row label, record) pairs of a JSON / JSONL / CSV / TSV file.

    JSON: a list of objects, {"data"|"annotations"|"questions": [...]}, or an object of objects keyed by
    id (the key becomes the row label). JSONL/CSV rows are labelled by 1-based data row number. A JSONL
    line that is not JSON yields (label, DataError) so the caller reports it as a malformed row.
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            with open(path, encoding="utf-8-sig") as f:
                data = json.load(f)
            if isinstance(data, dict):
                for key in ("data", "annotations", "questions", "rows"):
                    if isinstance(data.get(key), list):
                        data = data[key]
                        break
            if isinstance(data, list):
                yield from ((str(i), rec) for i, rec in enumerate(data, start=1))
            elif isinstance(data, dict):
                yield from ((str(k), rec) for k, rec in data.items())
            else:
                raise DataError(f"{path}: expected a JSON list or object of records, got {type(data).__name__}")
        elif suffix == ".jsonl":
            with open(path, encoding="utf-8-sig") as f:
                for i, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        yield str(i), json.loads(line)
                    except json.JSONDecodeError as e:
                        yield str(i), DataError(f"not valid JSON ({e.msg})")
        elif suffix in (".csv", ".tsv"):
            with open(path, encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                for i, rec in enumerate(reader, start=1):
                    if None in rec:  # more cells than header columns
                        yield str(i), DataError(f"{len(rec[None])} cell(s) beyond the header's columns")
                    elif any(v is None for v in rec.values()):
                        yield str(i), DataError("fewer cells than the header's columns")
                    else:
                        yield str(i), rec
        else:
            raise DataError(f"{path}: unsupported table format {suffix!r} (json, jsonl, csv, tsv)")
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot parse: {e}") from e


class _PlainUnpickler(pickle.Unpickler):
    """Unpickler that builds only plain containers (the official PathVQA pickles need nothing else)."""

    def find_class(self, module: str, name: str):
        raise DataError(f"refusing to unpickle {module}.{name}: only plain lists/dicts/strings are accepted")


def load_plain_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _PlainUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError) as e:
        raise DataError(f"{path}: cannot unpickle: {e}") from e


def find_files(root: Path, suffixes: Iterable[str]) -> list[Path]:
    """Files under `root` (or `root` itself) with one of `suffixes`, sorted; hidden entries skipped."""
    suffixes = tuple(s.lower() for s in suffixes)
    if root.is_file():
        return [root] if root.name.lower().endswith(suffixes) else []
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / n for n in filenames if n.lower().endswith(suffixes) and not n.startswith(".")]
    return sorted(out)


# ----------------------------------------------------------------------------- images

class ImageIndex:
    """Finds image files named by a source: by relative path first, else by file name or stem.

    A name with folders ("xmlab7/source.jpg") only matches files whose path ends with those folders.
    Built lazily (one walk of the search folders). When several files share a name, the one whose
    path names the row's split, then the one closest to the data file, wins.
    """

    def __init__(self, *folders: Path | None):
        self.folders = [Path(f) for f in folders if f is not None]
        self._by_name: dict[str, list[Path]] | None = None
        self._by_stem: dict[str, list[Path]] = {}

    def _build(self) -> None:
        self._by_name = defaultdict(list)
        self._by_stem = defaultdict(list)
        seen = set()
        for folder in self.folders:
            for path in find_files(folder, IMAGE_EXTS) if folder.is_dir() else []:
                if path in seen:
                    continue
                seen.add(path)
                self._by_name[path.name.lower()].append(path)
                self._by_stem[path.stem.lower()].append(path)

    def find(self, name: str, near: Path | None = None, split: str | None = None) -> Path | None:
        """Resolve `name` (absolute, relative to `near`'s folder or a search folder, or a bare name/stem)."""
        name = name.strip().replace("\\", "/")
        if not name:
            return None
        candidate = Path(name)
        if candidate.is_absolute():
            return candidate if candidate.is_file() else None
        for base in ([near.parent] if near is not None else []) + self.folders:
            if (base / candidate).is_file():
                return base / candidate
        if self._by_name is None:
            self._build()
        base_name = candidate.name.lower()
        hits = self._by_name.get(base_name) or self._by_stem.get(base_name) or []
        if len(candidate.parts) > 1:  # "xmlab7/source.jpg" must match the end of the path, not just "source.jpg"
            want = [p.lower() for p in candidate.parts[:-1]]
            hits = [h for h in hits if [p.lower() for p in h.parent.parts[-len(want):]] == want]
        if len(hits) <= 1:
            return hits[0] if hits else None
        def rank(p: Path):
            in_split = split is not None and any(split_of_name(part) == split for part in p.parent.parts)
            common = len(os.path.commonpath([p, near])) if near is not None else 0
            return (not in_split, -common, str(p))
        return min(hits, key=rank)


def record_to_row(record: Any, file: str, row: str, split: str, columns: Mapping[str, str],
                  images: ImageIndex | None, near: Path | None = None,
                  aliases: Mapping[str, tuple[str, ...]] = COLUMN_ALIASES,
                  required: tuple[str, ...] = ("image", "question", "answer")) -> Row:
    """Map one table record onto a `Row` by column names (user's `columns` first, then `aliases`).

    The image cell may be a path/name (resolved through `images`; `images=None` keeps only the key),
    a list of them (first used), a Hugging Face image struct {"bytes", "path"} or raw bytes; embedded
    bytes are carried as they are (empty or undecodable ones are reported by `prepare` as unreadable). A "split" cell, when
    present, overrides `split`. A missing required column or an unknown split value makes an error row.
    """
    out = Row(file=file, row=row, split=split)
    if isinstance(record, Exception):
        out.error = str(record)
        return out
    if not isinstance(record, Mapping):
        out.error = f"expected an object/row, got {type(record).__name__}"
        return out
    values = {}
    for field in ("image", "question", "answer", "split", "rationale"):
        found, value = pick(record, field, columns, aliases)
        if not found and field in required:
            tried = columns.get(field) or ", ".join(aliases.get(field, ()))
            out.error = f"no {field} column (looked for: {tried}; the row has: {', '.join(map(str, record))})"
            return out
        values[field] = value if found else None
    if values["split"] not in (None, ""):
        out.split = normalize_split(str(values["split"])) or ""
        if not out.split:
            out.error = f"unknown split value {values['split']!r}"
            return out
    out.question = as_text(values["question"])
    out.answer = as_text(values["answer"])
    out.rationale = rationale_text(values["rationale"])
    image = values["image"]
    if isinstance(image, (list, tuple)):
        image = image[0] if image else None
    if isinstance(image, (bytes, bytearray, memoryview)):  # a plain binary column: embedded, not a name
        image = {"bytes": image, "path": None}
    if isinstance(image, Mapping):  # Hugging Face Image feature
        data, name = image.get("bytes"), image.get("path")
        if data is not None:  # embedded, even when empty or undecodable: prepare reports unreadable_image
            out.image_bytes = bytes(data)
            out.image_key = name or f"sha1:{sha1_hex(out.image_bytes)[:16]}"
            return out
        image = name
    name = as_text(image)
    out.image_key = name
    if name and images is not None:
        out.image_path = images.find(name, near=near, split=out.split)
    return out
