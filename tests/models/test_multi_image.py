"""Zero, one or several images per record on the tiny backbones (Qwen2.5-VL, Qwen3-VL, InternVL3):
placeholders and image tokens per image, generate, teacher-forced log-probs against generate's own
logits, row independence in mixed batches, select_rows; the prompt template; record loading."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image

from mrpo.data.records import load_record_images, load_records
from mrpo.data.synthetic import make_example
from mrpo.models.backbone import DEFAULT_PROMPT_TEMPLATE, Backbone, format_prompt, load_prompt_template
from mrpo.models.load import load_backbone
from mrpo.models.tiny import FAMILIES, build_tiny

Q = "Compare the two scans: is the lesion larger?"


@pytest.fixture(scope="module", params=FAMILIES)
def bb(request, tmp_path_factory) -> Backbone:
    return load_backbone(build_tiny(request.param, tmp_path_factory.mktemp("tiny") / request.param, seed=0))


@pytest.fixture(scope="module")
def three():
    a = make_example(0, "train", 0, image_size=56)[1]
    b = make_example(0, "train", 1, image_size=56)[1].resize((112, 56))
    c = make_example(0, "train", 2, image_size=56)[1]
    return [a, b, c]


def image_tokens_per_image(bb, ims):
    """Image tokens the model expects for each image alone (one-image prompts)."""
    return [int((bb.encode_prompts(["q"], [[im]])["input_ids"] == bb.image_token_id).sum()) for im in ims]


def teacher_forced(bb, batch, comps):
    hidden, targets, cu = bb.completion_hidden_states(batch, comps)
    lp = torch.log_softmax(hidden.float() @ bb.lm_head_weight.float().T, -1)
    return [lp[cu[i]:cu[i + 1]] for i in range(len(comps))]


def test_zero_one_three_images(bb, three):
    rows = [[], three[:1], three]
    batch = bb.encode_prompts([Q, Q, Q], rows)
    ids = batch["input_ids"]
    per_image = image_tokens_per_image(bb, three)
    assert (ids == bb.image_token_id).sum(-1).tolist() == [0, per_image[0], sum(per_image)]
    for i, ims in enumerate(rows):
        assert bb.chat_prompt(Q, len(ims)).count(bb.image_token) == len(ims)
    if bb.is_qwen:
        assert batch["image_grid_thw"].shape == (4, 3)                      # one row per image, row-major
        assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(-1).sum())
        assert torch.equal(batch["mm_token_type_ids"], (ids == bb.image_token_id).int())
    else:                                                                   # tiles: 1, then 1 + 3 + 1
        assert batch["pixel_values"].shape[0] == (per_image[0] + sum(per_image)) // bb.model.config.image_seq_length
    comps = bb.generate(batch, max_new_tokens=6, do_sample=False)
    gen = bb.model.generate(**batch, max_new_tokens=6, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, pad_token_id=bb.pad_token_id,
                            eos_token_id=bb.eos_token_ids, suppress_tokens=bb.suppress_token_ids)
    ref = torch.log_softmax(torch.stack(gen.logits, 1).float(), -1)
    mine = teacher_forced(bb, batch, comps)
    for i, c in enumerate(comps):
        assert (mine[i] - ref[i, : len(c)]).abs().max() < 1e-4
    # each row alone gives the same log-probs: images land in their own row
    for i, ims in enumerate(rows):
        alone = teacher_forced(bb, bb.encode_prompts([Q], [ims]), [comps[i]])[0]
        assert torch.allclose(alone, mine[i], atol=2e-5, rtol=0), (i, (alone - mine[i]).abs().max())


def test_images_change_the_output(bb, three):
    """The test above would pass if images were ignored; they are not: swapping the order of the
    three images changes the log-probs (the model sees which image comes first)."""
    comp = bb.generate(bb.encode_prompts([Q], [three]), max_new_tokens=6, do_sample=False)
    a = teacher_forced(bb, bb.encode_prompts([Q], [three]), comp)[0]
    b = teacher_forced(bb, bb.encode_prompts([Q], [three[::-1]]), comp)[0]
    assert (a - b).abs().max() > 1e-4


def test_select_rows_mixed_image_counts(bb, three):
    qs = [Q, "Size?", "Which side?", "Is it normal?"]
    ims = [three, [], three[:1], three[1:]]
    batch = bb.encode_prompts(qs, ims)
    for rows in ([1], [1, 1], [0, 2], [3, 1, 0], [2, 2, 3, 3]):
        got = bb.select_rows(batch, rows)
        ref = bb.encode_prompts([qs[r] for r in rows], [ims[r] for r in rows])
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), rows


def test_placeholder_count_mismatch(bb, three):
    with pytest.raises(ValueError, match="2 image placeholders .* for 1 images"):
        bb._expand_images([bb.chat_prompt(Q, 2)], [three[:1]])


def test_prompt_template(bb, three, tmp_path):
    tag = bb.reasoning_tag
    default = bb.chat_prompt(Q, 1)
    assert (f"{Q} Think step-by-step and enclose your reasoning in <{tag}>...</{tag}> tags. "
            f"Then provide your answer in <answer>...</answer> tags.") in default
    custom = "Frage: {question}\nDenke in <{reasoning_tag}>, antworte in <{answer_tag}>. {{JSON}}"
    text = bb.chat_prompt(Q, 1, custom)
    assert f"Frage: {Q}\nDenke in <{tag}>, antworte in <answer>. {{JSON}}" in text
    assert "Think step-by-step" not in text
    f = tmp_path / "prompt.txt"
    f.write_text(custom + "\n")
    assert bb.chat_prompt(Q, 1, str(f)) == text                              # a file works like the string
    decoded = bb.tokenizer.decode(bb.encode_prompts([Q], [three[:1]], prompt_template=custom)["input_ids"][0])
    assert f"Frage: {Q}" in decoded and "Think step-by-step" not in decoded


def test_prompt_template_errors(tmp_path):
    assert load_prompt_template(None) == DEFAULT_PROMPT_TEMPLATE
    with pytest.raises(ValueError, match=r"unknown fields \['answer'\]"):
        load_prompt_template("{question} in <{answer}>")
    with pytest.raises(FileNotFoundError, match="no {question} field and is not a file"):
        load_prompt_template("Answer the question.")
    f = tmp_path / "bad.txt"
    f.write_text("Answer: {reasoning_tag}")
    with pytest.raises(ValueError, match=r"bad\.txt: no \{question\} field"):
        load_prompt_template(str(f))
    with pytest.raises(ValueError, match="not a valid format string"):
        load_prompt_template("{question} {")
    assert format_prompt(None, "Q?", "thinking").startswith("Q? Think step-by-step")


def test_config_prompt_template(tmp_path):
    from mrpo.config import ConfigError, load_config

    cfg = load_config(overrides=["data.prompt_template={question} Answer in <{answer_tag}> tags."])
    assert cfg.data.prompt_template == "{question} Answer in <{answer_tag}> tags."
    assert load_config().data.prompt_template is None
    with pytest.raises(ConfigError, match="data.prompt_template.*unknown fields"):
        load_config(overrides=["data.prompt_template={question} {tag}"])


def test_records_with_image_lists(tmp_path):
    for name, color in (("a.png", 10), ("b.png", 200)):
        Image.new("RGB", (30, 20), (color, 0, 0)).save(tmp_path / name)
    base = {"problem": "Changed?", "solution": "yes"}
    rows = [{**base, "id": "one", "image": "a.png"},
            {**base, "id": "two", "image": ["a.png", "b.png"]},
            {**base, "id": "text", "image": []},
            {**base, "id": "gone", "image": ["a.png", "missing.png"]},
            {**base, "id": "num", "image": [1]}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, report = load_records(tmp_path / "d.jsonl")
    assert [r["id"] for r in records] == ["one", "two", "text"]
    assert records[0]["image"] == str(tmp_path / "a.png")
    assert records[1]["image"] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert records[2]["image"] == []
    assert report.reasons == {"bad_image": 1, "bad_type": 1}
    assert "key 'image'[1]" in report.examples[0][2] and "missing.png" in report.examples[0][2]
    ims = load_record_images(records[1], max_pixels=300)
    assert [im.getpixel((0, 0))[0] for im in ims] == [10, 200] and all(im.size[0] * im.size[1] <= 300 for im in ims)
    assert load_record_images(records[2]) == [] and len(load_record_images(records[0])) == 1
    with pytest.raises(OSError, match="record 'gone'.*missing.png"):
        load_record_images({"id": "gone", "image": [str(tmp_path / "missing.png")]})


def test_inference_cli_multi_image_and_template(tmp_path, capsys):
    """python -m mrpo.infer on records with 0, 1 and 3 images and a template file: each prediction keeps
    its image list, and the same records through run_inference give the same greedy text."""
    from mrpo.infer import main, run_inference

    model = build_tiny("qwen3_vl", tmp_path / "model", seed=0)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"im{i}.png"))
        make_example(0, "train", i, image_size=56)[1].save(paths[-1])
    rows = [{"id": "none", "problem": "Is 2 > 1?", "solution": "yes", "image": []},
            {"id": "one", "problem": Q, "solution": "no", "image": paths[0]},
            {"id": "three", "problem": Q, "solution": "yes", "image": paths},
            {"id": "broken", "problem": Q, "solution": "yes", "image": [paths[0], str(tmp_path / "nope.png")]}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    template = tmp_path / "t.txt"
    template.write_text("Q: {question} Reason in <{reasoning_tag}> tags, answer in <{answer_tag}> tags.\n")
    out = tmp_path / "pred.jsonl"
    assert main(["--model", str(model), "--data", str(data), "--out", str(out), "--batch-size", "4",
                 "--max-new-tokens", "5", "--no-progress", "--device", "cpu",
                 "--prompt-template", str(template)]) == 0
    preds = [json.loads(x) for x in out.read_text().splitlines()]
    assert [p["id"] for p in preds] == ["none", "one", "three"]
    assert [p["image"] for p in preds] == [[], paths[0], paths]
    bb = load_backbone(model)
    recs, _ = load_records(data)
    assert [r["id"] for r in recs] == ["none", "one", "three"]              # load-time check drops "broken"
    out2 = tmp_path / "pred2.jsonl"
    assert run_inference(bb, recs, out2, batch_size=1, max_new_tokens=5, progress=False,
                         prompt_template=str(template)) == 3
    assert [json.loads(x)["text"] for x in out2.read_text().splitlines()] == [p["text"] for p in preds]
    err = capsys.readouterr().err
    assert "record 'broken'" not in err                                       # skipped by load_records
    bad = run_inference(bb, [{**rows[3], "image": [paths[0], str(tmp_path / "nope.png")]}], tmp_path / "p3.jsonl",
                        progress=False)
    assert bad == 0 and "record 'broken': cannot read image" in capsys.readouterr().err
