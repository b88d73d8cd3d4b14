"""Read and validate the project's JSONL records (format: mrpo/data/__init__.py) and load images.

`image` is one path, a list of paths (several images, in the order the model sees them) or [] (a
text-only question). Bad rows (invalid JSON, missing problem/solution/image, empty answer, missing or
unreadable image, text holding the model's image placeholder tokens) are skipped and counted in a RecordReport, which keeps the first few row ids and line numbers for
the log; strict=True raises instead, naming the file, the line and the key. Images are fully
decoded once per file when records are loaded (not only their headers checked), so a file with valid PNG
chunks but a broken pixel stream is skipped and named here instead of failing a training step.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

REQUIRED_KEYS = ("problem", "solution", "image")
MAX_EXAMPLES = 5
# The tokens each family's processor puts where an image goes (Qwen: <|vision_start|><|image_pad|>...
# <|vision_end|>; InternVL: <img><IMG_CONTEXT>...</img>). In a record's text they tokenize as those special
# tokens, so the model finds more image tokens than image features and the step fails: a bad row.
VISION_TOKENS = {
    "qwen2_5_vl": ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"),
    "qwen3_vl": ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"),
    "internvl3": ("<IMG_CONTEXT>", "<img>", "</img>", "<video>"),
}
TEXT_KEYS = ("problem", "solution", "gold_reasoning")   # the record text the model reads or is trained on


@dataclass
class RecordReport:
    """What load_records kept and skipped. `examples`: (line, row id, reason) of the first bad rows."""
    path: str
    total: int = 0
    kept: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list[tuple[int, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        s = f"{self.path}: {self.kept}/{self.total} rows kept"
        if self.skipped:
            why = ", ".join(f"{k}: {v}" for k, v in self.reasons.most_common())
            first = "; ".join(f"line {ln} ({rid}): {msg}" for ln, rid, msg in self.examples)
            s += f", {self.skipped} skipped ({why}); first: {first}"
        return s


def fit_max_pixels(image: Image.Image, max_pixels: int | None) -> Image.Image:
    """Downscale (keeping aspect) so that width * height <= max_pixels; never upscales."""
    w, h = image.size
    if max_pixels is None or w * h <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (w * h))
    nw, nh = max(1, int(w * scale)), max(1, int(h * scale))
    while nw * nh > max_pixels:  # int() rounding can still overshoot by a row or column
        nw, nh = (nw - 1, nh) if nw >= nh else (nw, nh - 1)
    return image.resize((nw, nh), Image.Resampling.BICUBIC)


def load_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Open an image as RGB, downscaled to <= max_pixels pixels (aspect kept)."""
    with Image.open(path) as im:
        image = im.convert("RGB")
    return fit_max_pixels(image, max_pixels)


def record_image_paths(record: dict) -> list[str]:
    """The record's image paths in order: [] for a text-only record, [path] for a single image."""
    image = record.get("image")
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


def load_record_images(record: dict, max_pixels: int | None = None) -> list[Image.Image]:
    """All images of a record as RGB, each downscaled to <= max_pixels; [] for a text-only record.
    Raises OSError / ValueError naming the record id and the image path."""
    images = []
    for path in record_image_paths(record):
        try:
            images.append(load_image(path, max_pixels))
        except (OSError, ValueError) as e:
            raise type(e)(f"record {record.get('id')!r}: cannot read image {path}: {e}") from e
    return images


def check_image(path: Path) -> str | None:
    """None when the file decodes completely as an image (as `load_image` will read it), else the reason.

    Decodes the whole pixel stream (Image.load), not just the header: truncated files and broken
    compressed data (valid PNG chunks, corrupt IDAT) fail here.
    """
    if not path.is_file():
        return f"image file not found: {path}"
    try:
        with Image.open(path) as im:
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"unreadable image {path}: {type(e).__name__}: {e}"
    return None


def _validate(row, base: Path, checked: dict[Path, str | None], vision_tokens=()) -> tuple[str, str]:
    """(reason key, message naming the key) for a bad row; ("", "") when the row is fine.
    Resolves row["image"] to an absolute path in place. checked: image path -> check_image result
    (each file is decoded once per load). vision_tokens: strings no text key may hold (VISION_TOKENS)."""
    if not isinstance(row, dict):
        return "not_an_object", f"expected a JSON object, got {type(row).__name__}"
    for key in REQUIRED_KEYS:
        if key not in row or row[key] is None:
            return "missing_key", f"missing key '{key}'"
    if isinstance(row["solution"], (int, float)) and not isinstance(row["solution"], bool):
        row["solution"] = str(row["solution"])   # numeric answers ("How many ...?") as text
    for key in ("problem", "solution"):
        if not isinstance(row[key], str):
            return "bad_type", f"key '{key}' must be a string, got {type(row[key]).__name__}"
    image = row["image"]
    if not (isinstance(image, str) or (isinstance(image, list) and all(isinstance(p, str) for p in image))):
        return "bad_type", f"key 'image' must be a path or a list of paths, got {type(image).__name__}"
    if not row["solution"].strip():
        return "empty_answer", "empty answer in key 'solution'"
    if not row["problem"].strip():
        return "empty_problem", "empty question in key 'problem'"
    for key in TEXT_KEYS:
        text = row.get(key)
        if isinstance(text, str) and (found := [t for t in vision_tokens if t in text]):
            return "image_token_in_text", (f"key '{key}' holds the image placeholder token {found[0]!r} (the "
                                           f"processor inserts it for each image; remove it from the text)")
    resolved = []
    for i, p in enumerate([image] if isinstance(image, str) else image):
        path = Path(p).expanduser()
        path = path if path.is_absolute() else base / path
        if path not in checked:
            checked[path] = check_image(path)
        if (msg := checked[path]) is not None:
            return "bad_image", f"key 'image'{'' if isinstance(image, str) else f'[{i}]'}: {msg}"
        resolved.append(str(path))
    row["image"] = resolved[0] if isinstance(image, str) else resolved
    return "", ""


def load_records(path: str | Path, strict: bool = False, family: str | None = None) -> tuple[list[dict], RecordReport]:
    """Read a JSONL record file; returns (valid records, report).

    Image paths are resolved relative to the file's folder; a missing "id" becomes "<file stem>:<line>",
    a missing "gold_reasoning" becomes "". strict=True raises ValueError("<file>:<line>: ...") on the
    first bad row instead of skipping it. family: the model family whose image placeholder tokens
    (VISION_TOKENS) make a row bad when its text holds one (None: not checked).
    """
    vision_tokens = VISION_TOKENS.get(family, ())
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"record file not found: {path}")
    base = path.resolve().parent
    report = RecordReport(path=str(path))
    records = []
    checked: dict[Path, str | None] = {}
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            report.total += 1
            row_id = f"{path.stem}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                reason, msg = "invalid_json", f"invalid JSON ({e.msg} at column {e.colno})"
            else:
                if isinstance(row, dict) and row.get("id") is not None:
                    row_id = str(row["id"])
                reason, msg = _validate(row, base, checked, vision_tokens)
            if reason:
                if strict:
                    raise ValueError(f"{path}:{line_no}: row {row_id!r}: {msg}")
                report.skipped += 1
                report.reasons[reason] += 1
                if len(report.examples) < MAX_EXAMPLES:
                    report.examples.append((line_no, row_id, msg))
                continue
            row["id"] = row_id
            row.setdefault("gold_reasoning", "")
            if row["gold_reasoning"] is None:
                row["gold_reasoning"] = ""
            records.append(row)
            report.kept += 1
    return records, report
