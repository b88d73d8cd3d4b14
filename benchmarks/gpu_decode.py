"""gpu_check's decode stage: our decode loop (mrpo.models.decode.decode_groups, the rollout path) on a model
folder, timed, against the weight-read bound.

    python benchmarks/gpu_decode.py MODEL_DIR --json OUT.json [--prompts 2 --group 8 --new-tokens 128 --reps 3]

P distinct image prompts x G rows, max_new_tokens each; one untimed call first (on CUDA it captures the
CUDA graph of each batch bucket it meets: the stats' graph_captures), then `reps` timed calls (each a
fresh call, as a rollout is: its captures are counted again). Writes the medians of: decode_s / decode
step (one step = every live row advances one token: what the bound below compares with), tokens/s (all
rows' completion tokens / call wall time, prefill included), prefill_s, graph_captures, compactions, and
weight_bytes = the bytes ONE decode step must read at least once (every language-model block, the final
norm, the lm_head; the vision tower and the embedding table are not read by a decode step, only B rows of
the latter), with the device name, so that gpu_check's report can divide: decode step / (weight_bytes /
HBM bandwidth) (gpu_check.hbm_gbs: --hbm-gbs, else the device table, else the measured copy bandwidth).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def decode_weight_bytes(model) -> int:
    """Bytes one decode step reads: language-model blocks + final norm + lm_head (tied or not)."""
    from mrpo.models.decode_step import language_model

    lm = language_model(model)
    blocks = sum(p.numel() * p.element_size() for p in lm.layers.parameters())
    norm = sum(p.numel() * p.element_size() for p in lm.norm.parameters())
    head = model.get_output_embeddings().weight
    return blocks + norm + head.numel() * head.element_size()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--json", required=True)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from mrpo.data.synthetic import make_example
    from mrpo.models import decode as decode_loop
    from mrpo.models.load import load_backbone

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    bb = load_backbone(args.model_dir, dtype=torch.bfloat16 if cuda else torch.float32, device=device)
    bb.model.eval()
    why = decode_loop.unsupported_reason(bb, bb.model, do_sample=True)
    if why is not None:
        raise SystemExit(f"gpu_decode: the decode loop cannot serve {args.model_dir}: {why}")
    questions = [f"Question {i}: is there a lesion, and where is it?" for i in range(args.prompts)]
    prompts = bb.encode_prompts(questions, [[make_example(0, "train", i, 56)[1]] for i in range(args.prompts)])
    rows = [i for i in range(args.prompts) for _ in range(args.group)]

    def call(seed: int) -> tuple[float, object]:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = decode_loop.decode_groups(bb, prompts, rows, max_new_tokens=args.new_tokens, do_sample=True,
                                        generator=torch.Generator(device=device).manual_seed(seed))
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t, out

    call(0)   # warm-up (CUDA: graph captures, cuBLAS workspaces)
    runs = [call(1 + i) for i in range(args.reps)]
    med = lambda xs: statistics.median(xs)   # noqa: E731
    stats = [o.stats for _, o in runs]
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": str(bb.model.dtype).removeprefix("torch."), "rows": len(rows), "prompts": args.prompts,
        "new_tokens": args.new_tokens, "reps": args.reps,
        "call_s": med([s for s, _ in runs]),
        "tokens_per_s": med([sum(map(len, o.completion_ids)) / s for s, o in runs]),
        "decode_step_ms": med([1e3 * st["decode_s"] / max(1, st["decode_steps"]) for st in stats]),
        "prefill_s": med([st["prefill_s"] for st in stats]),
        "decode_steps": med([st["decode_steps"] for st in stats]),
        "graph_captures": med([st["graph_captures"] for st in stats]),
        "compactions": med([st["compactions"] for st in stats]),
        "weight_bytes": decode_weight_bytes(bb.model),
    }
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
