"""Synthetic medical VQA: rendered "scans" with questions, gold rationales and checkable facts.

Shaped like VQA-RAD / SLAKE / PathVQA: four modalities (CT, MRI, X-ray, histology), four organs
(brain, lung, liver, kidney) and 0-3 lesions that vary in count, size (small / large) and side
(left / right / both). The image alone determines every answer:
  - modality  -> intensity style (CT: grey body + bright spine, dark lesions; MRI: bright organ, very
                 bright lesions, smooth bias field; X-ray: blurred, ribs, bright opacities;
                 histology: pink H&E colours with purple nuclei and dark tumour nests);
  - organ     -> shape (brain oval with midline, two lung fields, tapered liver wedge, two kidney
                 beans), for histology a tissue texture (liver cords, kidney glomeruli, lung
                 alveoli, brain fibrils);
  - lesions   -> number of blobs, their radius (small ~4% / large ~8% of the width), and which half
                 of the image they lie in ("left" = left half of the image as displayed).
Questions cover modality, organ, presence, count, laterality and size, closed (yes/no) and open
(about half each). Every record has a 4-6 sentence gold rationale (modality -> location -> finding
-> conclusion) and `facts` for the rule judge (mrpo/judges/rule.py).

Deterministic by seed: sample i of a split depends only on (seed, split, i), so n_train does not
change the first samples. Files are written atomically (temp file + rename), the marker last, so
several processes may call `generate_synthetic` on the same folder at once.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

MODALITIES = ("ct", "mri", "x-ray", "histology")
ORGANS = ("brain", "lung", "liver", "kidney")
SIDES = ("left", "right", "both")
SIZES = ("small", "large")
QUESTION_TYPES = ("modality", "organ", "presence", "count", "laterality", "size")
NUMBER_WORDS = ("zero", "one", "two", "three")
MAX_LESIONS = 3
GENERATOR_VERSION = 2   # 2: closed count questions about zero lesions are phrased "free of lesions"

_MODALITY_NOUN = {"ct": "a CT scan", "mri": "an MRI scan", "x-ray": "an X-ray", "histology": "a histology slide"}
_MODALITY_SHORT = {"ct": "CT", "mri": "MRI", "x-ray": "X-ray", "histology": "histology"}
_ORGAN_PHRASE = {"brain": "the brain", "lung": "the lungs", "liver": "the liver", "kidney": "the kidneys"}
_LESION_RADIUS = {"small": 0.04, "large": 0.08}   # fraction of the image width
_RING = np.linspace(0, 2 * math.pi, 8, endpoint=False)   # a lesion's rim must lie inside the organ too


# ----------------------------------------------------------------------------- questions and text

def _sample_facts(rng: np.random.Generator) -> dict:
    """Ground truth of one example plus its question (type, closed/open, asked value, answer)."""
    qtype = QUESTION_TYPES[rng.integers(len(QUESTION_TYPES))]
    closed = qtype == "presence" or bool(rng.random() < 0.5)
    modality = MODALITIES[rng.integers(len(MODALITIES))]
    organ = ORGANS[rng.integers(len(ORGANS))]
    p_none = 0.5 if qtype == "presence" else 0.2
    if qtype in ("laterality", "size") or rng.random() >= p_none:
        count = int(rng.integers(1, MAX_LESIONS + 1))
    else:
        count = 0
    if count == 0:
        side = size = None
    else:
        side = SIDES[rng.integers(3 if count >= 2 else 2)]
        size = SIZES[rng.integers(2)] if count < 3 else "small"   # three large lesions do not fit
    facts = dict(modality=modality, organ=organ, lesion_count=count, side=side, size=size,
                 question_type=qtype, answer_type="closed" if closed else "open", asked=None)
    truth = {"modality": modality, "organ": organ, "presence": count > 0, "count": count,
             "laterality": side, "size": size}[qtype]
    if closed:
        choices = {"modality": MODALITIES, "organ": ORGANS, "presence": (True,),
                   "count": tuple(range(1, MAX_LESIONS + 1)), "laterality": SIDES, "size": SIZES}[qtype]
        if qtype == "presence" or rng.random() < 0.5:
            asked = truth if qtype != "presence" else True
        else:
            wrong = [c for c in choices if c != truth]
            asked = wrong[rng.integers(len(wrong))]
        facts["asked"] = asked
        facts["answer"] = "yes" if asked == truth else "no"
    else:
        facts["answer"] = str(truth) if qtype == "count" else truth
    return facts


def _question(facts: dict, rng: np.random.Generator) -> str:
    qtype, asked, organ = facts["question_type"], facts["asked"], facts["organ"]
    pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    if facts["answer_type"] == "open":
        return pick({
            "modality": ("What imaging modality was used for this image?", "What type of image is this?"),
            "organ": ("Which organ is shown in this image?", "What organ is visible?"),
            "count": ("How many lesions are there?", f"How many lesions are seen in {_ORGAN_PHRASE[organ]}?"),
            "laterality": ("On which side is the lesion located?", "Which side are the lesions on?"),
            "size": ("What is the size of the lesion?", "How large are the lesions?"),
        }[qtype])
    if qtype == "modality":
        return pick((f"Is this {_MODALITY_NOUN[asked]}?", f"Was this image taken with {_MODALITY_SHORT[asked]}?"))
    if qtype == "organ":
        return pick((f"Is the {asked} shown in this image?", f"Does this image show the {asked}?"))
    if qtype == "presence":
        return pick((f"Is there a lesion in {_ORGAN_PHRASE[organ]}?", "Is there any lesion in this image?"))
    if qtype == "count":
        if asked == 0:
            return "Is the image free of lesions?"
        return f"Are there {NUMBER_WORDS[asked]} lesions?" if asked > 1 else "Is there exactly one lesion?"
    if qtype == "laterality":
        return "Are there lesions on both sides?" if asked == "both" else f"Is the lesion on the {asked} side?"
    return f"Is the lesion {asked}?"  # size


def _rationale(facts: dict, rng: np.random.Generator) -> list[str]:
    """4-6 sentences: modality -> location -> finding (-> size) (-> extra) -> conclusion."""
    m, organ, n = facts["modality"], facts["organ"], facts["lesion_count"]
    steps = [f"The image is {_MODALITY_NOUN[m]}."]
    if m == "histology":
        steps.append(f"The slide shows {organ} tissue.")
    else:
        steps.append(f"The scan shows {_ORGAN_PHRASE[organ]}.")
    if n == 0:
        steps.append(f"There are no lesions in {_ORGAN_PHRASE[organ]}.")
    else:
        where = "on both sides" if facts["side"] == "both" else f"on the {facts['side']} side"
        noun = "lesion" if n == 1 else "lesions"
        verb = "is" if n == 1 else "are"
        steps.append(f"There {verb} {NUMBER_WORDS[n]} {noun} {where}.")
        steps.append(f"The {noun} {verb} {facts['size']}.")
    if rng.random() < 0.5:
        steps.append(f"The rest of the {organ} appears normal." if n else f"The {organ} appears normal.")
    steps.append(f"Therefore the answer is {facts['answer']}.")
    return steps


def _sample_text(rng: np.random.Generator) -> tuple[dict, str, list[str]]:
    facts = _sample_facts(rng)
    return facts, _question(facts, rng), _rationale(facts, rng)


# ----------------------------------------------------------------------------- rendering

def _grid(res: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(res) + 0.5) / res
    return np.meshgrid(c, c)  # u (x, left -> right), v (y, top -> bottom), both in [0, 1]


def _ellipse(u, v, cu, cv, ru, rv) -> np.ndarray:
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0


def _organ_mask(organ: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if organ == "brain":
        return _ellipse(u, v, 0.5, 0.5, 0.36, 0.42)
    if organ == "lung":
        return _ellipse(u, v, 0.31, 0.5, 0.15, 0.32) | _ellipse(u, v, 0.69, 0.5, 0.15, 0.32)
    if organ == "liver":  # thick on the left, tapering to the right
        return ((u - 0.47) / 0.38) ** 2 + ((v - 0.5) / (0.30 - 0.16 * u)) ** 2 <= 1.0
    if organ == "kidney":  # two beans with a medial notch (hilum)
        beans = _ellipse(u, v, 0.3, 0.52, 0.13, 0.24) | _ellipse(u, v, 0.7, 0.52, 0.13, 0.24)
        hilum = _ellipse(u, v, 0.43, 0.52, 0.05, 0.07) | _ellipse(u, v, 0.57, 0.52, 0.05, 0.07)
        return beans & ~hilum
    raise ValueError(f"unknown organ {organ!r}")


def _place_lesions(facts: dict, region: np.ndarray, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """Lesion (u, v, radius) inside `region` on the right side(s), not overlapping; [] when none fit."""
    n = facts["lesion_count"]
    if n == 0:
        return []
    res = region.shape[0]
    r = _LESION_RADIUS[facts["size"]]
    sides = [facts["side"]] * n if facts["side"] != "both" else ["left", "right"] + [
        ("left", "right")[rng.integers(2)] for _ in range(n - 2)]
    inside = lambda u, v: region[min(int(v * res), res - 1), min(int(u * res), res - 1)]  # noqa: E731
    for _ in range(50):
        out = []
        for s in sides:
            for _ in range(200):
                u = rng.uniform(r + 0.02, 0.5 - r - 0.02) if s == "left" else rng.uniform(0.5 + r + 0.02, 1 - r - 0.02)
                v = rng.uniform(r + 0.02, 1 - r - 0.02)
                ring = [(u + 0.8 * r * math.cos(a), v + 0.8 * r * math.sin(a)) for a in _RING]
                if not (inside(u, v) and all(inside(x, y) for x, y in ring)):
                    continue
                if all(math.hypot(u - a, v - b) > r + rr + 0.06 for a, b, rr in out):
                    out.append((u, v, r))
                    break
            else:
                break
        if len(out) == n:
            return out
    return []


def _lesion_map(lesions, u, v, res: int) -> np.ndarray:
    """Soft disks (1 inside, smooth edge over ~1 pixel), max-combined."""
    m = np.zeros_like(u)
    for cu, cv, r in lesions:
        d = np.sqrt((u - cu) ** 2 + (v - cv) ** 2)
        m = np.maximum(m, np.clip((r - d) * res + 0.5, 0.0, 1.0))
    return m


def _histology_texture(organ: str, u, v, rng) -> np.ndarray:
    """Organ-specific tissue pattern in [0, 1] (1 = stroma/cords, 0 = lumen)."""
    phase = rng.uniform(0, 2 * math.pi)
    if organ == "liver":      # parallel hepatocyte cords
        return 0.5 + 0.5 * np.sin(2 * math.pi * 9 * (u + v) + phase)
    if organ == "kidney":     # round glomeruli on a grid
        f = 5
        du, dv = (u * f + phase) % 1 - 0.5, (v * f) % 1 - 0.5
        d = np.sqrt(du ** 2 + dv ** 2)
        return np.where(d < 0.22, 1.0, np.where(d < 0.3, 0.0, 0.6))
    if organ == "lung":       # large alveolar spaces
        f = 4
        du, dv = (u * f + phase) % 1 - 0.5, (v * f + phase) % 1 - 0.5
        return np.clip((np.sqrt(du ** 2 + dv ** 2) - 0.36) * 12, 0.0, 1.0)
    if organ == "brain":      # fine fibrils
        return 0.55 + 0.2 * np.sin(2 * math.pi * 23 * u + 3 * np.sin(2 * math.pi * 3 * v) + phase)
    raise ValueError(f"unknown organ {organ!r}")


def render_image(facts: dict, size: int, rng: np.random.Generator) -> Image.Image | None:
    """Render the scan described by `facts` as a size x size RGB image; None if the lesions do not fit."""
    res = 2 * size
    u, v = _grid(res)
    organ = _organ_mask(facts["organ"], u, v)
    m = facts["modality"]
    if m == "histology":
        region = (u > 0.06) & (u < 0.94) & (v > 0.06) & (v < 0.94)
    else:
        region = organ
    # every random field is drawn before the lesions, so the same rng state renders the same scene
    # with and without lesions (tests rely on this to find the lesions in the pixels)
    noise = rng.standard_normal(u.shape)
    if m == "histology":
        tex = _histology_texture(facts["organ"], u, v, rng)
        nuclei = (rng.random(u.shape) < 0.04).astype(float)
    lesions = _place_lesions(facts, region, rng)
    if facts["lesion_count"] and not lesions:
        return None
    les = _lesion_map(lesions, u, v, res)

    if m == "histology":
        eosin = np.array([0.93, 0.72, 0.82])
        stroma = np.array([0.85, 0.45, 0.65])
        nucleus = np.array([0.35, 0.2, 0.55])
        tumour = np.array([0.28, 0.1, 0.38])
        img = eosin * (1 - tex[..., None]) + stroma * tex[..., None]
        img = img * (1 - nuclei[..., None]) + nucleus * nuclei[..., None]
        img = img * (1 - les[..., None]) + tumour * les[..., None]
        img = img + 0.03 * noise[..., None]
    else:
        body = _ellipse(u, v, 0.5, 0.5, 0.47, 0.47)
        if m == "ct":
            g = 0.32 * body + 0.25 * organ - 0.42 * les * organ
            g = g + 0.6 * _ellipse(u, v, 0.5, 0.88, 0.05, 0.04)          # vertebra
            g = g + 0.03 * noise
        elif m == "mri":
            bias = 0.8 + 0.4 * u
            g = (0.2 * body + 0.5 * organ + 0.35 * les) * bias
            g = g + 0.05 * np.abs(noise)
        else:  # x-ray: ribs, dark lung fields or soft-tissue organs, bright opacities
            ribs = (np.sin(2 * math.pi * 7 * v + 6 * (u - 0.5) ** 2) > 0.75) & body
            g = 0.15 + 0.3 * body + 0.35 * ribs - 0.18 * organ + 0.55 * les
            g = g + 0.02 * noise
        img = np.repeat(np.clip(g, 0, 1)[..., None], 3, axis=-1)
    pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB")
    if m == "x-ray":
        pil = pil.filter(ImageFilter.GaussianBlur(radius=1.2))
    elif m == "mri":
        pil = pil.filter(ImageFilter.GaussianBlur(radius=0.6))
    return pil.resize((size, size), Image.Resampling.BOX)


# ----------------------------------------------------------------------------- public API

def make_example(seed: int, split: str, index: int, image_size: int = 56) -> tuple[dict, Image.Image]:
    """One example (record without the image path, and its image), a pure function of its arguments."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    while True:
        facts, problem, steps = _sample_text(rng)
        image = render_image(facts, image_size, rng)
        if image is not None:
            break
    record = {
        "id": f"synthetic-{split}-{index:05d}",
        "problem": problem,
        "solution": facts["answer"],
        "gold_reasoning": " ".join(steps),
        "dataset": "synthetic",
        "split": split,
        "answer_type": facts["answer_type"],
        "facts": facts,
    }
    return record, image


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def generate_synthetic(out_dir: str | Path, n_train: int = 256, n_test: int = 64, seed: int = 0,
                       image_size: int = 56) -> tuple[Path, Path]:
    """Write out_dir/{train,test}.jsonl and out_dir/images/*.png; returns (train_path, test_path).

    An existing generation with the same parameters (marker out_dir/.synthetic.json) is reused.
    Image paths in the JSONL are relative to out_dir.
    """
    if n_train < 0 or n_test < 0 or image_size < 16:
        raise ValueError(f"generate_synthetic: need n_train, n_test >= 0 and image_size >= 16, got "
                         f"{n_train}, {n_test}, {image_size}")
    out_dir = Path(out_dir)
    train_path, test_path = out_dir / "train.jsonl", out_dir / "test.jsonl"
    marker = out_dir / ".synthetic.json"
    params = dict(version=GENERATOR_VERSION, n_train=n_train, n_test=n_test, seed=seed, image_size=image_size)
    try:
        if json.loads(marker.read_text()) == params and train_path.exists() and test_path.exists():
            return train_path, test_path
    except (OSError, ValueError):
        pass
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for split, n, path in (("train", n_train, train_path), ("test", n_test, test_path)):
        lines = []
        for i in range(n):
            record, image = make_example(seed, split, i, image_size)
            rel = f"images/{split}_{i:05d}.png"
            _write_atomic(out_dir / rel, lambda p: image.save(p, format="PNG"))
            lines.append(json.dumps({"id": record["id"], "image": rel,
                                     **{k: v for k, v in record.items() if k != "id"}}))
        _write_atomic(path, lambda p: Path(p).write_text("\n".join(lines) + ("\n" if lines else "")))
    _write_atomic(marker, lambda p: Path(p).write_text(json.dumps(params)))
    return train_path, test_path


def synthetic_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Texts for tokenizer training: questions, the paper's instruction, rationales in <think> and
    <thinking> tags, and <answer> blocks (no images rendered; deterministic by seed)."""
    rng = np.random.default_rng([seed, 2])
    texts = [
        "Think step-by-step and enclose your reasoning in <think>...</think> tags. "
        "Then provide your answer in <answer>...</answer> tags.",
        "Think step-by-step and enclose your reasoning in <thinking>...</thinking> tags. "
        "Then provide your answer in <answer>...</answer> tags.",
    ]
    for i in range(n):
        facts, problem, steps = _sample_text(rng)
        tag = "thinking" if i % 2 else "think"
        texts.append(problem)
        texts.append(f"<{tag}>{' '.join(steps)}</{tag}>\n<answer>{facts['answer']}</answer>")
    return texts
