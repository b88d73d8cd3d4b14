"""Random-initialised, real-shaped backbones for the GPU benchmarks (no weights can be fetched there).

    python benchmarks/gpu_models.py OUT_DIR [--size 1.5b|tiny] [--dtype bfloat16]

`make_qwen2_5_vl_1b`: a real `Qwen2_5_VLConfig` with Qwen2.5-1.5B's language model (hidden 1536, 28 layers,
12 query / 2 key-value heads, MLP 8960, vocabulary 151936, untied lm_head) and an 8-block Qwen2.5-VL vision
tower (hidden 1280, MLP 3420, window attention, full attention in blocks 3 and 7): about 1.9B parameters.
size="tiny" builds the same code path at toy widths (same 151936 vocabulary) for a CPU rehearsal. The
tokenizer and image processor are the tiny offline ones (mrpo.models.tiny): its 500-odd tokens are ids
below the model's vocabulary, so prompts, chat template and image tokens work unchanged; a random model
samples almost only ids the tokenizer does not know (decoded as nothing), so completions run to
max_new_tokens, which is what a decode benchmark wants.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

SIZES = {
    # language model and vision tower shapes
    "1.5b": dict(hidden=1536, layers=28, heads=12, kv_heads=2, mlp=8960, v_hidden=1280, v_depth=8, v_heads=16,
                 v_mlp=3420, full_att=[3, 7]),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, v_hidden=32, v_depth=2, v_heads=2,
                 v_mlp=64, full_att=[1]),
}
VOCAB = 151936


def qwen2_5_vl_config(tok, size: str = "1.5b"):
    """A Qwen2_5_VLConfig of `size` (see SIZES) whose special-token ids are the tokenizer's."""
    from transformers import Qwen2_5_VLConfig

    s, ids = SIZES[size], tok.convert_tokens_to_ids
    pad, eos = ids("<|endoftext|>"), ids("<|im_end|>")
    head_dim = s["hidden"] // s["heads"]
    q = head_dim // 2   # M-RoPE sections (temporal, height, width) sum to head_dim / 2, as in Qwen's [16, 24, 24]
    section = [q // 4, (q - q // 4) // 2, q - q // 4 - (q - q // 4) // 2]
    text = dict(vocab_size=VOCAB, hidden_size=s["hidden"], intermediate_size=s["mlp"], num_hidden_layers=s["layers"],
                num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], max_position_embeddings=32768,
                rms_norm_eps=1e-6, pad_token_id=pad, eos_token_id=eos, bos_token_id=None, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section})
    vision = dict(depth=s["v_depth"], hidden_size=s["v_hidden"], intermediate_size=s["v_mlp"], num_heads=s["v_heads"],
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  out_hidden_size=s["hidden"], fullatt_block_indexes=s["full_att"])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                            video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                            vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)


def make_qwen2_5_vl_1b(out_dir: str | Path, size: str = "1.5b", dtype: torch.dtype = torch.bfloat16,
                       device: str | None = None, seed: int = 0) -> dict:
    """Write a random-initialised Qwen2.5-VL-shaped Hugging Face folder (model.family=qwen2_5_vl) to out_dir.

    device: where the weights are initialised (default cuda when available: seconds instead of minutes).
    Returns {"path", "params" (count), "weight_bytes" (all weights in `dtype`), "decode_weight_bytes"
    (what one decode step reads: language-model blocks, final norm, lm_head), "build_s" (seconds)}."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mrpo.data.synthetic import synthetic_corpus
    from mrpo.models.backbone import Backbone
    from mrpo.models.tiny import build_image_processor, build_tokenizer

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer("qwen2_5_vl", synthetic_corpus())
    config = qwen2_5_vl_config(tok, size)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    eos, pad = config.text_config.eos_token_id, config.text_config.pad_token_id
    model.generation_config.eos_token_id = [eos, pad]
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = None
    params = sum(p.numel() for p in model.parameters())
    # what one decode step reads: the language model's blocks and final norm, and the lm_head (the
    # embedding table is only gathered row by row; the vision tower does not run while decoding)
    lm = model.model.language_model
    decode_params = (sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel()
                     + model.lm_head.weight.numel())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    image_processor = build_image_processor("qwen2_5_vl")
    image_processor.save_pretrained(out)
    proc = Backbone(model=model, tokenizer=tok, image_processor=image_processor, family="qwen2_5_vl").processor_config()
    (out / "processor_config.json").write_text(json.dumps(proc, indent=2) + "\n")
    info = {"path": str(out), "size": size, "params": params,
            "weight_bytes": params * torch.finfo(dtype).bits // 8,
            "decode_weight_bytes": decode_params * torch.finfo(dtype).bits // 8, "build_s": round(time.perf_counter() - t0, 1)}
    (out / "gpu_model.json").write_text(json.dumps(info) + "\n")
    del model
    return info


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--size", choices=list(SIZES), default="1.5b")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = ap.parse_args(argv)
    info = make_qwen2_5_vl_1b(args.out_dir, args.size, getattr(torch, args.dtype))
    print(json.dumps(info))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
