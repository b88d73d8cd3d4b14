"""Readers of published medical VQA formats, on small fixture copies built in tmp dirs."""
from __future__ import annotations

import csv
import io
import json
import pickle
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
from PIL import Image

from mrpo.data.readers import READERS, DataError, read_medthink
from mrpo.data.readers.common import (as_text, load_table, normalize_split, normalize_text, parse_columns,
                                      short_image_key, split_from_path)


def make_image(path: Path, size=(8, 6), color=(200, 30, 30), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def image_bytes(size=(8, 6), color=(0, 90, 200), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def by_question(rows):
    return {r.question: r for r in rows}


# ----------------------------------------------------------------------------- helpers

def test_text_helpers():
    assert normalize_text("  Is the LIVER enlarged? ") == "is the liver enlarged"
    assert normalize_text("X-ray,  chest.") == "x ray chest"
    assert as_text(4) == "4" and as_text(3.0) == "3" and as_text(None) == "" and as_text(float("nan")) == ""
    assert as_text(["left lung", "", "heart"]) == "left lung, heart"
    assert as_text("  two\n lines ") == "two lines"
    assert short_image_key("VQA_RAD Image Folder/synpic54610.jpg") == "synpic54610"
    assert short_image_key("xmlab102/source.jpg") == "xmlab102/source"
    assert short_image_key("train_0422") == "train_0422"
    assert short_image_key("sha1:abc") == "sha1:abc"
    assert [normalize_split(s) for s in ("Train", "validate", "dev", "test_para", "other")] == \
        ["train", "val", "val", "test", None]
    root = Path("/d")
    assert split_from_path(Path("/d/All_QA_Pairs_val.txt"), root) == "val"
    assert split_from_path(Path("/d/VQAMed2019_Test_Questions_w_Ref_Answers.txt"), root) == "test"
    assert split_from_path(Path("/d/train/data-00000-of-00001.arrow"), root) == "train"
    assert split_from_path(Path("/d/data/validation-00000-of-00001.parquet"), root) == "val"
    assert split_from_path(Path("/d/rad.json"), root) is None


def test_parse_columns():
    assert parse_columns("image=img, question=q,answer=a") == {"image": "img", "question": "q", "answer": "a"}
    with pytest.raises(DataError, match="field=column"):
        parse_columns("image")
    with pytest.raises(DataError, match="unknown column field 'picture'"):
        parse_columns("picture=img")


def test_load_table_reports_bad_rows(tmp_path):
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"question": "q1"}\n\n{not json\n{"question": "q3"}\n')
    rows = list(load_table(jl))
    assert [label for label, _ in rows] == ["1", "3", "4"]
    assert isinstance(rows[1][1], DataError) and "not valid JSON" in str(rows[1][1])
    c = tmp_path / "a.csv"
    c.write_text("image,question,answer\na.png,q,yes\nb.png,q2,no,EXTRA\nc.png,q3\n")
    rows = list(load_table(c))
    assert rows[0][1] == {"image": "a.png", "question": "q", "answer": "yes"}
    assert "beyond the header" in str(rows[1][1]) and "fewer cells" in str(rows[2][1])
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(DataError, match="bad.json: cannot parse"):
        list(load_table(bad))


# ----------------------------------------------------------------------------- VQA-RAD

def test_vqa_rad_osf_release(tmp_path):
    make_image(tmp_path / "VQA_RAD Image Folder" / "synpic1.jpg")
    make_image(tmp_path / "VQA_RAD Image Folder" / "synpic2.jpg")
    data = [
        {"qid": 1, "image_name": "synpic1.jpg", "question": "Is there a mass?", "answer": "Yes",
         "answer_type": "CLOSED", "phrase_type": "freeform", "image_organ": "HEAD"},
        {"qid": 2, "image_name": "synpic1.jpg", "question": "How many lesions?", "answer": 4,
         "answer_type": "OPEN", "phrase_type": "test_freeform"},
        {"qid": 3, "image_name": "synpic2.jpg", "question": "Which organ?", "answer": "liver",
         "answer_type": "OPEN", "phrase_type": "test_para"},
        {"qid": 4, "image_name": "synpic9.jpg", "question": "Missing?", "answer": "no", "phrase_type": "para"},
        {"qid": 5, "image_name": "synpic2.jpg", "answer": "no", "phrase_type": "frame"},
    ]
    (tmp_path / "VQA_RAD Dataset Public.json").write_text(json.dumps(data))
    rows = list(READERS["vqa_rad"](tmp_path))
    assert len(rows) == 5
    q = by_question(rows)
    assert q["Is there a mass?"].split == "train" and q["Is there a mass?"].answer == "Yes"
    assert q["How many lesions?"].split == "test" and q["How many lesions?"].answer == "4"
    assert q["Which organ?"].split == "test"
    assert q["Which organ?"].image_path == tmp_path / "VQA_RAD Image Folder" / "synpic2.jpg"
    assert q["Missing?"].image_path is None and q["Missing?"].image_key == "synpic9.jpg"
    assert rows[4].error and rows[4].row == "5 (qid 5)" and rows[4].file == "VQA_RAD Dataset Public.json"


def test_vqa_rad_mevf_copy(tmp_path):
    make_image(tmp_path / "images" / "synpic1.jpg")
    rec = {"qid": 1, "image_name": "synpic1.jpg", "question": "Q?", "answer": "yes", "phrase_type": "freeform"}
    (tmp_path / "trainset.json").write_text(json.dumps([rec]))
    (tmp_path / "testset.json").write_text(json.dumps([dict(rec, question="T?", phrase_type="freeform")]))
    rows = by_question(READERS["vqa_rad"](tmp_path))
    assert rows["Q?"].split == "train" and rows["T?"].split == "test"  # split from the file name
    assert rows["T?"].image_path == tmp_path / "images" / "synpic1.jpg"


def test_vqa_rad_without_files_fails_clearly(tmp_path):
    with pytest.raises(DataError, match="VQA_RAD Dataset Public.json"):
        list(READERS["vqa_rad"](tmp_path))


# ----------------------------------------------------------------------------- SLAKE

def test_slake_english_subset(tmp_path):
    base = tmp_path / "Slake1.0"
    make_image(base / "imgs" / "xmlab0" / "source.jpg")
    make_image(base / "imgs" / "xmlab1" / "source.jpg")
    row = {"img_id": 0, "img_name": "xmlab0/source.jpg", "question": "What modality?", "answer": "MRI",
           "q_lang": "en", "answer_type": "OPEN", "qid": 10}
    (base / "train.json").write_text(json.dumps([row, dict(row, question="什么模态？", q_lang="zh", qid=11)]))
    (base / "validate.json").write_text(json.dumps([dict(row, img_name="xmlab1/source.jpg", question="V?")]))
    (base / "test.json").write_text(json.dumps([dict(row, img_name="xmlab7/source.jpg", question="T?"),
                                                {"qid": 99, "question": "no image"}]))
    rows = list(READERS["slake"](tmp_path))
    assert len(rows) == 5
    q = by_question(rows)
    assert q["What modality?"].image_path == base / "imgs" / "xmlab0" / "source.jpg"
    assert q["What modality?"].image_key == "xmlab0/source.jpg" and q["What modality?"].row == "1 (qid 10)"
    assert q["什么模态？"].skip == "non-English question (q_lang=zh)"
    assert q["V?"].split == "val" and q["V?"].file == "validate.json"
    assert q["T?"].split == "test" and q["T?"].image_path is None
    assert rows[-1].error and rows[-1].file == "test.json"


# ----------------------------------------------------------------------------- PathVQA

def test_pathvqa_pickles(tmp_path):
    make_image(tmp_path / "images" / "train" / "train_0001.jpg")
    make_image(tmp_path / "images" / "test" / "test_0001.jpg")
    for split, recs in {
        "train": [{"image": "train_0001", "question": "Is this necrosis?", "answer": "yes"}, ["not", "a dict"]],
        "test": [{"image": "test_0001", "question": "What is shown?", "answer": "granuloma"},
                 {"image": "test_0404", "question": "Gone?", "answer": "no"}],
    }.items():
        p = tmp_path / "qas" / split / f"{split}_qa.pkl"
        p.parent.mkdir(parents=True)
        p.write_bytes(pickle.dumps(recs))
    rows = list(READERS["pathvqa"](tmp_path))
    q = by_question(rows)
    assert q["Is this necrosis?"].image_path == tmp_path / "images" / "train" / "train_0001.jpg"
    assert q["Is this necrosis?"].split == "train" and q["What is shown?"].split == "test"
    assert q["Gone?"].image_path is None
    bad = [r for r in rows if r.error]
    assert len(bad) == 1 and bad[0].where == "qas/train/train_qa.pkl:2"


def test_pathvqa_lxmert_pickles_and_safe_unpickling(tmp_path):
    make_image(tmp_path / "images" / "val" / "val_0001.jpg")
    recs = [{"img_id": "val_0001", "sent": "What stains?", "label": {"eosin": 0.3, "hematoxylin": 1.0},
             "question_id": 7}]
    (tmp_path / "qas").mkdir()
    (tmp_path / "qas" / "val_vqa.pkl").write_bytes(pickle.dumps(recs))
    (row,) = READERS["pathvqa"](tmp_path)
    assert (row.question, row.answer, row.split) == ("What stains?", "hematoxylin", "val")
    (tmp_path / "qas" / "val_vqa.pkl").write_bytes(pickle.dumps(OrderedDict(a=1)))
    with pytest.raises(DataError, match="refusing to unpickle"):
        list(READERS["pathvqa"](tmp_path))


# ----------------------------------------------------------------------------- PMC-VQA

def test_pmc_vqa_csv(tmp_path):
    make_image(tmp_path / "images" / "PMC1_F1.jpg")
    header = ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]
    rows = [
        ["PMC1_F1.jpg", "Where is the lesion?", "Left hemithorax", "A:Left hemithorax ", "B:Right hemithorax",
         " C:Both", "D:None", "A"],
        ["PMC1_F1.jpg", "Which stain?", "", "A:H&E", "B:PAS", "C:Trichrome", "D:Gram", "B"],
        ["PMC1_F1.jpg", "Bad label?", "x", "A:x", "B:y", "", "", "D"],
    ]
    with open(tmp_path / "test_2.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    with open(tmp_path / "train_2.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, ["PMC9.jpg", "Q?", "a", "A:a", "B:b", "C:c", "D:d", "A"]])
    out = list(READERS["pmc_vqa"](tmp_path))
    train = [r for r in out if r.split == "train"]
    assert len(train) == 1 and train[0].image_path is None
    first, second, third = [r for r in out if r.split == "test"]
    assert first.question == ("Where is the lesion?\nA: Left hemithorax\nB: Right hemithorax\nC: Both\nD: None")
    assert first.answer == "Left hemithorax" and first.image_path == tmp_path / "images" / "PMC1_F1.jpg"
    assert second.answer == "PAS"  # empty Answer -> text of the labelled choice
    assert third.error == "Answer_label 'D' names no non-empty choice" and third.where == "test_2.csv:3"


# ----------------------------------------------------------------------------- VQA-Med

def test_vqa_med_txt(tmp_path):
    train = tmp_path / "ImageClef-2019-VQA-Med-Training"
    make_image(train / "Train_images" / "synpic1.jpg", color=(1, 2, 3))
    make_image(tmp_path / "ImageClef-2019-VQA-Med-Validation" / "Val_images" / "synpic1.jpg", color=(9, 9, 9))
    make_image(tmp_path / "VQAMed2019Test" / "VQAMed2019_Test_Images" / "synpic5.jpg")
    (train / "All_QA_Pairs_train.txt").write_text("synpic1|what modality is shown?|ct\nsynpic1|broken line\n"
                                                  "synpic1|a|b|c|d\n")
    (train / "QAPairsByCategory").mkdir()
    (train / "QAPairsByCategory" / "C1_Modality_train.txt").write_text("synpic1|what modality is shown?|ct\n")
    val = tmp_path / "ImageClef-2019-VQA-Med-Validation" / "All_QA_Pairs_val.txt"
    val.write_text("synpic1|is this an mri?|no\n")
    test = tmp_path / "VQAMed2019Test" / "VQAMed2019_Test_Questions_w_Ref_Answers.txt"
    test.write_text("synpic5|modality|what kind of image is this?|us - ultrasound\n\n")
    rows = list(READERS["vqa_med"](tmp_path))
    assert len(rows) == 5  # the category copy is not read
    q = by_question(rows)
    assert q["what modality is shown?"].image_path == train / "Train_images" / "synpic1.jpg"
    assert q["is this an mri?"].split == "val"
    assert q["is this an mri?"].image_path.parent.name == "Val_images"  # same stem, split's folder wins
    kind = q["what kind of image is this?"]
    assert kind.answer == "us - ultrasound" and kind.split == "test"
    assert q["broken line"].skip == "question without reference answer"
    assert [r.where for r in rows if r.error] == ["ImageClef-2019-VQA-Med-Training/All_QA_Pairs_train.txt:3"]


# ----------------------------------------------------------------------------- generic and presets

def test_generic_json_jsonl_csv(tmp_path):
    make_image(tmp_path / "imgs" / "a.png")
    (tmp_path / "train.jsonl").write_text(
        json.dumps({"img": "imgs/a.png", "q": "Is it normal?", "a": "yes", "why": "Because."}) + "\n{oops\n")
    with open(tmp_path / "eval.csv", "w", newline="") as f:
        csv.writer(f).writerows([["img", "q", "a", "split"], ["a.png", "Where?", "left", "validation"],
                                 ["a.png", "Odd split?", "x", "holdout"]])
    rows = list(READERS["generic"](tmp_path, "image=img,question=q,answer=a,rationale=why"))
    q = by_question(rows)
    assert q["Is it normal?"].rationale == "Because." and q["Is it normal?"].split == "train"
    assert q["Is it normal?"].image_path == tmp_path / "imgs" / "a.png"
    assert q["Where?"].split == "val" and q["Where?"].image_path == tmp_path / "imgs" / "a.png"  # found by name
    errors = {r.where: r.error for r in rows if r.error}
    assert errors == {"train.jsonl:2": "not valid JSON (Expecting property name enclosed in double quotes)",
                      "eval.csv:2": "unknown split value 'holdout'"}
    missing = list(READERS["generic"](tmp_path / "train.jsonl"))  # default aliases do not know "q"
    assert missing[0].error == "no question column (looked for: question, problem, query, sent; the row has: img, q, a, why)"


def test_mimic_and_rad_presets(tmp_path):
    make_image(tmp_path / "files" / "p10" / "s1" / "abc.jpg")
    recs = [{"split": "test", "idx": 0, "image_path": "p10/s1/abc.jpg", "question": "List the findings.",
             "answer": ["atelectasis", "effusion"], "semantic_type": "query"},
            {"idx": 1, "image_path": "p10/s1/abc.jpg", "question": "Any?", "answer": []}]
    (tmp_path / "mimic.json").write_text(json.dumps(recs))
    rows = list(READERS["mimic_vqa"](tmp_path / "mimic.json", image_root=tmp_path / "files"))
    assert rows[0].answer == "atelectasis, effusion" and rows[0].image_path == tmp_path / "files/p10/s1/abc.jpg"
    assert rows[1].split == "test" and rows[1].answer == ""  # eval preset defaults to test
    (tmp_path / "rad_vqa_train.json").write_text(json.dumps([dict(recs[0], split=None)]))
    (row,) = READERS["rad_vqa"](tmp_path, files="rad_vqa_train.json", image_root=tmp_path / "files")
    assert row.split == "train"  # the file name wins over the preset's default


# ----------------------------------------------------------------------------- Hugging Face folders

def test_hf_parquet_and_arrow(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    png = image_bytes()
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": png, "path": None}, {"bytes": png, "path": "synpic3.jpg"},
                                         {"bytes": None, "path": None}], img_type),
                      "question": ["Is it normal?", "Which side?", "No image?"],
                      "answer": ["no", "left", "yes"]})
    (tmp_path / "hub" / "data").mkdir(parents=True)
    pq.write_table(table, tmp_path / "hub" / "data" / "test-00000-of-00001.parquet")
    rows = list(READERS["hf"](tmp_path / "hub"))
    assert [r.split for r in rows] == ["test"] * 3
    assert rows[0].image_bytes == png and rows[0].image_key.startswith("sha1:")
    assert rows[1].image_key == "synpic3.jpg" and rows[1].file == "data/test-00000-of-00001.parquet"
    assert rows[2].image_bytes is None and rows[2].image_key == ""

    # Dataset.save_to_disk layout: Arrow IPC stream per split folder (+ JSON metadata that is ignored)
    disk = tmp_path / "disk"
    for split in ("train", "validation"):
        (disk / split).mkdir(parents=True)
        (disk / split / "state.json").write_text("{}")
        with pa.OSFile(str(disk / split / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table.slice(0, 1))
    (disk / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    rows = list(READERS["vqa_rad"](disk))  # a VQA-RAD copy in HF layout goes through read_hf
    assert sorted(r.split for r in rows) == ["train", "val"] and all(r.image_bytes == png for r in rows)
    quilt = list(READERS["quilt_vqa"](disk))  # single evaluation split: forced to test
    assert [r.split for r in quilt] == ["test", "test"]


# ----------------------------------------------------------------------------- MedThink

def test_medthink_files(tmp_path):
    problems = {"101": {"image": "synpic1.jpg", "question": "Is there a mass?", "answer": "yes",
                        "solution": "The scan shows a mass. So yes."},
                "102": {"image": "synpic2.jpg", "question": "Q?", "answer": "no", "solution": ""},
                "103": {"image": "synpic2.jpg", "question": "Q2?", "solution": "No answer column."}}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    rows = list(read_medthink(tmp_path / "problems.json"))
    assert rows[0].rationale == "The scan shows a mass. So yes." and rows[0].row == "101"
    assert rows[1].error == "empty rationale" and rows[2].error.startswith("no answer column")
    (row,) = [r for r in read_medthink(tmp_path / "problems.json", key=("image", "question")) if r.row == "103"]
    assert row.error is None  # answer not needed when not in the key
    with open(tmp_path / "r.csv", "w", newline="") as f:
        csv.writer(f).writerows([["img", "q", "gt", "why"], ["a.png", "Q", "A", "Step one.\nStep two."]])
    (row,) = read_medthink(tmp_path / "r.csv", "image=img,question=q,answer=gt,rationale=why")
    assert (row.image_key, row.question, row.answer, row.rationale) == ("a.png", "Q", "A", "Step one.\nStep two.")


def test_hf_without_pyarrow_names_the_fix(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(DataError, match=r"needs pyarrow: pip install 'mrpo\[data\]'"):
        list(READERS["hf"](tmp_path))
