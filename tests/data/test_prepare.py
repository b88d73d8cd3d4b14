"""`prepare`: validation, MedThink alignment, splits, images, report, strict mode and the CLI."""
from __future__ import annotations

import hashlib
import io
import json
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from mrpo.data.__main__ import main
from mrpo.data.prepare import PrepareError, align_medthink, answer_type, prepare
from mrpo.data.readers import DataError, Row

PUBLIC = "VQA_RAD Dataset Public.json"


def make_image(path: Path, size=(8, 6), color=(200, 30, 30), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_id(dataset: str, split: str, image_key: str, normalised_question: str) -> str:
    digest = hashlib.sha1((image_key + "\n" + normalised_question).encode()).hexdigest()
    return f"{dataset}-{split}-{digest[:12]}"


@pytest.fixture
def vqa_rad(tmp_path) -> Path:
    """An OSF-style VQA-RAD copy with one row of each problem kind (hand-counted in the tests)."""
    root = tmp_path / "VQA_RAD"
    folder = root / "VQA_RAD Image Folder"
    make_image(folder / "synpic1.jpg")
    make_image(folder / "synpic2.jpg", color=(0, 0, 250))
    (folder / "synpic3.jpg").write_bytes(b"this is not an image")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (5, 200, 5)).save(buf, format="JPEG")
    (folder / "synpic4.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # truncated JPEG
    rows = [
        ("synpic1.jpg", "Is there a mass?", "yes", "freeform"),        # 1 train, kept
        ("synpic1.jpg", "is there a MASS", "yes", "para"),             # 2 duplicate of 1
        ("synpic1.jpg", "Where is the lesion?", "Left lobe", "freeform"),  # 3 leaks test row 8
        ("synpic2.jpg", "How many lesions?", 4, "freeform"),          # 4 train, kept
        ("synpic3.jpg", "Q3?", "yes", "freeform"),                     # 5 unreadable (not an image)
        ("synpic4.jpg", "Q4?", "no", "freeform"),                      # 6 unreadable (truncated)
        ("synpic5.jpg", "Q5?", "yes", "freeform"),                     # 7 missing image
        ("synpic1.jpg", "where is the lesion", "left lobe", "test_freeform"),  # 8 test, kept
        ("synpic2.jpg", "  ", "yes", "freeform"),                      # 9 empty question
        ("synpic2.jpg", "Q10?", "", "freeform"),                       # 10 empty answer
        None,                                                           # 11 malformed (no answer)
        ("synpic2.jpg", "Is it a CT?", "No", "test_para"),             # 12 test, kept
    ]
    data = []
    for qid, r in enumerate(rows, start=1):
        if r is None:
            data.append({"qid": qid, "image_name": "synpic2.jpg", "question": "Q11?"})
        else:
            data.append({"qid": qid, "image_name": r[0], "question": r[1], "answer": r[2], "phrase_type": r[3],
                         "answer_type": "CLOSED", "image_organ": "HEAD"})
    (root / PUBLIC).write_text(json.dumps(data))
    return root


@pytest.fixture
def medthink_file(tmp_path) -> Path:
    rows = [
        {"image_name": "synpic1.jpg", "question": "IS THERE A MASS", "answer": "Yes.",
         "rationale": "The scan shows a mass. So the answer is yes."},
        {"image_name": "synpic1.jpg", "question": "Is there a mass?", "answer": "yes",
         "rationale": "The scan  shows a mass.  So the answer is yes."},   # same text up to spaces
        {"image_name": "synpic2.jpg", "question": "How many lesions?", "answer": "4", "rationale": "Two."},
        {"image_name": "synpic2.jpg", "question": "How many lesions?", "answer": "4", "rationale": "Four."},
        {"image_name": "VQA_RAD Image Folder/synpic1.jpg", "question": "Where is the lesion?",
         "answer": "left lobe", "rationale": "Lesion in the left lobe."},
        {"image_name": "synpic9.jpg", "question": "Unknown?", "answer": "yes", "rationale": "Unused."},
        {"image_name": "synpic2.jpg", "question": "Is it a CT?", "answer": "no", "rationale": ""},
    ]
    path = tmp_path / "R-RAD.json"
    path.write_text(json.dumps(rows))
    return path


def test_prepare_vqa_rad_report_and_records(vqa_rad, medthink_file, tmp_path):
    out = tmp_path / "out"
    report = prepare("vqa_rad", vqa_rad, out, medthink=medthink_file)
    assert report == json.loads((out / "report.json").read_text())
    assert report["read"] == {"train": 10, "val": 0, "test": 2, "total": 12}
    assert report["written"] == {"train": 2, "test": 2}
    counts = {k: v["count"] for k, v in report["problems"].items()}
    assert counts == {"malformed_row": 1, "empty_question": 1, "empty_answer": 1, "missing_image": 1,
                      "unreadable_image": 2, "duplicate": 1, "test_leak": 1}
    assert report["problem_total"] == 8 and report["filtered"] == {}
    assert report["read"]["total"] == sum(report["written"].values()) + report["problem_total"]
    ex = {k: v["examples"] for k, v in report["problems"].items()}
    assert ex["missing_image"] == [f"{PUBLIC}:7 (qid 7): image 'synpic5.jpg' not found"]
    assert ex["duplicate"] == [f"{PUBLIC}:2 (qid 2): same image and question as {PUBLIC}:1 (qid 1)"]
    assert ex["test_leak"] == [f"{PUBLIC}:3 (qid 3): same image and question as test row {PUBLIC}:8 (qid 8)"]
    assert ex["malformed_row"][0].startswith(f"{PUBLIC}:11 (qid 11): expected an object")
    assert [e.split(":")[1] for e in ex["unreadable_image"]] == ["5 (qid 5)", "6 (qid 6)"]
    assert "truncated" in ex["unreadable_image"][1].lower()
    assert report["images"]["unique"] == 4 and report["images"]["unreadable"] == 2

    mt = report["medthink"]
    assert mt["rationales_read"] == 7 and mt["malformed"]["count"] == 1
    assert (mt["matched"]["train"], mt["matched"]["test"]) == (1, 1)
    assert (mt["ambiguous"]["train"], mt["unmatched"]["test"], mt["unused"]["count"]) == (1, 1, 1)
    assert mt["unused"]["examples"][0].startswith("R-RAD.json:6")

    train, test = read_jsonl(out / "train.jsonl"), read_jsonl(out / "test.jsonl")
    folder = vqa_rad.resolve() / "VQA_RAD Image Folder"
    assert train[0] == {"id": expected_id("vqa_rad", "train", "synpic1.jpg", "is there a mass"),
                        "image": str(folder / "synpic1.jpg"), "problem": "Is there a mass?", "solution": "yes",
                        "gold_reasoning": "The scan shows a mass. So the answer is yes.", "dataset": "vqa_rad",
                        "split": "train", "answer_type": "closed"}
    assert (train[1]["solution"], train[1]["answer_type"], train[1]["gold_reasoning"]) == ("4", "open", "")
    assert [r["problem"] for r in test] == ["where is the lesion", "Is it a CT?"]
    assert test[0]["gold_reasoning"] == "Lesion in the left lobe." and test[1]["answer_type"] == "closed"

    again = prepare("vqa_rad", vqa_rad, tmp_path / "out2")  # ids are stable across runs
    assert [r["id"] for r in read_jsonl(tmp_path / "out2" / "train.jsonl")] == [r["id"] for r in train]
    assert again["medthink"] is None


def test_medthink_key_without_answer(vqa_rad, tmp_path):
    path = tmp_path / "rationales.jsonl"
    path.write_text(json.dumps({"img": "synpic2.jpg", "q": "is it a ct", "why": "Axial slices."}) + "\n")
    report = prepare("vqa_rad", vqa_rad, tmp_path / "out", medthink=path,
                     medthink_columns="image=img,question=q,rationale=why", medthink_key=("image", "question"))
    assert report["medthink"]["matched"]["total"] == 1
    (ct,) = [r for r in read_jsonl(tmp_path / "out" / "test.jsonl") if r["problem"] == "Is it a CT?"]
    assert ct["gold_reasoning"] == "Axial slices."
    with pytest.raises(DataError, match="bad MedThink key"):
        align_medthink([], [], key=("image", "modality"))


def test_align_medthink_unit():
    rows = [Row("f", "1", "train", "Q one?", "Yes", "a/x.jpg"), Row("f", "2", "test", "Q two", "no", "y.png")]
    rationales = [Row("m", "1", question="q ONE", answer="yes", image_key="x.jpg", rationale="R1"),
                  Row("m", "2", question="q two", answer="no", image_key="z.png", rationale="R2")]
    report = align_medthink(rows, rationales)
    assert rows[0].rationale == "R1" and rows[1].rationale == ""
    assert (report["matched"]["total"], report["unmatched"]["test"], report["unused"]["count"]) == (1, 1, 1)


def test_strict_mode(vqa_rad, tmp_path):
    out = tmp_path / "out"
    prepare("vqa_rad", vqa_rad, out)
    assert (out / "train.jsonl").exists()
    with pytest.raises(PrepareError) as err:
        prepare("vqa_rad", vqa_rad, out, strict=True)
    msg = str(err.value)
    assert "8 problem row(s)" in msg and "missing_image: 1" in msg and f"{PUBLIC}:7 (qid 7)" in msg
    assert (out / "report.json").exists()
    assert not (out / "train.jsonl").exists() and not (out / "test.jsonl").exists()


def test_strict_mode_passes_on_clean_data(tmp_path):
    make_image(tmp_path / "d" / "a.png")
    (tmp_path / "d" / "test.jsonl").write_text(json.dumps({"image": "a.png", "question": "Q?", "answer": "yes"}))
    report = prepare("generic", tmp_path / "d", tmp_path / "out", strict=True)
    assert report["problem_total"] == 0 and report["written"] == {"train": 0, "test": 1}
    assert report["dataset"] == "d"


def test_slake_filtered_rows_and_val_split(tmp_path):
    base = tmp_path / "Slake1.0"
    for i in range(3):
        make_image(base / "imgs" / f"xmlab{i}" / "source.jpg", color=(80 * i, 0, 0))  # distinct bytes
    rec = {"img_name": "xmlab0/source.jpg", "question": "What modality?", "answer": "MRI", "q_lang": "en"}
    (base / "train.json").write_text(json.dumps([rec, dict(rec, question="什么模态？", q_lang="zh")]))
    (base / "validate.json").write_text(json.dumps([dict(rec, img_name="xmlab1/source.jpg")]))
    (base / "test.json").write_text(json.dumps([dict(rec, img_name="xmlab2/source.jpg")]))
    report = prepare("slake", tmp_path, tmp_path / "a")
    assert report["read"] == {"train": 2, "val": 1, "test": 1, "total": 4}
    assert report["filtered"] == {"non-English question (q_lang=zh)": {"count": 1, "examples": ["train.json:2"]}}
    assert report["written"] == {"train": 2, "test": 1} and report["val_rows_to"] == "train"
    report = prepare("slake", tmp_path, tmp_path / "b", split_test_from="val")
    assert report["written"] == {"train": 1, "test": 2} and report["val_rows_to"] == "test"
    test_ids = [r["id"] for r in read_jsonl(tmp_path / "b" / "test.jsonl")]
    assert test_ids[0] == expected_id("slake", "test", "xmlab1/source.jpg", "what modality")


def test_split_test_from_fraction(tmp_path):
    d = tmp_path / "d"
    recs = []
    for i in range(20):
        make_image(d / f"img{i}.png", color=(i * 10, 0, 0))
        recs += [{"image": f"img{i}.png", "question": f"Is finding {j} present?", "answer": "no"} for j in (1, 2)]
    (d / "all.json").write_text(json.dumps(recs))
    report = prepare("generic", d, tmp_path / "out", split_test_from="0.3", dataset="toy")
    held = {f"img{i}.png" for i in range(20)
            if int(hashlib.sha1(f"img{i}.png".encode()).hexdigest()[:8], 16) / 16**8 < 0.3}
    test = read_jsonl(tmp_path / "out" / "test.jsonl")
    assert {Path(r["image"]).name for r in test} == held and len(test) == 2 * len(held)
    assert report["written"]["train"] == 40 - len(test) and report["problems"]["test_leak"]["count"] == 0
    with pytest.raises(DataError, match="fraction must be in"):
        prepare("generic", d, tmp_path / "x", split_test_from="1.5")
    (d / "test.json").write_text(json.dumps(recs[:1]))
    with pytest.raises(DataError, match="already has 1 test rows"):
        prepare("generic", d, tmp_path / "x", split_test_from="0.3")
    with pytest.raises(DataError, match="no validation rows"):
        prepare("generic", d, tmp_path / "x", split_test_from="val")


def test_max_pixels_writes_downscaled_copies(tmp_path):
    d = tmp_path / "d"
    make_image(d / "big.jpg", size=(40, 30))
    make_image(d / "small.png", size=(10, 10))
    (d / "train.json").write_text(json.dumps([{"image": "big.jpg", "question": "Big?", "answer": "yes"},
                                              {"image": "small.png", "question": "Small?", "answer": "no"}]))
    out = tmp_path / "out"
    report = prepare("generic", d, out, max_pixels=300)
    big, small = read_jsonl(out / "train.jsonl")
    assert big["image"].startswith("images/") and big["image"].endswith(".jpg")
    with Image.open(out / big["image"]) as im:
        assert im.size == (20, 15)  # sqrt(300 / 1200) = 0.5
    assert small["image"] == str((d / "small.png").resolve())
    assert report["images"]["rows_over_max_pixels"] == 1 and report["images"]["files_in_out_images"] == 1
    with pytest.raises(DataError, match="max-pixels"):
        prepare("generic", d, out, max_pixels=0)


def test_embedded_images_are_written(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    Image.new("RGB", (5, 4), (1, 2, 3)).save(buf, format="PNG")
    png = buf.getvalue()
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": png, "path": None}, {"bytes": png, "path": None},
                                         {"bytes": b"garbage", "path": "bad.jpg"}], img_type),
                      "question": ["Q1?", "Q2?", "Q3?"], "answer": ["yes", "no", "yes"]})
    (tmp_path / "hf" / "data").mkdir(parents=True)
    pq.write_table(table, tmp_path / "hf" / "data" / "train-00000-of-00001.parquet")
    out = tmp_path / "out"
    report = prepare("pathvqa", tmp_path / "hf", out)
    rows = read_jsonl(out / "train.jsonl")
    assert len(rows) == 2 and rows[0]["image"] == rows[1]["image"] and rows[0]["image"].endswith(".png")
    assert (out / rows[0]["image"]).read_bytes() == png
    assert report["problems"]["unreadable_image"]["examples"][0].startswith(
        "data/train-00000-of-00001.parquet:3: bad.jpg: ")
    assert report["images"]["files_in_out_images"] == 1


def test_answer_type():
    assert [answer_type(a) for a in ("Yes", "no.", " NO ", "yes, left", "4")] == \
        ["closed", "closed", "closed", "open", "open"]


def test_cli_prepare(vqa_rad, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prepare", "--source", "vqa_rad", "--root", str(vqa_rad), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "written: train 2, test 2" in printed and "missing_image: 1" in printed and str(out) in printed
    assert main(["prepare", "--source", "vqa_rad", "--root", str(vqa_rad), "--out", str(out), "--strict"]) == 1
    assert "error: --strict: 8 problem row(s)" in capsys.readouterr().err
    assert main(["prepare", "--source", "slake", "--root", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "no SLAKE train.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prepare", "--source", "no_such", "--root", ".", "--out", str(out)])


def test_cli_synth_calls_generator_lazily(tmp_path, monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("mrpo.data.synthetic")
    def generate_synthetic(out_dir, n_train, n_test, seed):
        calls.append((out_dir, n_train, n_test, seed))
        return Path(out_dir) / "train.jsonl", Path(out_dir) / "test.jsonl"
    fake.generate_synthetic = generate_synthetic
    monkeypatch.setitem(sys.modules, "mrpo.data.synthetic", fake)
    assert main(["synth", "--out", str(tmp_path), "--n-train", "3", "--n-test", "2", "--seed", "7"]) == 0
    assert calls == [(str(tmp_path), 3, 2, 7)]
    assert str(tmp_path / "train.jsonl") in capsys.readouterr().out
