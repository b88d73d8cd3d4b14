"""End to end on copies laid out as the public downloads are: MedThink (Tang-xiaoxiao/Medthink
Medthink_Dataset/R-*), the data sets' own releases, the MRPO paper's data folder (dmis-lab/MRPO
Data_code/Download_datasets.py), VQA-Med 2019's extra files, and broken images at training time.
Every count below is worked out by hand from the rows written in the fixture."""
from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from mrpo.data.__main__ import main
from mrpo.data.prepare import prepare, prepare_paper
from mrpo.data.readers import read_medthink
from mrpo.data.records import load_image, load_records


def make_image(path: Path, color, size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    return path


def png_bytes(color, size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_medthink(folder: Path, files: dict[str, list[dict]]) -> None:
    """MedThink files as published: a JSON object of id -> item, one file per {open,closed}-end split."""
    for rel, items in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({str(1000 + i): item for i, item in enumerate(items)}))


def mt(question, choices, answer, solution, **image):
    return {"question": question, "choices": choices, "answer": answer, "solution": solution, **image}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def counts(report) -> dict:
    return {k: v["count"] for k, v in report["problems"].items() if v["count"]}


def medthink_counts(report) -> tuple:
    m = report["medthink"]
    return (m["rationales_read"], m["matched"]["total"], m["unmatched"]["total"], m["ambiguous"]["total"],
            m["unused"]["count"], m["malformed"]["count"])


# ----------------------------------------------------------------------------- MedThink as published

def r_rad(folder: Path) -> Path:
    """R-RAD: 7 items over 3 files; answers are indices into choices."""
    write_medthink(folder, {
        "closed-end/trainset.json": [
            mt("Is there a mass?", ["yes", "no"], 0, "A round mass is seen. So yes.", image="synpic1.jpg"),
            mt("Is it bilateral?", ["yes", "no"], 5, "Index out of range.", image="synpic1.jpg"),   # malformed
        ],
        "open-end/trainset.json": [
            mt("where is the lesion ?", ["Left lobe"], 0, "It sits in the left lobe.", image="synpic1.jpg"),
            mt("How many lesions?", ["2"], 0, "Two lesions are seen.", image="synpic2.jpg"),
            mt("How many lesions?", ["2"], 0, "There are two nodules.", image="synpic2.jpg"),  # -> ambiguous
            mt("Which organ?", ["liver"], 0, "Unused: no such question.", image="synpic9.jpg"),
        ],
        "closed-end/testset.json": [
            mt("Is it a CT?", ["yes", "no"], 1, "This is a radiograph, not CT.", image="synpic2.jpg"),
        ],
    })
    make_image(folder / "images" / "synpic1.jpg", (200, 0, 0))
    return folder


def test_medthink_reader_published_items(tmp_path):
    r_rad(tmp_path / "R-RAD")
    rows = list(read_medthink(tmp_path / "R-RAD"))
    assert len(rows) == 7
    good = {(r.image_key, r.question, r.answer) for r in rows if not r.error}
    assert ("synpic1.jpg", "Is there a mass?", "yes") in good        # choices[0]
    assert ("synpic2.jpg", "Is it a CT?", "no") in good               # choices[1]
    (bad,) = [r for r in rows if r.error]
    assert bad.error == "answer index 5 outside choices (len 2)"
    assert bad.where == "closed-end/trainset.json:1001"


def test_vqa_rad_osf_with_r_rad(tmp_path):
    root = tmp_path / "VQA_RAD"
    folder = root / "VQA_RAD Image Folder"
    make_image(folder / "synpic1.jpg", (200, 0, 0))
    make_image(folder / "synpic2.jpg", (0, 200, 0))
    make_image(folder / "synpic3.jpg", (0, 0, 200))
    rows = [("synpic1.jpg", "Is there a mass?", "yes", "freeform"),          # matched (closed-end)
            ("synpic1.jpg", "Where is the lesion?", "left lobe", "freeform"),  # matched ("lesion ?" / "Left lobe")
            ("synpic2.jpg", "How many lesions?", 2, "freeform"),             # ambiguous (two rationales)
            ("synpic3.jpg", "What organ?", "brain", "freeform"),             # unmatched
            ("synpic7.jpg", "Q?", "yes", "freeform"),                        # missing image
            ("synpic2.jpg", "Is it a CT?", "No", "test_freeform")]           # matched (test)
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(
        [{"qid": i, "image_name": im, "question": q, "answer": a, "phrase_type": p}
         for i, (im, q, a, p) in enumerate(rows, start=1)]))
    report = prepare("vqa_rad", root, tmp_path / "out", medthink=r_rad(tmp_path / "Medthink" / "R-RAD"))
    assert report["written"] == {"train": 4, "test": 1} and counts(report) == {"missing_image": 1}
    # read 7: matched 3 (train 2, test 1), unmatched 1, ambiguous 1, unused 1 (synpic9), malformed 1
    assert medthink_counts(report) == (7, 3, 1, 1, 1, 1)
    assert (report["medthink"]["matched"]["train"], report["medthink"]["matched"]["test"]) == (2, 1)
    train = {r["problem"]: r for r in read_jsonl(tmp_path / "out" / "train.jsonl")}
    assert train["Where is the lesion?"]["gold_reasoning"] == "It sits in the left lobe."
    assert train["How many lesions?"]["gold_reasoning"] == ""
    (test,) = read_jsonl(tmp_path / "out" / "test.jsonl")
    assert test["gold_reasoning"] == "This is a radiograph, not CT."


# ----------------------------------------------------------------------------- SLAKE

def r_slake(folder: Path) -> Path:
    """R-SLAKE: img_id + img_name, nested and flattened names; per-image JSON under images/ is not read."""
    write_medthink(folder, {
        "open-end/train.json": [
            mt("What modality is used?", ["MRI"], 0, "T2 signal pattern. So MRI.", img_id=0, img_name="xmlab0/source.jpg"),
            mt("Which organ is abnormal?", ["Liver"], 0, "A liver lesion.", img_id=1, img_name="xmlab1_source.jpg"),
        ],
        "closed-end/test.json": [
            mt("Is this a CT?", ["Yes", "No"], 0, "Hounsfield contrast. So yes.", img_id=2, img_name="xmlab2/source.jpg"),
        ],
    })
    (folder / "images" / "xmlab0").mkdir(parents=True)
    (folder / "images" / "xmlab0" / "question.json").write_text(json.dumps([{"question": "not a rationale"}]))
    return folder


def slake_rows():
    en = {"q_lang": "en", "answer_type": "OPEN"}
    return {
        "train.json": [dict(en, qid=1, img_id=0, img_name="xmlab0/source.jpg", question="What modality is used?",
                            answer="MRI"),
                       dict(en, qid=2, img_id=1, img_name="xmlab1/source.jpg", question="Which organ is abnormal?",
                            answer="Liver"),
                       dict(qid=3, img_id=1, img_name="xmlab1/source.jpg", question="哪个器官异常？", answer="肝脏",
                            q_lang="zh")],
        "test.json": [dict(en, qid=4, img_id=2, img_name="xmlab2/source.jpg", question="Is this a CT?", answer="Yes")],
    }


def test_slake_with_r_slake(tmp_path):
    base = tmp_path / "Slake1.0"
    for i in range(3):
        make_image(base / "imgs" / f"xmlab{i}" / "source.jpg", (80 * i, 10, 10))
    for name, rows in slake_rows().items():
        (base / name).write_text(json.dumps(rows))
    report = prepare("slake", tmp_path, tmp_path / "out", medthink=r_slake(tmp_path / "R-SLAKE"))
    assert report["written"] == {"train": 2, "test": 1} and counts(report) == {}
    assert report["filtered"]["non-English question (q_lang=zh)"]["count"] == 1
    assert medthink_counts(report) == (3, 3, 0, 0, 0, 0)   # xmlab1_source.jpg == xmlab1/source.jpg
    assert all(r["gold_reasoning"] for r in read_jsonl(tmp_path / "out" / "train.jsonl"))


# ----------------------------------------------------------------------------- PathVQA (Hugging Face)

def test_pathvqa_parquet_matches_medthink_by_image_content(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    a, b = png_bytes((10, 20, 30)), png_bytes((30, 20, 10))
    img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": a, "path": None}, {"bytes": b, "path": None},
                                         {"bytes": b"\x89PNG\r\n\x1a\ngarbage", "path": None},
                                         {"bytes": b"", "path": "empty.jpg"}], img),
                      "question": ["What is present?", "Is this necrosis?", "Q3?", "Q4?"],
                      "answer": ["granuloma", "yes", "no", "no"]})
    (tmp_path / "hf" / "data").mkdir(parents=True)
    pq.write_table(table, tmp_path / "hf" / "data" / "train-00000-of-00001.parquet")
    mt_dir = tmp_path / "R-PathVQA"
    write_medthink(mt_dir, {
        "open-end/trainset.json": [mt("What is present?", ["granuloma"], 0, "Epithelioid cells.", image="train_0007.jpg")],
        "closed-end/trainset.json": [mt("Is this necrosis?", ["yes", "no"], 0, "Eosinophilic debris.",
                                        image="train_0008.jpg")],
    })
    (mt_dir / "images" / "Train_images").mkdir(parents=True)
    (mt_dir / "images" / "Train_images" / "train_0007.jpg").write_bytes(a)   # same bytes, MedThink's name
    (mt_dir / "images" / "Train_images" / "train_0008.jpg").write_bytes(b)
    report = prepare("pathvqa", tmp_path / "hf", tmp_path / "out", medthink=mt_dir)
    assert report["written"] == {"train": 2, "test": 0}
    assert counts(report) == {"unreadable_image": 2}                        # garbage and empty embedded bytes
    examples = report["problems"]["unreadable_image"]["examples"]
    assert "data/train-00000-of-00001.parquet:4: empty.jpg: empty image data" in examples[1]
    assert medthink_counts(report) == (2, 2, 0, 0, 0, 0)
    assert report["medthink"]["matched_by_image_content"] == 2


# ----------------------------------------------------------------------------- the paper's data folder

def paper_data_dir(tmp_path: Path) -> Path:
    """DATA_DIR as Download_datasets.py leaves it (Data_RAW/ + Medthink/), with one problem of each kind."""
    data = tmp_path / "DATA_DIR"
    raw = data / "Data_RAW"
    # vqa-rad: {"image": "images/...", "question", "answer"}
    make_image(raw / "vqa-rad" / "images" / "synpic1.jpg", (200, 0, 0))
    make_image(raw / "vqa-rad" / "images" / "synpic2.jpg", (0, 200, 0))
    (raw / "vqa-rad" / "train.json").write_text(json.dumps([
        {"image": "images/synpic1.jpg", "question": "Is there a mass?", "answer": "yes"},       # matched
        {"image": "images/synpic1.jpg", "question": "Where is the lesion?", "answer": "left lobe"},  # matched
        {"image": "images/synpic2.jpg", "question": "How many lesions?", "answer": "2"},        # ambiguous
        {"image": "images/synpic5.jpg", "question": "Lost?", "answer": "no"},                   # missing image
    ]))
    (raw / "vqa-rad" / "test.json").write_text(json.dumps([
        {"image": "images/synpic2.jpg", "question": "Is it a CT?", "answer": "No"}]))           # matched
    # slake: the raw SLAKE json, images/xmlabN/source.jpg
    for i in range(3):
        make_image(raw / "slake" / "images" / f"xmlab{i}" / "source.jpg", (80 * i, 10, 10))
    for name, rows in slake_rows().items():
        (raw / "slake" / name).write_text(json.dumps(rows))
    # pathvqa: {"image": "images/<MedThink name>", "problem", "solution"}
    make_image(raw / "pathvqa" / "images" / "train_0007.jpg", (10, 20, 30))
    (raw / "pathvqa" / "images" / "test_0001.jpg").write_bytes(
        png_bytes((5, 5, 5))[:60] + b"\x00" * 40)                                                  # broken
    (raw / "pathvqa" / "train.json").write_text(json.dumps([
        {"image": "images/train_0007.jpg", "problem": "What is present?", "solution": "granuloma"},  # matched
        {"image": "images/train_0007.jpg", "problem": "Is it benign?", "solution": "yes"},         # unmatched
        {"image": "images/train_0007.jpg", "problem": "What is present ?", "solution": "granuloma"},  # duplicate
    ]))
    (raw / "pathvqa" / "test.json").write_text(json.dumps([
        {"image": "images/test_0001.jpg", "problem": "What stain?", "solution": "h&e"}]))    # unreadable image
    r_rad(data / "Medthink" / "R-RAD")
    r_slake(data / "Medthink" / "R-SLAKE")
    write_medthink(data / "Medthink" / "R-PathVQA", {
        "open-end/trainset.json": [mt("What is present?", ["granuloma"], 0, "Epithelioid cells.", image="train_0007.jpg")]})
    return data


def test_paper_data_folder_one_command(tmp_path, capsys):
    data = paper_data_dir(tmp_path)
    out = tmp_path / "out"
    assert main(["prepare", "--source", "mrpo_paper", "--root", str(data), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    rad, slake, path = (report["datasets"][k] for k in ("vqa_rad", "slake", "pathvqa"))
    assert rad["written"] == {"train": 3, "test": 1} and counts(rad) == {"missing_image": 1}
    assert medthink_counts(rad) == (7, 3, 0, 1, 1, 1)
    assert slake["written"] == {"train": 2, "test": 1} and counts(slake) == {}
    assert medthink_counts(slake) == (3, 3, 0, 0, 0, 0)
    assert path["written"] == {"train": 2, "test": 0}
    assert counts(path) == {"unreadable_image": 1, "duplicate": 1}
    assert medthink_counts(path) == (1, 1, 1, 0, 0, 0)
    assert report["written"] == {"train": 7, "test": 2} and report["notes"] == []
    merged = read_jsonl(out / "train.jsonl")
    assert len(merged) == 7 and {r["dataset"] for r in merged} == {"vqa_rad", "slake", "pathvqa"}
    assert sum(bool(r["gold_reasoning"]) for r in merged) == 2 + 2 + 1
    assert "all data sets: written train 7, test 2" in printed and "matched 3" in printed

    # the Data_RAW folder itself works too (Medthink found beside it), and a missing MedThink set is named
    (data / "Medthink" / "R-PathVQA" / "open-end" / "trainset.json").unlink()
    (data / "Medthink" / "R-PathVQA" / "open-end").rmdir()
    (data / "Medthink" / "R-PathVQA").rmdir()
    again = prepare_paper(data / "Data_RAW", tmp_path / "out2")
    assert again["written"] == {"train": 7, "test": 2} and again["datasets"]["pathvqa"]["medthink"] is None
    assert again["notes"] == [f"pathvqa: no MedThink folder R-PathVQA (looked in {data / 'Medthink'}): "
                              "no rationales attached"]


# ----------------------------------------------------------------------------- VQA-Med 2019

def test_vqa_med_2019_release(tmp_path):
    train = tmp_path / "ImageClef-2019-VQA-Med-Training"
    test = tmp_path / "VQAMed2019Test"
    make_image(train / "Train_images" / "synpic1.jpg", (1, 2, 3))
    make_image(train / "Train_images" / "synpic5.jpg", (9, 9, 90))
    make_image(test / "VQAMed2019_Test_Images" / "synpic5.jpg", (9, 9, 90))   # same image, test's folder
    (train / "All_QA_Pairs_train.txt").write_text("synpic1|what modality is shown?|ct\n"
                                                  "synpic5|what plane is this?|axial\n")
    (train / "train_ImageIDs.txt").write_text("synpic1\nsynpic5\n")
    (test / "VQAMed2019_Test_ImageIDs.txt").write_text("synpic5\n")
    (test / "VQAMed2019_Test_Questions.txt").write_text("synpic5|what plane is this?\n")
    (test / "VQAMed2019_Test_Questions_w_Ref_Answers.txt").write_text("synpic5|plane|what plane is this?|axial\n")
    (tmp_path / "readme.txt").write_text("VQA-Med 2019 data.\nSee the task page.\n")
    report = prepare("vqa_med", tmp_path, tmp_path / "out")
    assert report["read"]["total"] == 3                 # the three QA lines; the other files are not rows
    assert report["written"] == {"train": 1, "test": 1}
    assert counts(report) == {"test_leak": 1} and report["filtered"] == {}
    assert report["problems"]["test_leak"]["examples"] == [
        "ImageClef-2019-VQA-Med-Training/All_QA_Pairs_train.txt:2: same image and question as test row "
        "VQAMed2019Test/VQAMed2019_Test_Questions_w_Ref_Answers.txt:1"]
    assert report["skipped_files"] == [
        "ImageClef-2019-VQA-Med-Training/train_ImageIDs.txt: skipped, image-id list (not a QA file)",
        "VQAMed2019Test/VQAMed2019_Test_ImageIDs.txt: skipped, image-id list (not a QA file)",
        "VQAMed2019Test/VQAMed2019_Test_Questions.txt: skipped, questions without answers (not a QA file)",
        "readme.txt: skipped, no '|'-separated fields (not a QA file)"]


# ----------------------------------------------------------------------------- --columns

def test_columns_matching_nothing_fails_naming_the_columns(tmp_path, capsys):
    make_image(tmp_path / "d" / "a.png", (1, 1, 1))
    (tmp_path / "d" / "train.jsonl").write_text(json.dumps({"img": "a.png", "q": "Q?", "a": "yes"}) + "\n")
    out = tmp_path / "out"
    assert main(["prepare", "--source", "generic", "--root", str(tmp_path / "d"), "--out", str(out),
                 "--columns", "image=picture,question=q,answer=a"]) == 2
    err = capsys.readouterr().err
    assert "matches no column" in err and "the row has: img, q, a" in err
    assert not (out / "train.jsonl").exists()
    assert main(["prepare", "--source", "generic", "--root", str(tmp_path / "d"), "--out", str(out),
                 "--columns", "image=img,question=q,answer=a"]) == 0


# ----------------------------------------------------------------------------- training-time image safety

def broken_stream_png(path: Path) -> Path:
    """A PNG whose chunks and CRCs are valid but whose IDAT holds a corrupt zlib stream."""
    good = png_bytes((120, 30, 60), size=(16, 16))
    start = good.index(b"IDAT") - 4
    length = struct.unpack(">I", good[start:start + 4])[0]
    data = bytes([0x78, 0x9C]) + bytes((i * 37 + 11) % 256 for i in range(length - 2))
    chunk = struct.pack(">I", len(data)) + b"IDAT" + data + struct.pack(">I", zlib.crc32(b"IDAT" + data))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(good[:start] + chunk + good[start + 12 + length:])
    return path


def test_broken_pixel_stream_skipped_at_load(tmp_path):
    bad = broken_stream_png(tmp_path / "img" / "broken_stream.png")
    with Image.open(bad) as im:
        im.verify()                                     # passes a header/CRC check ...
    with pytest.raises(OSError):
        load_image(bad)                                 # ... but cannot be decoded
    make_image(tmp_path / "img" / "ok.png", (5, 5, 5))
    rows = [{"id": "ok", "image": "img/ok.png", "problem": "Q?", "solution": "yes"},
            {"id": "vqa_rad-train-0000broken", "image": "img/broken_stream.png", "problem": "Q?", "solution": "no"}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, report = load_records(path)
    assert [r["id"] for r in records] == ["ok"]
    assert (report.total, report.kept, report.skipped, dict(report.reasons)) == (2, 1, 1, {"bad_image": 1})
    line, rid, msg = report.examples[0]
    assert (line, rid) == (2, "vqa_rad-train-0000broken") and "broken_stream.png" in msg
    assert "line 2 (vqa_rad-train-0000broken)" in str(report)
    with pytest.raises(ValueError, match=r"train\.jsonl:2: row 'vqa_rad-train-0000broken'.*broken_stream\.png"):
        load_records(path, strict=True)


def test_undecodable_embedded_bytes_are_unreadable_not_missing(tmp_path):
    """A plain binary image column (not the Image struct) holds embedded bytes, never a file name."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    table = pa.table({"image": pa.array([png_bytes((1, 2, 3)), b"\xff\xd8\xff\xe0 truncated jpeg"], pa.binary()),
                      "question": ["Q1?", "Q2?"], "answer": ["yes", "no"]})
    (tmp_path / "hf" / "data").mkdir(parents=True)
    pq.write_table(table, tmp_path / "hf" / "data" / "test-00000-of-00001.parquet")
    report = prepare("hf", tmp_path / "hf", tmp_path / "out")
    assert report["written"] == {"train": 0, "test": 1} and counts(report) == {"unreadable_image": 1}
    assert report["problems"]["unreadable_image"]["examples"][0].startswith(
        "data/test-00000-of-00001.parquet:2: sha1:")


def test_paper_data_folder_joined_files_load(tmp_path):
    """Downscaled copies live in OUT/<set>/images/: the joined OUT/train.jsonl still points at them."""
    data = paper_data_dir(tmp_path)
    report = prepare_paper(data, tmp_path / "out", max_pixels=20)
    assert report["written"] == {"train": 7, "test": 2}
    records, load = load_records(tmp_path / "out" / "train.jsonl")
    assert (load.total, load.kept) == (7, 7)
    assert all(Path(r["image"]).parent.parent.parent == (tmp_path / "out").resolve() for r in records)
    assert load_image(records[0]["image"]).size[0] * load_image(records[0]["image"]).size[1] <= 20
