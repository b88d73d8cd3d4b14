"""The exported folder (Backbone.save, the trainer's final_model/) carries what transformers' own processor
of the family needs: tokenizer + chat template, image processor, and processor_config.json (processor
class, nested image/video processor configs, InternVL's image_seq_length).

With torchvision installed, AutoProcessor loads it and tokenises prompts with 1 and 3 images exactly
like Backbone.encode_prompts. Without torchvision (this CPU machine) transformers cannot build any of the
three families' video processors, so AutoProcessor stops at the video processor with transformers'
ImportError naming it, after the image processor and tokenizer loaded; both load on their own."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util

import pytest
import torch

from mrpo.data.synthetic import make_example
from mrpo.models.load import load_backbone
from mrpo.models.tiny import build_tiny

EXPECTED = {"qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
            "qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
            "internvl3": ("InternVLProcessor", "InternVLVideoProcessor")}
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def as_json(d: dict) -> dict:
    return json.loads(json.dumps(d))


@pytest.fixture(scope="module", params=list(EXPECTED))
def exported(request, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export")
    bb = load_backbone(build_tiny(request.param, root / "src", seed=0))
    return bb, bb.save(root / "final_model")


def test_processor_config_and_parts_load(exported):
    from transformers import AutoImageProcessor, AutoTokenizer

    bb, out = exported
    proc_cls, video_cls = EXPECTED[bb.family]
    cfg = json.loads((out / "processor_config.json").read_text())
    assert cfg["processor_class"] == proc_cls and cfg["video_processor"]["video_processor_type"] == video_cls
    assert cfg["image_processor"] == as_json(bb.image_processor.to_dict())
    if bb.family == "internvl3":
        assert cfg["image_seq_length"] == bb.model.config.image_seq_length == 4   # not the class default 256
    else:
        assert cfg["video_processor"]["patch_size"] == bb.image_processor.patch_size
    image = AutoImageProcessor.from_pretrained(out)
    assert type(image) is type(bb.image_processor) and as_json(image.to_dict()) == cfg["image_processor"]
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == bb.tokenizer.chat_template and len(tok) == len(bb.tokenizer)


def test_auto_processor(exported):
    from transformers import AutoProcessor

    bb, out = exported
    proc_cls, video_cls = EXPECTED[bb.family]
    if not HAS_TORCHVISION:
        with pytest.raises(ImportError, match=f"{video_cls} requires the Torchvision library"):
            AutoProcessor.from_pretrained(out)
        return
    proc = AutoProcessor.from_pretrained(out)
    assert type(proc).__name__ == proc_cls
    ims = [make_example(0, "train", i, image_size=56)[1] for i in range(3)]
    for n in (1, 3):
        mine = bb.encode_prompts(["Compare."], [ims[:n]])
        theirs = proc(text=[bb.chat_prompt("Compare.", n)], images=ims[:n], return_tensors="pt",
                      padding_side="left", add_special_tokens=False)
        assert torch.equal(mine["input_ids"], theirs["input_ids"])
        assert torch.allclose(mine["pixel_values"], theirs["pixel_values"].to(mine["pixel_values"].dtype))
