"""Tokens of one step-judge call, measured on our data, for the judge-cost estimate in the README.

    python benchmarks/judge_tokens.py --encoding-file o200k_base.tiktoken     # needs `pip install tiktoken`
    python benchmarks/judge_tokens.py                                          # no tokenizer: characters / 4

For each record of the synthetic training set (mrpo.data.synthetic, 512 records, seed 0): the request the
HTTP step judge sends (mrpo.judges.prompt, the paper's prompt) with the record's gold rationale, split into
steps (mrpo.rewards.steps.split_steps), standing in for a completion's reasoning (a policy's completions
have about as many steps: reward.k_min..k_max = 4..10), and the reply the judge must write (the verdict
JSON for K steps, as json.dumps writes it). Token counts: the system and user texts plus the chat format's
overhead (3 tokens per message + 3 to prime the reply, OpenAI's counting rule), with the given tiktoken
encoding file (o200k_base: the GPT-4o / GPT-5 family's); images are not in these counts (their tokens
depend on the provider's rule and the image size: a parameter of the estimate). Reasoning tokens of a
reasoning model (billed as output) are not in the reply count either: a parameter too.
The encoding file: tiktoken fetches o200k_base.tiktoken on first use where the network allows; offline,
any copy whose sha256 is tiktoken's published one (446a9538..., checked and named in the results) gives
the same counts (ours was rebuilt from the ranks the js-tiktoken package ships).
Writes results/judge_tokens.json and .md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"   # tiktoken_ext.openai_public


def counter(encoding_file: str | None):
    """(name, count(text) -> tokens): tiktoken with the encoding file, else characters / 4."""
    if encoding_file is None:
        return "characters / 4", lambda text: -(-len(text) // 4)
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    pat = "|".join([   # o200k_base's pre-tokeniser (tiktoken_ext.openai_public)
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+"""])
    enc = tiktoken.Encoding("o200k_base", pat_str=pat, mergeable_ranks=load_tiktoken_bpe(encoding_file),
                            special_tokens={"<|endoftext|>": 199999, "<|endofprompt|>": 200018})
    digest = hashlib.sha256(Path(encoding_file).read_bytes()).hexdigest()
    known = " = tiktoken's published o200k_base hash" if digest == O200K_SHA256 else ", NOT tiktoken's o200k_base"
    return (f"o200k_base (tiktoken, file sha256 {digest[:12]}...{known})",
            lambda text: len(enc.encode(text, disallowed_special=())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoding-file", help="o200k_base.tiktoken (sha256 446a9538...)")
    ap.add_argument("--records", type=int, default=512)
    a = ap.parse_args()

    from PIL import Image

    from mrpo.data.records import load_records
    from mrpo.data.synthetic import generate_synthetic
    from mrpo.judges.base import JudgeRequest
    from mrpo.judges.prompt import JudgePrompt
    from mrpo.rewards.steps import split_steps

    name, count = counter(a.encoding_file)
    prompt = JudgePrompt()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        generate_synthetic(tmp, a.records, 0, 0)
        records, _ = load_records(Path(tmp) / "train.jsonl")
        for r in records:
            steps = [s.text for s in split_steps(r["gold_reasoning"])]
            req = JudgeRequest(r["id"], r["problem"], None, r["solution"], r["gold_reasoning"], steps)
            messages = prompt.messages(req, with_image=False)
            prompt_tokens = sum(3 + count(m["content"]) for m in messages) + 3
            reply = json.dumps({"steps": [{"index": i + 1, "alignment": 1, "contribution": 1}
                                          for i in range(len(steps))]})
            images = r["image"] if isinstance(r["image"], list) else [r["image"]] if r.get("image") else []
            sizes = []
            for p in images:
                with Image.open(Path(tmp) / p if not Path(p).is_absolute() else p) as im:
                    sizes.append(im.size)
            rows.append({"k": len(steps), "prompt_tokens": prompt_tokens, "reply_tokens": count(reply),
                         "images": len(images), "sizes": sizes})

    def stats(key):
        xs = sorted(x[key] for x in rows)
        return {"mean": statistics.fmean(xs), "p50": xs[len(xs) // 2], "p90": xs[int(0.9 * (len(xs) - 1))],
                "min": xs[0], "max": xs[-1]}

    result = {"encoding": name, "records": len(rows), "k": stats("k"), "prompt_tokens": stats("prompt_tokens"),
              "reply_tokens": stats("reply_tokens"), "images_per_request": stats("images"),
              "image_sizes": sorted({tuple(s) for x in rows for s in x["sizes"]}),
              "command": " ".join(sys.argv)}
    out = ROOT / "benchmarks" / "results" / "judge_tokens"
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    fmt = lambda s: f"{s['mean']:.1f} | {s['p50']} | {s['p90']} | {s['min']}-{s['max']}"  # noqa: E731
    md = ["# Tokens of one step-judge call (synthetic training set, the paper's prompt)", "",
          f"Command: `{result['command']}`; {len(rows)} records; tokens: {name}; the gold rationale's steps stand in "
          f"for a completion's; images not counted (image sizes {result['image_sizes']}).", "",
          "| per call | mean | p50 | p90 | range |", "|---|---|---|---|---|",
          f"| steps K | {fmt(result['k'])} |", f"| prompt tokens (text) | {fmt(result['prompt_tokens'])} |",
          f"| reply tokens (verdict JSON) | {fmt(result['reply_tokens'])} |"]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
