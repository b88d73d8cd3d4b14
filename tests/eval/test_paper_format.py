"""The MRPO paper's inference output (dmis-lab/MRPO inference.py: a JSON list of {problem, image,
solution, text, think, answer}) through `python -m mrpo.eval answers` and `reasoning`, with the
paper's gold file (medthink_test.json), dedup and gold-overlap filtering; figures worked out by hand."""
from __future__ import annotations

import json

import pytest

from mrpo.eval.__main__ import main
from mrpo.eval.answers import rule_correct, to_words
from mrpo.eval.reasoning import paper_filter, sentence_scores
from mrpo.rewards.steps import split_steps

RAW = "/data/Data_RAW"
THINK = {
    1: "The scan shows the liver. The lesion is in the left lobe.",
    3: "I count three round lesions.",
    4: "Many cells are seen. The count is one million.",
    5: "The stain is pink. It is PAS.",
}


def paper_rows() -> list[dict]:
    def row(image, problem, solution, think, answer):
        tag = f"<think>{think}</think>" if think else ""
        return {"problem": problem, "image": f"{RAW}/{image}", "solution": solution,
                "text": f"{tag}<answer>{answer}</answer>" if answer is not None else tag,
                "think": think or None, "answer": answer}
    return [
        row("vqa-rad/images/synpic1.jpg", "Where is the lesion?", "left lobe", THINK[1], "Left lobe"),      # 1 ok
        row("vqa-rad/images/synpic1.jpg", "Where is the lesion?", "left lobe", "Other text.", "right lobe"),  # 2 dup
        row("slake/images/xmlab1/source.jpg", "How many lesions are there?", "3", THINK[3], "three"),       # 3 ok
        row("pathvqa/images/train_0007.jpg", "How many cells are counted?", "1000000", THINK[4], "one million"),  # 4
        row("pathvqa/images/train_0007.jpg", "What stain?", "h&e", THINK[5], "PAS"),                       # 5 wrong
        row("vqa-rad/images/synpic3.jpg", "What organ?", "brain", "It is the head.", None),                  # 6 no gold
    ]


GOLD = [  # the paper's medthink_test.json: flattened image names
    {"image_path": "synpic1.jpg", "question": "Where is the  lesion?", "answer": "Left lobe", "solution": "Gold one."},
    {"image_path": "xmlab1_source.jpg", "question": "how many lesions are there?", "answer": "3",
     "solution": "Gold two."},
    {"image_path": "train_0007.jpg", "question": "How many cells are counted?", "answer": "1000000",
     "solution": "Gold three."},
    {"image_path": "train_0007.jpg", "question": "What stain?", "answer": "h&e", "solution": "Gold four."},
]

# precomputed step labels (the labels judge): id -> (alignment, contribution)
LABELS = {1: ([1, 1], [0, 1]), 3: ([1], [1]), 4: ([0, 1], [1, 1]), 5: ([1, 0], [0, 0])}


def test_to_words_and_rule_match():
    assert to_words("21") == "twenty-one" and to_words(" 3 ") == "three" and to_words("2.5") == "2.5"
    assert to_words("left lobe") == "left lobe" and to_words(None) == "None"
    # an integer only num2words spells as the gold's words: wrong without the paper's normalisation
    assert rule_correct({"answer": "one million", "solution": "1000000"})
    assert not rule_correct({"answer": "one thousand and one", "solution": "1000"})


def test_answers_cli_reads_paper_output(tmp_path, capsys):
    pred = tmp_path / "test_open_ended_model-ckpt_test.json"
    pred.write_text(json.dumps(paper_rows()))
    assert main(["answers", "--pred", str(pred), "--out-dir", str(tmp_path / "eval")]) == 0
    s = json.loads((tmp_path / "eval" / "answers.json").read_text())
    assert (s["overall"]["n"], s["overall"]["rule_correct"]) == (6, 3)   # rows 1, 3, 4 right; 2, 5, 6 wrong
    by = s["by_dataset"]
    assert (by["vqa_rad"]["n"], by["vqa_rad"]["rule_correct"]) == (3, 1)
    assert (by["slake"]["n"], by["slake"]["rule_correct"]) == (1, 1)
    assert (by["pathvqa"]["n"], by["pathvqa"]["rule_correct"]) == (2, 1)
    assert "pathvqa" in capsys.readouterr().out


def test_reasoning_cli_paper_protocol(tmp_path, capsys):
    name = "test_open_ended_model-ckpt_test.json"
    pred = tmp_path / name
    pred.write_text(json.dumps(paper_rows()))
    gold = tmp_path / "medthink_test.json"
    gold.write_text(json.dumps(GOLD))
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"id": f"{name}:{i}", "steps": [st.text for st in split_steps(THINK[i])],
                                          "alignment": a, "contribution": c}) + "\n"
                              for i, (a, c) in LABELS.items()))
    out = tmp_path / "eval"
    assert main(["reasoning", "--pred", str(pred), "--gold", str(gold), "--dedup", "--gold-only", "--judge-all",
                 "--judge", "labels", "--labels-path", str(labels), "--cache-dir", str(tmp_path / "cache"),
                 "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    s = json.loads((out / "reasoning.json").read_text())
    assert s["input"] == {"input": 6, "after_dedup": 5, "after_gold_overlap": 4, "with_gold": 4}
    assert s["sent_to_judge"] == 4 and s["unjudged"] == 0
    sl = s["sentence_level"]
    assert (sl["records"], sl["sentences"]) == (4, 7)
    assert sl["mean_alignment"] == pytest.approx(5 / 7)
    assert sl["mean_contribution"] == pytest.approx(4 / 7)
    assert sl["mean_score"] == pytest.approx(6 / 7)
    assert (s["n_correct"], s["n_wrong"]) == (3, 1)       # row 5 wrong: steps valid [T, F] -> FFP 1/2, mid
    assert s["stage_counts"] == {"early": 0, "mid": 1, "late": 0} and s["far"]["undefined"] == 1
    steps = [json.loads(x) for x in (out / "reasoning_steps.jsonl").read_text().splitlines()]
    assert [r["id"] for r in steps] == [f"{name}:{i}" for i in (1, 3, 4, 5)]
    assert "records: 6 read, 5 after dedup, 4 after gold overlap, 4 with a gold rationale" in printed
    assert "mean alignment 0.7143, mean contribution 0.5714, mean score 0.8571" in printed


def test_paper_filter_and_sentence_scores_units():
    recs = [{"image": "a/xmlab2/source.jpg", "problem": "Q ?", "solution": "Yes"},
            {"image": "xmlab2_source.jpg", "problem": "q ?", "solution": "yes"},          # same key: dedup
            {"image": "b.jpg", "problem": "Q", "solution": "x", "gold_reasoning": "Own."}]
    gold = {("xmlab2/source", "q ?", "yes"): "G."}
    kept, c = paper_filter(recs, gold, dedup=True, gold_only=False)
    assert [r.get("gold_reasoning") for r in kept] == ["G.", "Own."]
    assert c == {"input": 3, "after_dedup": 2, "after_gold_overlap": 2, "with_gold": 2}
    kept, c = paper_filter(recs, gold, gold_only=True)
    assert len(kept) == 2 and c["after_gold_overlap"] == 2 and c["after_dedup"] == 3
    with pytest.raises(ValueError, match="needs a gold"):
        paper_filter(recs, None, gold_only=True)
    assert sentence_scores([{"alignment": None, "contribution": None}]) == {
        "records": 0, "sentences": 0, "mean_alignment": None, "mean_contribution": None, "mean_score": None}


def test_bad_paper_file_names_the_item(tmp_path):
    pred = tmp_path / "p.json"
    pred.write_text(json.dumps([{"image": "a.jpg", "problem": "Q"}]))
    with pytest.raises(SystemExit, match=r"p\.json: item 1: missing key\(s\) \['solution'\]"):
        main(["answers", "--pred", str(pred)])


def test_reasoning_cli_rescores_mrpo_predictions_with_words(tmp_path):
    """mrpo.infer's stored `correct` is replaced by the rule match with integers spelled out."""
    pred = tmp_path / "predictions.jsonl"
    rec = {"id": "a", "dataset": "d", "answer_type": "open", "problem": "How many?", "solution": "1000000",
           "gold_reasoning": "", "image": None, "answer": "one million", "steps": ["Count them."], "correct": False}
    pred.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "id": "b", "answer": "ten"}) + "\n")
    assert main(["reasoning", "--pred", str(pred), "--judge", "rule"]) == 0
    s = json.loads((tmp_path / "reasoning.json").read_text())
    assert (s["n_correct"], s["n_wrong"]) == (1, 1)
