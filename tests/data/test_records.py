"""load_records: validation, skipping with a report, strict errors naming file/line/key; load_image."""
import json
import re

import pytest
from PIL import Image

from mrpo.data.records import fit_max_pixels, load_image, load_records


@pytest.fixture
def jsonl(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "img" / "ok.png")
    Image.new("L", (8, 8), 5).save(tmp_path / "gray.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    ok = {"id": "a", "image": "img/ok.png", "problem": "Is there a lesion?", "solution": "yes"}
    rows = [
        json.dumps(ok),                                                           # line 1 ok
        json.dumps({**ok, "id": "b", "solution": "  "}),                          # 2 empty answer
        "",                                                                       # 3 blank: ignored
        json.dumps({k: v for k, v in ok.items() if k != "problem"} | {"id": "c"}),  # 4 missing problem
        "{not json",                                                              # 5 invalid JSON
        json.dumps({**ok, "id": "d", "image": "img/missing.png"}),                # 6 missing image
        json.dumps({**ok, "id": "e", "image": "img/broken.png"}),                 # 7 unreadable image
        json.dumps({"image": str(tmp_path / "gray.png"), "problem": "How many?", "solution": 2}),  # 8 ok
        json.dumps([1, 2]),                                                       # 9 not an object
        json.dumps({**ok, "id": "f", "solution": None}),                          # 10 missing answer
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_skips_bad_rows_with_report(jsonl, tmp_path):
    records, report = load_records(jsonl)
    assert [r["id"] for r in records] == ["a", "data:8"]
    assert records[0]["image"] == str((tmp_path / "img" / "ok.png").resolve())
    assert records[0]["gold_reasoning"] == ""
    assert records[1]["solution"] == "2"                     # numeric answers become text
    assert (report.total, report.kept, report.skipped) == (9, 2, 7)
    assert report.reasons == {"empty_answer": 1, "missing_key": 2, "invalid_json": 1, "bad_image": 2,
                              "not_an_object": 1}
    assert [(line, rid) for line, rid, _ in report.examples] == [(2, "b"), (4, "c"), (5, "data:5"),
                                                                  (6, "d"), (7, "e")]
    assert "missing key 'problem'" in report.examples[1][2]
    assert "missing.png" in report.examples[3][2] and "unreadable" in report.examples[4][2]
    text = str(report)
    assert "2/9 rows kept" in text and "line 2 (b)" in text


def test_strict_names_file_line_and_key(jsonl):
    with pytest.raises(ValueError, match=r"data\.jsonl:2: row 'b': empty answer in key 'solution'"):
        load_records(jsonl, strict=True)
    lines = jsonl.read_text().splitlines()
    jsonl.write_text("\n".join(lines[:1] + lines[2:]) + "\n")   # drop line 2: row c moves to line 3
    with pytest.raises(ValueError, match=r"data\.jsonl:3: row 'c': missing key 'problem'"):
        load_records(jsonl, strict=True)


@pytest.mark.parametrize("family, token, key", [("qwen2_5_vl", "<|image_pad|>", "problem"),
                                                ("qwen3_vl", "<|vision_start|>", "gold_reasoning"),
                                                ("internvl3", "<IMG_CONTEXT>", "problem"),
                                                ("internvl3", "</img>", "solution")])
def test_image_placeholder_token_in_text_is_a_bad_row(tmp_path, family, token, key):
    """A record whose text holds the family's image placeholder token is skipped at load (counted as
    image_token_in_text) or, strict, names file:line, row id and key; other families' tokens are text."""
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    ok = {"id": "a", "image": "ok.png", "problem": "Is there a lesion?", "solution": "yes", "gold_reasoning": "x"}
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [ok, {**ok, "id": "b", key: f"look {token} here"}]) + "\n")
    records, report = load_records(path, family=family)
    assert [r["id"] for r in records] == ["a"]
    assert report.reasons == {"image_token_in_text": 1}
    assert report.examples[0][:2] == (2, "b") and f"key '{key}' holds the image placeholder token" in report.examples[0][2]
    with pytest.raises(ValueError, match=rf"d\.jsonl:2: row 'b': key '{key}' holds the image placeholder token "
                                         rf"'{re.escape(token)}'"):
        load_records(path, strict=True, family=family)
    other = "internvl3" if family != "internvl3" else "qwen2_5_vl"
    assert len(load_records(path, family=other)[0]) == 2   # not that model's token: plain text
    assert len(load_records(path)[0]) == 2                 # no family: not checked


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(tmp_path / "nope.jsonl")


def test_load_image_rgb_and_max_pixels(tmp_path):
    Image.new("L", (300, 100), 7).save(tmp_path / "wide.png")
    im = load_image(tmp_path / "wide.png")
    assert im.mode == "RGB" and im.size == (300, 100)
    small = load_image(tmp_path / "wide.png", max_pixels=3000)
    w, h = small.size
    assert w * h <= 3000 and abs(w / h - 3.0) < 0.1 and w * h > 2700
    assert fit_max_pixels(im, 10**6) is im                    # never upscales
    tiny = fit_max_pixels(Image.new("RGB", (1000, 1)), 10)
    assert tiny.size[0] * tiny.size[1] <= 10
