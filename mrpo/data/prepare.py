"""Turn a local copy of a public medical VQA data set into the project's train/test JSONL files.

    report = prepare("vqa_rad", "~/data/VQA_RAD", "data/vqa_rad", medthink="~/data/R-RAD.json")

Steps: read every row with `READERS[source]`; drop rows on purpose only when the reader says so
(`Row.skip`, e.g. SLAKE's Chinese questions: "filtered"); validate the rest in this order, each bad row
counted once under its first problem: malformed_row, empty_question, empty_answer, missing_image,
unreadable_image (opened and fully decoded with Pillow; empty or undecodable embedded bytes too),
duplicate (same image file + normalised question within a split; the first is kept), test_leak (a
train row whose image bytes + question are also in test, wherever the two copies of the image are
kept; the train copy is dropped). Files a reader skips whole (VQA-Med's image-id lists) are listed
under "skipped_files". A `columns` mapping under which every row lacks a named column is an error.
Validation rows ("val") join train unless `split_test_from="val"`; a
fraction (e.g. "0.1") holds out that share of images (by hash of the image key, so all questions on
one image stay together) as test for sources without a test split. MedThink rationales are attached
to the kept rows by (image key, normalised question, normalised answer), the image key being the
file name without extension (`short_image_key`), or the name of the MedThink image with the same bytes
(`align_medthink`); `medthink_key` picks the fields. `prepare_paper` converts the MRPO paper's
data folder (Data_RAW/ + Medthink/) in one call. Rows are never silently dropped: OUT/report.json counts each problem and names the first
offending rows (file:row); `strict=True` raises `PrepareError` when any problem occurs, malformed or
ambiguous MedThink rows included (the report is still written, the JSONL files are not).

Images: records point at the original files by absolute path. Embedded images (parquet/arrow) are
written to OUT/images/. With `max_pixels`, images of more pixels are written downscaled (aspect kept,
bicubic, as `records.fit_max_pixels` does at load time) to OUT/images/ and the record points at the
copy ("images/...", relative to OUT); without it, records point at the originals whatever their size
and the loader (`data.max_pixels`) resizes them at load time.

Record ids are "{dataset}-{split}-{sha1(image key + normalised question)[:12]}": stable across runs
and machines. answer_type is "closed" for yes/no answers, else "open".
"""
from __future__ import annotations

import io
import json
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from PIL import Image

from .readers import READERS, DataError, Row
from .readers.common import IMAGE_EXTS, find_files, normalize_text, sha1_hex, short_image_key
from .readers.medthink import image_folders as medthink_image_folders
from .readers.medthink import read_medthink
from .records import fit_max_pixels

PROBLEMS = ("malformed_row", "empty_question", "empty_answer", "missing_image", "unreadable_image",
            "duplicate", "test_leak")
KEY_FIELDS = ("image", "question", "answer")


class PrepareError(DataError):
    """--strict found problems; the message lists them with their first offending rows."""


@dataclass
class Tally:
    """Count of one kind of event plus its first `keep` examples ("file:row: detail")."""
    keep: int = 5
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, where: str, detail: str = "") -> None:
        self.count += 1
        if len(self.examples) < self.keep:
            self.examples.append(f"{where}: {detail}" if detail else where)

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "examples": self.examples}


def answer_type(answer: str) -> str:
    """'closed' for yes/no answers, else 'open'."""
    return "closed" if normalize_text(answer) in ("yes", "no") else "open"


def record_id(dataset: str, split: str, image_key: str, question: str) -> str:
    return f"{dataset}-{split}-{sha1_hex(image_key + chr(10) + normalize_text(question))[:12]}"


# ----------------------------------------------------------------------------- images

def inspect_image(source: Path | bytes) -> tuple[int, int, str, str] | str:
    """(width, height, PIL format, sha1 of the bytes) of a fully decoded image, or the error message
    when it cannot be read or decoded (empty bytes, broken pixel stream, truncated file, ...)."""
    try:
        data = source if isinstance(source, bytes) else source.read_bytes()
        if not data:
            return "empty image data (0 bytes)"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return im.width, im.height, im.format or "PNG", sha1_hex(data)
    except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable"
        return f"{type(e).__name__}: {e}"


def _downscaled(source: Path | bytes, max_pixels: int) -> Image.Image:
    """The image downscaled like the loader does (`records.fit_max_pixels`), in a mode PNG/JPEG can save."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        im.load()
        if im.mode not in ("L", "RGB", "RGBA"):
            im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
        return fit_max_pixels(im, max_pixels)


def _write_image(target: Path, source: Path | bytes, max_pixels: int | None) -> None:
    """Write `source` to `target` verbatim, or downscaled to at most `max_pixels` pixels when given."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if max_pixels is None:
        target.write_bytes(source if isinstance(source, bytes) else source.read_bytes())
        return
    im = _downscaled(source, max_pixels)
    if target.suffix == ".jpg":
        im.convert("RGB").save(target, quality=95)
    else:
        im.save(target)


# ----------------------------------------------------------------------------- MedThink

def _key(row: Row, fields: Sequence[str], image_key: str | None = None) -> tuple[str, ...]:
    parts = {"image": lambda: image_key if image_key is not None else short_image_key(row.image_key),
             "question": lambda: normalize_text(row.question), "answer": lambda: normalize_text(row.answer)}
    return tuple(parts[f]() for f in fields)


def _content_names(folders: Sequence[Path]) -> dict[str, str]:
    """sha1 of each image file under `folders` -> its short image key (path relative to its folder)."""
    names: dict[str, str] = {}
    for folder in folders:
        for path in find_files(folder, IMAGE_EXTS):
            names.setdefault(sha1_hex(path.read_bytes()), short_image_key(path.relative_to(folder).as_posix()))
    return names


def _row_content_hash(row: Row, cache: dict[Path, str]) -> str | None:
    """sha1 of the row's embedded bytes or image file (files hashed once through `cache`)."""
    if row.image_bytes is not None:
        return sha1_hex(row.image_bytes)
    if row.image_path is not None and row.image_path.is_file():
        if row.image_path not in cache:
            cache[row.image_path] = sha1_hex(row.image_path.read_bytes())
        return cache[row.image_path]
    return None


def align_medthink(rows: Sequence[Row], rationales: Iterable[Row], key: Sequence[str] = KEY_FIELDS,
                   examples: int = 5, image_folders: Sequence[Path] = ()) -> dict[str, Any]:
    """Set `row.rationale` of each row whose key matches exactly one distinct MedThink rationale.

    key: fields among image (short image key: "synpic54610", "xmlab102/source" for SLAKE's nested and
    flattened names alike), question and answer (normalised text: NFKC, case, punctuation and
    whitespace folded, a superset of the paper's `norm_match`). image_folders: MedThink image folders;
    a row whose image name matches no rationale is matched again under the name of the MedThink image
    with the same bytes (as the paper names PathVQA images: Data_code/Download_datasets.py md5 map);
    the folders are hashed only when such a row exists. Returns counts per split of matched /
    unmatched / ambiguous (several distinct rationales for the key) rows, how many matched by image
    content, the rationales that matched no row ("unused") and the MedThink rows that could not be read.
    """
    bad = [f for f in key if f not in KEY_FIELDS]
    if bad or not key:
        raise DataError(f"bad MedThink key {list(key)}: choose among {list(KEY_FIELDS)}")
    table: dict[tuple[str, ...], dict[str, str]] = defaultdict(dict)  # key -> {normalised: rationale}
    where: dict[tuple[str, ...], str] = {}
    malformed, read = Tally(examples), 0
    for r in rationales:
        read += 1
        if r.error:
            malformed.add(r.where, r.error)
            continue
        k = _key(r, key)
        table[k].setdefault(" ".join(r.rationale.split()), r.rationale)
        where.setdefault(k, r.where)
    counts = {name: Counter() for name in ("matched", "unmatched", "ambiguous")}
    tallies = {name: Tally(examples) for name in ("unmatched", "ambiguous", "unused")}
    used = set()
    by_content: dict[str, str] | None = None  # built on first need
    file_hashes: dict[Path, str] = {}
    content_matched = 0
    for row in rows:
        k = _key(row, key)
        found = table.get(k)
        via_content = False
        if not found and "image" in key and image_folders:
            if by_content is None:
                by_content = _content_names(image_folders)
            name = by_content.get(_row_content_hash(row, file_hashes) or "")
            if name is not None and table.get(_key(row, key, name)):
                k, via_content = _key(row, key, name), True
                found = table[k]
        if not found:
            counts["unmatched"][row.split] += 1
            tallies["unmatched"].add(row.where, f"no rationale for {k}")
        elif len(found) > 1:
            used.add(k)
            counts["ambiguous"][row.split] += 1
            tallies["ambiguous"].add(row.where, f"{len(found)} different rationales for {k} (first at {where[k]})")
        else:
            used.add(k)
            counts["matched"][row.split] += 1
            content_matched += via_content
            row.rationale = next(iter(found.values()))
    for k in table:
        if k not in used:
            tallies["unused"].add(where[k], f"matches no kept row: {k}")
    report = {"key": list(key), "rationales_read": read, "malformed": malformed.as_dict(),
              "image_folders": [str(f) for f in image_folders], "matched_by_image_content": content_matched}
    for name, c in counts.items():
        report[name] = {"train": c["train"], "test": c["test"], "total": sum(c.values()),
                        "examples": tallies[name].examples if name in tallies else []}
    report["unused"] = tallies["unused"].as_dict()
    return report


# ----------------------------------------------------------------------------- prepare

def _test_share(split_test_from: str | float | None) -> float | None:
    if split_test_from is None or str(split_test_from).lower() in ("val", "validation"):
        return None
    try:
        share = float(split_test_from)
    except ValueError:
        raise DataError(f"--split-test-from {split_test_from!r}: expected 'val' or a fraction in (0, 1)") from None
    if not 0.0 < share < 1.0:
        raise DataError(f"--split-test-from {split_test_from!r}: the fraction must be in (0, 1)")
    return share


def prepare(source: str, root: str | Path, out: str | Path, *, medthink: str | Path | None = None,
            medthink_columns: str | Mapping[str, str] | None = None, medthink_key: Sequence[str] = KEY_FIELDS,
            split_test_from: str | float | None = None, max_pixels: int | None = None, strict: bool = False,
            columns: str | Mapping[str, str] | None = None, dataset: str | None = None,
            image_root: str | Path | None = None, files: Sequence[str] | str | None = None,
            examples: int = 5) -> dict[str, Any]:
    """Read, validate, align and write OUT/train.jsonl, OUT/test.jsonl and OUT/report.json.

    Returns the report (also written as JSON). Raises DataError for unreadable input and
    PrepareError (a DataError) in strict mode when any problem was found.
    """
    if source not in READERS:
        raise DataError(f"unknown source {source!r}; choose from {sorted(READERS)}")
    if max_pixels is not None and max_pixels <= 0:
        raise DataError(f"--max-pixels must be positive, got {max_pixels}")
    share = _test_share(split_test_from)
    root, out = Path(root).expanduser().resolve(), Path(out).expanduser().resolve()
    dataset = dataset or (source if source not in ("generic", "hf") else root.stem.lower())
    notes: list[str] = []  # files a reader skipped whole (e.g. VQA-Med image-id lists)
    rows = READERS[source](root, columns, image_root=Path(image_root).resolve() if image_root else None,
                           files=files, notes=notes)

    read: Counter = Counter()
    filtered: dict[str, Tally] = defaultdict(lambda: Tally(examples))
    problems = {name: Tally(examples) for name in PROBLEMS}
    images: dict[str, tuple[int, int, str, str] | str] = {}  # image ident -> inspect_image result
    kept: list[tuple[Row, str]] = []                     # (row, image ident: file path or "sha1:<bytes hash>")
    embedded: dict[str, bytes] = {}                      # one copy of each embedded image's bytes
    column_errors = 0                                    # rows malformed for want of a named column
    for r in rows:
        read[r.split] += 1
        if r.error:
            problems["malformed_row"].add(r.where, r.error)
            column_errors += r.error.startswith("no ") and " column (looked for: " in r.error
        elif r.skip:
            filtered[r.skip].add(r.where)
        elif not r.question:
            problems["empty_question"].add(r.where)
        elif not r.answer:
            problems["empty_answer"].add(r.where, f"question {r.question[:60]!r}")
        elif r.image_bytes is None and r.image_path is None:
            problems["missing_image"].add(r.where, f"image {r.image_key!r} not found" if r.image_key
                                          else "no image given")
        else:
            ident = f"sha1:{sha1_hex(r.image_bytes)}" if r.image_bytes is not None else str(r.image_path)
            if r.image_bytes is not None:
                r.image_bytes = embedded.setdefault(ident, r.image_bytes)
            if ident not in images:
                images[ident] = inspect_image(r.image_bytes if r.image_bytes is not None else r.image_path)
            if isinstance(images[ident], str):
                problems["unreadable_image"].add(r.where, f"{r.image_key}: {images[ident]}")
            else:
                kept.append((r, ident))

    if columns and read.total() and column_errors == read.total():
        first = problems["malformed_row"].examples[0]
        raise DataError(f"--columns {columns if isinstance(columns, str) else dict(columns)} matches no column "
                        f"of {source} at {root}: all {read.total()} rows lack a named column; first: {first}")

    # splits: val joins train (or becomes test); a share of images becomes test
    val_to_test = split_test_from is not None and share is None
    if val_to_test and not read["val"]:
        raise DataError(f"--split-test-from val: {source} at {root} has no validation rows")
    if share is not None and read["test"]:
        raise DataError(f"--split-test-from {split_test_from}: {source} at {root} already has "
                        f"{read['test']} test rows; a fraction is for sources without a test split")
    for r, _ in kept:
        if r.split == "val":
            r.split = "test" if val_to_test else "train"
        if share is not None and int(sha1_hex(r.image_key)[:8], 16) / 16**8 < share:
            r.split = "test"

    # duplicates within a split (same image file or embedded bytes, first kept), then train rows that
    # repeat a test item; for leaks "same image" is same bytes, so copies of one image kept in
    # per-split folders (VQA-Med's Train_images/ and VQAMed2019_Test_Images/) count
    first: dict[tuple[str, str, str], Row] = {}
    test_items: dict[tuple[str, str], Row] = {}
    unique: list[tuple[Row, str]] = []
    for r, ident in kept:
        k = (r.split, ident, normalize_text(r.question))
        if (other := first.get(k)) is not None:
            differ = normalize_text(other.answer) != normalize_text(r.answer)
            problems["duplicate"].add(r.where, f"same image and question as {other.where}"
                                      + (f" (answers differ: {other.answer!r} vs {r.answer!r})" if differ else ""))
        else:
            first[k] = r
            unique.append((r, ident))
            if r.split == "test":
                test_items.setdefault((images[ident][3], normalize_text(r.question)), r)
    final: list[tuple[Row, str]] = []
    for r, ident in unique:
        t = test_items.get((images[ident][3], normalize_text(r.question))) if r.split == "train" else None
        if t is not None:
            problems["test_leak"].add(r.where, f"same image and question as test row {t.where}")
        else:
            final.append((r, ident))

    medthink_report = None
    if medthink is not None:
        medthink_report = align_medthink([r for r, _ in final],
                                         read_medthink(medthink, medthink_columns, medthink_key),
                                         medthink_key, examples, medthink_image_folders(medthink))
        medthink_report["file"] = str(Path(medthink).expanduser().resolve())

    # records; embedded images and images over max_pixels get a file in OUT/images/
    over_max = 0
    to_write: dict[str, tuple[Path | bytes, int | None]] = {}  # "images/..." -> (source, max_pixels)
    records: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    ids: set[str] = set()
    for r, ident in final:
        w, h, fmt, _ = images[ident]
        too_big = max_pixels is not None and w * h > max_pixels
        over_max += too_big
        if r.image_bytes is not None or too_big:
            ext = ".jpg" if fmt == "JPEG" else ".png" if too_big else "." + fmt.lower()
            image = f"images/{sha1_hex(f'{ident}|{max_pixels if too_big else 0}')[:16]}{ext}"
            to_write[image] = (r.image_bytes if r.image_bytes is not None else r.image_path,
                               max_pixels if too_big else None)
        else:
            image = ident
        rid = base_id = record_id(dataset, r.split, r.image_key, r.question)
        n = 2
        while rid in ids:  # same key + question on a different image file (possible in generic layouts)
            rid, n = f"{base_id}-{n}", n + 1
        ids.add(rid)
        records[r.split].append({"id": rid, "image": image, "problem": r.question, "solution": r.answer,
                                 "gold_reasoning": r.rationale, "dataset": dataset, "split": r.split,
                                 "answer_type": answer_type(r.answer)})

    problem_total = sum(t.count for t in problems.values())
    report = {
        "source": source, "dataset": dataset, "root": str(root), "out": str(out),
        "read": {"train": read["train"], "val": read["val"], "test": read["test"], "total": sum(read.values())},
        "val_rows_to": ("test" if val_to_test else "train") if read["val"] else None,
        "split_test_from": split_test_from,
        "written": {s: len(v) for s, v in records.items()},
        "filtered": {reason: t.as_dict() for reason, t in filtered.items()},
        "skipped_files": notes,
        "problems": {name: t.as_dict() for name, t in problems.items()},
        "problem_total": problem_total,
        "answer_types": {s: dict(Counter(rec["answer_type"] for rec in v)) for s, v in records.items()},
        "images": {"unique": len(images), "unreadable": sum(isinstance(v, str) for v in images.values()),
                   "max_pixels": max_pixels, "rows_over_max_pixels": over_max,
                   "files_in_out_images": len(to_write)},
        "medthink": medthink_report,
        "files": {"train": str(out / "train.jsonl"), "test": str(out / "test.jsonl"),
                  "report": str(out / "report.json")},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    strict_issues = problem_total + (medthink_report["malformed"]["count"] + medthink_report["ambiguous"]["total"]
                                     if medthink_report else 0)
    if strict and strict_issues:
        for split in records:  # no stale output of an earlier run beside a failed report
            (out / f"{split}.jsonl").unlink(missing_ok=True)
        raise PrepareError(f"--strict: {strict_issues} problem row(s) in {source} at {root} "
                           f"(nothing written but {out / 'report.json'}):\n" + format_problems(report))
    for rel, (src, limit) in to_write.items():
        _write_image(out / rel, src, limit)
    for split, recs in records.items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for rec in recs:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return report


# ----------------------------------------------------------------------------- the paper's data folder

# (source, folder under Data_RAW/, MedThink folder) as dmis-lab/MRPO Data_code/Download_datasets.py lays
# them out: DATA_DIR/Data_RAW/{vqa-rad,slake,pathvqa}/{train.json,test.json,images/}, DATA_DIR/Medthink/R-*
PAPER_DATASETS = (("vqa_rad", "vqa-rad", "R-RAD"), ("slake", "slake", "R-SLAKE"), ("pathvqa", "pathvqa", "R-PathVQA"))


def paper_folders(root: str | Path, medthink: str | Path | None = None) -> tuple[Path, Path | None]:
    """(Data_RAW folder, MedThink folder or None) of the paper's DATA_DIR, or of its Data_RAW folder
    (MedThink then beside it: DATA_DIR/Medthink); `medthink` overrides where the MedThink folders are."""
    root = Path(root).expanduser().resolve()
    raw = root / "Data_RAW" if (root / "Data_RAW").is_dir() else root
    if not any((raw / folder).is_dir() for _, folder, _ in PAPER_DATASETS):
        raise DataError(f"{root}: not the MRPO paper's data folder (no Data_RAW/ nor vqa-rad/, slake/, pathvqa/)")
    if medthink is not None:
        mt = Path(medthink).expanduser().resolve()
        if not mt.is_dir():
            raise DataError(f"{mt}: MedThink folder not found")
        return raw, mt
    for mt in (raw.parent / "Medthink", raw / "Medthink", raw.parent / "Medthink_Dataset"):
        if mt.is_dir():
            return raw, mt
    return raw, None


def prepare_paper(root: str | Path, out: str | Path, *, medthink: str | Path | None = None,
                  strict: bool = False, **options: Any) -> dict[str, Any]:
    """Convert the paper's data folder with one call: each data set found under Data_RAW/ goes through
    `prepare` into OUT/<source>/ with its MedThink folder (R-RAD, R-SLAKE, R-PathVQA), then
    OUT/train.jsonl and OUT/test.jsonl join them (the paper trains on the three together; image paths
    relative to OUT/<source>/ are rewritten relative to OUT/) and
    OUT/report.json holds every data set's report. options: as for `prepare` (max_pixels, examples,
    medthink_key, split_test_from). Strict mode raises PrepareError after all data sets were tried.
    """
    raw, mt_root = paper_folders(root, medthink)
    out = Path(out).expanduser().resolve()
    reports: dict[str, Any] = {}
    notes: list[str] = []
    failed: list[str] = []
    for source, folder, mt_name in PAPER_DATASETS:
        if not (raw / folder).is_dir():
            notes.append(f"{raw / folder}: not found, {source} skipped")
            continue
        mt = mt_root / mt_name if mt_root is not None and (mt_root / mt_name).is_dir() else None
        if mt is None:
            notes.append(f"{source}: no MedThink folder {mt_name} (looked in {mt_root or raw.parent}): "
                         "no rationales attached")
        try:
            reports[source] = prepare(source, raw / folder, out / source, medthink=mt, strict=strict, **options)
        except PrepareError as e:
            failed.append(str(e))
    written = {split: 0 for split in ("train", "test")}
    if not failed:
        for split in written:
            with open(out / f"{split}.jsonl", "w", encoding="utf-8") as merged:
                for source in reports:
                    with open(out / source / f"{split}.jsonl", encoding="utf-8") as part:
                        for line in part:
                            rec = json.loads(line)
                            if not Path(rec["image"]).is_absolute():  # OUT/<source>/images/... from OUT/
                                rec["image"] = f"{source}/{rec['image']}"
                            merged.write(json.dumps(rec, ensure_ascii=False) + "\n")
                            written[split] += 1
    report = {"source": "mrpo_paper", "root": str(raw), "medthink_root": str(mt_root) if mt_root else None,
              "out": str(out), "notes": notes, "written": written, "datasets": reports,
              "files": {"train": str(out / "train.jsonl"), "test": str(out / "test.jsonl"),
                        "report": str(out / "report.json")}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if failed:
        for split in written:
            (out / f"{split}.jsonl").unlink(missing_ok=True)
        raise PrepareError("\n".join(failed))
    return report


def format_paper_summary(report: Mapping[str, Any]) -> str:
    """Human summary of a `prepare_paper` report: each data set's summary, then the joined files."""
    parts = [format_summary(r) for r in report["datasets"].values()]
    parts += [f"note: {n}" for n in report["notes"]]
    w, f = report["written"], report["files"]
    parts.append(f"all data sets: written train {w['train']}, test {w['test']}: {f['train']}, {f['test']}, "
                 f"{f['report']}")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- summary

def format_problems(report: Mapping[str, Any]) -> str:
    lines = []
    for name, p in report["problems"].items():
        if p["count"]:
            lines.append(f"  {name}: {p['count']}")
            lines += [f"    - {e}" for e in p["examples"]]
    mt = report.get("medthink")
    if mt:
        if mt["malformed"]["count"]:
            lines.append(f"  medthink malformed rows: {mt['malformed']['count']}")
            lines += [f"    - {e}" for e in mt["malformed"]["examples"]]
        if mt["ambiguous"]["total"]:
            lines.append(f"  medthink ambiguous rows: {mt['ambiguous']['total']}")
            lines += [f"    - {e}" for e in mt["ambiguous"]["examples"]]
    return "\n".join(lines)


def format_summary(report: Mapping[str, Any]) -> str:
    """Human summary of a `prepare` report (what `python -m mrpo.data prepare` prints)."""
    r, w = report["read"], report["written"]
    lines = [f"{report['source']} ({report['dataset']}) from {report['root']}",
             f"  read: train {r['train']}, val {r['val']}, test {r['test']} (total {r['total']})"
             + (f"; val rows -> {report['val_rows_to']}" if report["val_rows_to"] else ""),
             f"  written: train {w['train']}, test {w['test']}"]
    for reason, f in report["filtered"].items():
        lines.append(f"  filtered ({reason}): {f['count']}")
    for note in report.get("skipped_files", []):
        lines.append(f"  file {note}")
    lines.append(f"  problems: {report['problem_total']}" + (" (none)" if not report["problem_total"] else ""))
    problems = format_problems({"problems": report["problems"]})
    if problems:
        lines += ["  " + line for line in problems.splitlines()]
    mt = report.get("medthink")
    if mt:
        lines.append(f"  MedThink ({mt['file']}, key {'+'.join(mt['key'])}): {mt['rationales_read']} rationale rows; "
                     f"matched {mt['matched']['total']}, unmatched {mt['unmatched']['total']}, "
                     f"ambiguous {mt['ambiguous']['total']}, unused {mt['unused']['count']}, "
                     f"malformed {mt['malformed']['count']}"
                     + (f" ({mt['matched_by_image_content']} matched by image content)"
                        if mt.get("matched_by_image_content") else ""))
    im = report["images"]
    lines.append(f"  images: {im['unique']} checked, {im['unreadable']} unreadable"
                 + (f", {im['rows_over_max_pixels']} rows over max_pixels={im['max_pixels']} (downscaled copies)"
                    if im["max_pixels"] else "")
                 + (f", {im['files_in_out_images']} files in out/images/" if im["files_in_out_images"] else ""))
    f = report["files"]
    lines.append(f"  wrote {f['train']}, {f['test']}, {f['report']}")
    return "\n".join(lines)
