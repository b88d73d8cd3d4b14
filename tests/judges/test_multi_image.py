"""Judges with 0, 1 or several images per record: every image goes to the HTTP judge (in order), the
cache key covers each image, a text-only request is plain text, and the eval answer judge sends them all."""
import base64

import pytest

from mrpo.judges.base import JudgeRequest
from mrpo.judges.cache import JudgeCache
from mrpo.judges.http import HTTPJudge
from mrpo.judges.prompt import build_messages

from .test_http import FakeServer, _cfg, api_key  # noqa: F401  (api_key: autouse fixture)


def _req(image, sid="s0"):
    return JudgeRequest(sample_id=sid, problem="Did it grow?", image=image, gold_answer="yes",
                        gold_reasoning="The prior is smaller.", steps=["A good step.", "A bad step."])


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, ext in enumerate(("png", "jpg", "png")):
        p = tmp_path / f"im{i}.{ext}"
        p.write_bytes(f"image-{i}".encode())
        paths.append(str(p))
    return paths


def _decoded(content):
    return [base64.b64decode(part["image_url"]["url"].split(",", 1)[1]) for part in content
            if part["type"] == "image_url"]


def test_messages_carry_every_image_in_order(images):
    assert _req(None).image_paths == [] and _req([]).image_paths == [] and _req(images[0]).image_paths == images[:1]
    content = build_messages(_req(images), with_image=True)[1]["content"]
    assert [part["type"] for part in content] == ["image_url"] * 3 + ["text"]
    assert _decoded(content) == [b"image-0", b"image-1", b"image-2"]
    assert content[1]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    one = build_messages(_req(images[0]), with_image=True)[1]["content"]
    assert _decoded(one) == [b"image-0"] and one[-1]["type"] == "text"
    assert isinstance(build_messages(_req([]), with_image=True)[1]["content"], str)     # text-only record
    assert isinstance(build_messages(_req(images), with_image=False)[1]["content"], str)


def test_http_judge_sends_all_images(images, tmp_path):
    server = FakeServer()
    try:
        judge = HTTPJudge(_cfg(server, tmp_path))
        out = judge.judge([_req(images, "multi"), _req([], "text"), _req(images[2], "single")])
        assert all(v is not None and v.alignment == [1, 0] for v in out)
        by_images = sorted(_decoded(b["messages"][1]["content"]) if not isinstance(b["messages"][1]["content"], str)
                           else [] for b in server.bodies)
        assert by_images == [[], [b"image-0", b"image-1", b"image-2"], [b"image-2"]]
    finally:
        server.close()


def test_cache_key_covers_each_image(images, tmp_path):
    cache = JudgeCache(tmp_path / "cache")
    k3 = cache.key("m", _req(images))
    assert cache.key("m", _req(images[::-1])) != k3                        # order matters
    assert cache.key("m", _req(images[:2])) != k3
    assert cache.key("m", _req([images[0]])) == cache.key("m", _req(images[0]))   # [path] == path
    assert cache.key("m", _req([])) == cache.key("m", _req(None))
    with open(images[2], "wb") as f:
        f.write(b"changed")
    assert cache.key("m", _req(images)) != k3                               # the third image's bytes count
    with pytest.raises(FileNotFoundError, match="sample 's0'.*nope.png"):
        cache.key("m", _req([images[0], str(tmp_path / "nope.png")]))


def test_answer_judge_sends_every_image(images):
    from types import SimpleNamespace

    from mrpo.eval.answers import AnswerJudge

    judge = AnswerJudge(SimpleNamespace(kind="http", model="m", base_url="http://127.0.0.1:9/v1",
                                        api_key_env="MRPO_TEST_JUDGE_KEY", max_concurrency=1, timeout_s=1.0,
                                        max_retries=0, backoff_s=0.0, temperature=0.0, cache_dir=None))
    rec = {"problem": "Did it grow?", "solution": "yes", "answer": "yes", "image": images}
    assert _decoded(judge._messages(rec)[1]["content"]) == [b"image-0", b"image-1", b"image-2"]
    assert isinstance(judge._messages({**rec, "image": []})[1]["content"], str)


def test_local_judge_prompt_and_images(tmp_path):
    """LocalJudge with a VLM processor (needs torchvision, so a recording stand-in here): one image
    placeholder per image in the chat messages, and all images of the batch, row-major, to the processor."""
    from PIL import Image

    from mrpo.judges.local import LocalJudge

    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"p{i}.png"))
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(paths[-1])

    class Stop(Exception):
        pass

    class Recorder:
        chat_template = "x"

        def __init__(self):
            self.messages, self.images = [], None

        def apply_chat_template(self, messages, **kw):
            self.messages.append(messages)
            return "prompt"

        def __call__(self, text, images, **kw):
            self.images = images
            raise Stop

    judge = LocalJudge.__new__(LocalJudge)
    judge.processor, judge.with_image, judge.cfg = Recorder(), True, None
    with pytest.raises(Stop):
        judge._generate([_req(paths, "a"), _req([], "b"), _req(paths[1], "c")], sample=False)
    kinds = [[part["type"] for part in m[1]["content"]] if isinstance(m[1]["content"], list) else "text"
             for m in judge.processor.messages]
    assert kinds == [["image", "image", "image", "text"], "text", ["image", "text"]]
    assert [im.getpixel((0, 0))[0] for im in judge.processor.images] == [0, 50, 100, 50]
