"""Batched inference over a record file, writing one prediction per line (JSONL), resumable.

    python -m mrpo.infer --model PATH --data test.jsonl --out RUN/eval/predictions.jsonl \
        [--batch-size 8] [--max-new-tokens 512] [--temperature 0] [--family qwen2_5_vl] [--limit N]
        [--prompt-template TEMPLATE_OR_FILE] [--decode {loop,hf,eager,static,static_compiled}]
        [--adapter RUN/final_model/adapter]

--decode: as rollout.decode (mrpo/decoding.py): loop (default, our decode loop; falls back to generate
with a one-time message naming why where it cannot serve the model) or hf (transformers' generate).

--adapter: a LoRA adapter folder (peft: adapter_config.json + adapter_model.safetensors, as written by a
run with lora.rank > 0) applied to the base model given by --model and merged into its weights before
generation (no per-token adapter overhead).

Prediction record: id, dataset, answer_type, problem, solution (gold), gold_reasoning, image (as in the
input: a path, a list of paths or []), text (full
completion, special tokens kept so <think>/<answer> survive), reasoning (inside the reasoning tag),
answer (extracted from <answer>, None if absent), steps (list of sentence strings), correct (rule
match of answer and solution), num_tokens, and facts when the input record has them.

Resume: a rerun appends only the ids not yet in --out. A truncated last line (killed mid-write) is cut
off first; a corrupt line elsewhere is an error naming the file and line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence


def prediction_record(rec: dict, text: str, reasoning_tag: str = "think", num_tokens: int | None = None) -> dict:
    """Prediction record (see module docstring) for one input record and its completion text."""
    from mrpo.rewards.answer import answers_match, extract_answer
    from mrpo.rewards.steps import extract_reasoning, segment_steps

    found = extract_reasoning(text, reasoning_tag)
    answer = extract_answer(text)
    solution = str(rec.get("solution", ""))
    out = {
        "id": rec.get("id"), "dataset": rec.get("dataset"), "answer_type": rec.get("answer_type"),
        "problem": rec.get("problem"), "solution": solution, "gold_reasoning": rec.get("gold_reasoning", ""),
        "image": rec.get("image"), "text": text,
        "reasoning": found[0].strip() if found else "",
        "answer": answer,
        "steps": [s.text for s in segment_steps(text, reasoning_tag)],
        "correct": answer is not None and answers_match(answer, solution),
    }
    if num_tokens is not None:
        out["num_tokens"] = num_tokens
    if rec.get("facts") is not None:
        out["facts"] = rec["facts"]
    return out


def completed_ids(out_path: str | Path) -> set[str]:
    """Ids already written to out_path; cuts off a truncated last line in place (crash mid-write)."""
    path = Path(out_path)
    if not path.is_file():
        return set()
    data = path.read_bytes()
    lines = data.split(b"\n")
    ids, good_end, pos = set(), 0, 0
    for i, line in enumerate(lines):
        end = pos + len(line) + (1 if i < len(lines) - 1 else 0)
        if line.strip():
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or "id" not in row:
                    raise ValueError("not a prediction record (no 'id')")
            except ValueError as e:
                if i == len(lines) - 1 or all(not rest.strip() for rest in lines[i + 1:]):
                    break  # truncated last line: drop it below
                raise ValueError(f"{path}:{i + 1}: corrupt prediction line ({e}); fix or delete the file") from None
            ids.add(str(row["id"]))
        good_end, pos = end, end
    if good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    if good_end and not data[:good_end].endswith(b"\n"):
        with open(path, "ab") as f:  # last record complete but its newline was lost
            f.write(b"\n")
    return ids


def _decode(tokenizer, ids: Sequence[int], stop: set[int]) -> str:
    """Completion text with special tokens kept (tags may be special tokens), trailing EOS/pad dropped."""
    ids = list(ids)
    while ids and ids[-1] in stop:
        ids.pop()
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def run_inference(backbone, records: Sequence[dict], out_path: str | Path, batch_size: int = 8,
                  max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0,
                  max_prompt_length: int | None = None, max_pixels: int | None = None,
                  progress: bool = True, prompt_template: str | None = None, decode: str = "loop") -> int:
    """Generate for every record whose id is not yet in out_path and append predictions; returns
    the number of records written by this call.

    backbone: mrpo.models.backbone.Backbone (encode_prompts, generate, tokenizer, reasoning_tag,
        eos_token_ids, pad_token_id). records: input records (id, image path, problem, solution, ...).
    temperature 0 = greedy. decode: rollout.decode's paths (mrpo.decoding). max_pixels: image budget (None = the backbone's). prompt_template: as
    data.prompt_template (None = the paper's instruction). A record's "image" is a path, a list of
    paths or [] (text-only).
    Records whose image cannot be read or whose prompt exceeds max_prompt_length are skipped, counted
    and named on stderr (not written, so a rerun retries them).
    """
    from mrpo import decoding
    from mrpo.data.records import load_record_images
    from mrpo.models.backbone import PromptTooLongError

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = completed_ids(out_path)
    todo, seen = [], set(done)
    for r in records:
        rid = str(r["id"])
        if rid not in seen:
            seen.add(rid)
            todo.append(r)
    tag = getattr(backbone, "reasoning_tag", None) or "think"
    stop = set(getattr(backbone, "eos_token_ids", None) or [backbone.tokenizer.eos_token_id])
    stop |= {getattr(backbone, "pad_token_id", None)}
    written, bad = 0, []
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="infer", dynamic_ncols=True, file=sys.stderr)
    with open(out_path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            chunk, images = [], []
            for r in todo[start:start + batch_size]:
                try:
                    images.append(load_record_images(r, max_pixels))
                    chunk.append(r)
                except (OSError, ValueError) as e:
                    bad.append(str(e))
            while chunk:
                try:
                    batch = backbone.encode_prompts([r["problem"] for r in chunk], images,
                                                    max_prompt_length=max_prompt_length,
                                                    prompt_template=prompt_template)
                    break
                except PromptTooLongError as e:
                    bad += [f"{chunk[i]['id']}: prompt of {n} tokens > max_prompt_length={e.limit}"
                            for i, n in zip(e.indices, e.lengths)]
                    keep = [i for i in range(len(chunk)) if i not in set(e.indices)]
                    chunk, images = [chunk[i] for i in keep], [images[i] for i in keep]
            if chunk:
                ids = decoding.generate(backbone, batch, list(range(len(chunk))), decode=decode,
                                        max_new_tokens=max_new_tokens, top_p=top_p, do_sample=temperature > 0,
                                        temperature=temperature if temperature > 0 else 1.0).completion_ids
                lines = [json.dumps(prediction_record(r, _decode(backbone.tokenizer, i, stop), tag, len(i)),
                                    ensure_ascii=False) + "\n" for r, i in zip(chunk, ids)]
                f.write("".join(lines))
                f.flush()
                written += len(chunk)
            if bar is not None:
                bar.update(len(todo[start:start + batch_size]))
    if bar is not None:
        bar.close()
    if bad:
        print(f"infer: skipped {len(bad)} records (unreadable image or over-long prompt); first: "
              f"{'; '.join(bad[:5])}", file=sys.stderr)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mrpo.infer", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local Hugging Face folder (base model or exported run)")
    p.add_argument("--adapter", default=None,
                   help="LoRA adapter folder (peft format) to apply to --model and merge for inference")
    p.add_argument("--data", required=True, help="record JSONL (mrpo/data format)")
    p.add_argument("--out", required=True, help="prediction JSONL (appended to; resumable)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--family", default=None, help="qwen2_5_vl | qwen3_vl | internvl3 (default: from config)")
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--max-pixels", type=int, default=None, help="image pixel budget (default: the model's)")
    p.add_argument("--max-prompt-length", type=int, default=None)
    p.add_argument("--prompt-template", default=None,
                   help="format string with {question} (and {reasoning_tag}, {answer_tag}) or a file holding one; "
                        "use the one the model was trained with (default: the MRPO paper's instruction)")
    p.add_argument("--decode", default="loop", choices=["loop", "hf", "eager", "static", "static_compiled"],
                   help="decoder: loop (ours, default; falls back to generate where it cannot serve) or hf "
                        "(transformers' generate; eager = hf, static / static_compiled: its static KV cache)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1:
        p.error("--batch-size and --max-new-tokens must be >= 1")

    import torch

    from mrpo.data.records import load_records
    from mrpo.models.load import load_backbone

    backbone = load_backbone(args.model, family=args.family, dtype=getattr(torch, args.dtype), device=args.device,
                             max_pixels=args.max_pixels)
    records, report = load_records(args.data, family=backbone.family)   # its image tokens make a row bad
    print(report, file=sys.stderr)
    if args.limit is not None:
        records = records[:args.limit]
    if args.adapter is not None:
        from mrpo.models.lora import load_adapter_merged

        backbone.model = load_adapter_merged(backbone.model, args.adapter)
        print(f"infer: merged LoRA adapter {args.adapter} into {args.model}", file=sys.stderr)
    t0 = time.time()
    n = run_inference(backbone, records, args.out, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, max_prompt_length=args.max_prompt_length,
                      max_pixels=args.max_pixels, progress=not args.no_progress,
                      prompt_template=args.prompt_template, decode=args.decode)
    print(f"infer: wrote {n} new predictions ({len(records)} records, {len(records) - n} already done or "
          f"skipped) to {args.out} in {time.time() - t0:.1f}s")
    return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
