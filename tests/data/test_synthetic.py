"""Synthetic medical VQA: determinism, reuse, record format, rationale/facts consistency, and that the
pixels carry the answer (lesions found in the image match count, side and size)."""
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mrpo.data.records import load_records
from mrpo.data.synthetic import (MODALITIES, NUMBER_WORDS, ORGANS, QUESTION_TYPES, _sample_facts,
                                 generate_synthetic, make_example, render_image, synthetic_corpus)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return out, generate_synthetic(out, n_train=96, n_test=24, seed=3, image_size=56)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_files_and_record_format(generated):
    out, (train, test) = generated
    assert train == out / "train.jsonl" and test == out / "test.jsonl"
    rows = _rows(train)
    assert len(rows) == 96 and len(_rows(test)) == 24
    ids = [r["id"] for r in rows + _rows(test)]
    assert len(set(ids)) == len(ids)
    for r in rows:
        assert set(r) >= {"id", "image", "problem", "solution", "gold_reasoning", "dataset", "split",
                          "answer_type", "facts"}
        assert r["split"] == "train" and r["dataset"] == "synthetic"
        assert not r["image"].startswith("/")               # relative to the JSONL folder
        with Image.open(out / r["image"]) as im:
            assert im.size == (56, 56) and im.mode == "RGB"
        assert r["solution"] == r["facts"]["answer"] and r["answer_type"] == r["facts"]["answer_type"]
    records, report = load_records(train)
    assert report.kept == 96 and report.skipped == 0



def test_deterministic_and_prefix_stable(tmp_path, generated):
    out, (train, _) = generated
    again = generate_synthetic(tmp_path / "b", n_train=96, n_test=24, seed=3, image_size=56)
    assert again[0].read_text() == train.read_text()
    for r in _rows(train)[:10]:
        assert (tmp_path / "b" / r["image"]).read_bytes() == (out / r["image"]).read_bytes()
    # fewer samples: the same first samples
    small = generate_synthetic(tmp_path / "c", n_train=10, n_test=2, seed=3, image_size=56)
    assert _rows(small[0]) == _rows(train)[:10]
    other = generate_synthetic(tmp_path / "d", n_train=10, n_test=2, seed=4, image_size=56)
    assert _rows(other[0]) != _rows(small[0])


def test_reuse_and_regenerate(tmp_path):
    train, _ = generate_synthetic(tmp_path, n_train=4, n_test=2, seed=0)
    mtime = train.stat().st_mtime_ns
    assert generate_synthetic(tmp_path, n_train=4, n_test=2, seed=0)[0].stat().st_mtime_ns == mtime
    train2, _ = generate_synthetic(tmp_path, n_train=6, n_test=2, seed=0)   # other params: regenerated
    assert len(_rows(train2)) == 6


def _expected_answer(f):
    truth = {"modality": f["modality"], "organ": f["organ"], "presence": f["lesion_count"] > 0,
             "count": f["lesion_count"], "laterality": f["side"], "size": f["size"]}[f["question_type"]]
    if f["answer_type"] == "closed":
        return "yes" if f["asked"] == truth else "no"
    return str(truth)


def test_rationale_and_facts_consistent():
    qtypes, closed, answers = Counter(), 0, Counter()
    n = 600
    for i in range(n):
        rec, _ = make_example(0, "train", i, image_size=16)
        f = rec["facts"]
        qtypes[f["question_type"]] += 1
        closed += f["answer_type"] == "closed"
        answers[rec["solution"]] += 1
        assert rec["solution"] == _expected_answer(f)
        sentences = re.findall(r"[^.]+\.", rec["gold_reasoning"])
        assert 4 <= len(sentences) <= 6, rec["gold_reasoning"]
        assert f["modality"].split("-")[0] in sentences[0].lower()          # modality first
        assert f["organ"] in sentences[1].lower()                           # then location
        assert sentences[-1].strip() == f"Therefore the answer is {rec['solution']}."
        if f["lesion_count"]:
            assert NUMBER_WORDS[f["lesion_count"]] in sentences[2]
            assert f["size"] in sentences[3] and f["side"] in sentences[2]
            assert f["side"] in ("left", "right") or f["lesion_count"] >= 2
        else:
            assert "no lesions" in sentences[2] and f["side"] is None and f["size"] is None
    assert set(qtypes) == set(QUESTION_TYPES) and min(qtypes.values()) > n / 12
    assert 0.4 < closed / n < 0.65                                          # about half closed
    assert 0.3 < (answers["yes"] + answers["no"]) / n < 0.7
    assert abs(answers["yes"] - answers["no"]) < 0.25 * (answers["yes"] + answers["no"])


def _components(mask):
    """4-connected components of a boolean image: list of (area, mean column)."""
    seen = np.zeros_like(mask)
    comps = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        stack, pix = [(y, x)], []
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            pix.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        comps.append((len(pix), float(np.mean([p[1] for p in pix]))))
    return comps


@pytest.mark.parametrize("modality", MODALITIES)
def test_pixels_determine_lesion_count_side_size(modality):
    """Render each scene with and without its lesions from the same rng state: the difference holds
    exactly `lesion_count` blobs, on the stated side(s), with areas that separate small from large."""
    size = 56
    areas = {"small": [], "large": []}
    seen_counts = set()
    for i in range(40):
        rng = np.random.default_rng([7, i])
        facts = _sample_facts(rng)
        facts["modality"] = modality
        if facts["lesion_count"] == 0:
            continue
        state = rng.bit_generator.state
        with_lesions = render_image(facts, size, rng)
        if with_lesions is None:
            continue
        rng.bit_generator.state = state
        without = render_image(dict(facts, lesion_count=0, side=None, size=None), size, rng)
        diff = np.abs(np.asarray(with_lesions, float) - np.asarray(without, float)).max(-1)
        comps = [c for c in _components(diff > 20) if c[0] >= 3]
        assert len(comps) == facts["lesion_count"], (i, facts, comps)
        sides = {"left" if col < size / 2 else "right" for _, col in comps}
        assert sides == ({"left", "right"} if facts["side"] == "both" else {facts["side"]})
        areas[facts["size"]] += [a for a, _ in comps]
        seen_counts.add(facts["lesion_count"])
    assert seen_counts == {1, 2, 3}
    assert max(areas["small"]) < min(areas["large"])


def test_modality_and_organ_visible():
    """Histology is coloured, radiology grey; organs differ in shape (mean masks far apart)."""
    means = {}
    for i in range(80):
        rec, im = make_example(1, "train", i, image_size=32)
        a = np.asarray(im, float)
        chroma = np.abs(a[..., 0] - a[..., 1]).mean()
        assert (chroma > 20) == (rec["facts"]["modality"] == "histology")
        if rec["facts"]["modality"] == "ct":
            means.setdefault(rec["facts"]["organ"], []).append(a.mean(-1))
    centroids = {k: np.mean(v, 0) for k, v in means.items()}
    assert set(centroids) == set(ORGANS)
    for k, v in means.items():  # nearest organ centroid classifies every CT image correctly
        for img in v:
            assert min(centroids, key=lambda o: np.abs(centroids[o] - img).mean()) == k


def test_corpus():
    corpus = synthetic_corpus(50, seed=1)
    assert corpus == synthetic_corpus(50, seed=1)
    assert len(corpus) == 102
    joined = "\n".join(corpus)
    for tag in ("<think>", "</think>", "<thinking>", "</thinking>", "<answer>", "</answer>"):
        assert tag in joined
    assert "Think step-by-step" in corpus[0]


def test_closed_count_questions_match_their_answer():
    """A closed count question's phrasing and its yes/no answer agree with the lesion count."""
    from mrpo.data.synthetic import make_example

    seen = 0
    for i in range(400):
        rec = make_example(0, "train", i, 56)[0]
        f = rec["facts"]
        if f["question_type"] != "count" or f["answer_type"] != "closed":
            continue
        seen += 1
        q = rec["problem"]
        if "exactly one" in q:
            assert rec["solution"] == ("yes" if f["lesion_count"] == 1 else "no"), rec
        elif "free of lesions" in q:
            assert rec["solution"] == ("yes" if f["lesion_count"] == 0 else "no"), rec
    assert seen > 10
