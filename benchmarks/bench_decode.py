"""Decode paths side by side in one process: Backbone.generate with rollout.decode = eager / static /
static_compiled on the same batch, rounds interleaved (so load from other processes hits all alike).

    python benchmarks/bench_decode.py                       # tiny Qwen2.5-VL, CPU, 16 rows x 96 tokens
    python benchmarks/bench_decode.py --model-path DIR      # any local folder (e.g. gpu_models.py output)

Reports p50 wall ms and (CPU) process CPU ms per decoded position (call time / longest completion),
and checks that greedy ids agree across the paths. On CPU static_compiled runs as static (transformers
compiles only on CUDA-type devices). Writes results/decode_<tag>.md and .csv.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PATHS = ["eager", "static", "static_compiled"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", help="local model folder (default: build the tiny qwen2_5_vl)")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=PATHS)
    ap.add_argument("--tag", help="results/decode_<tag>.* (default: <device>)")
    ap.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    args = ap.parse_args(argv)

    from mrpo.data.synthetic import make_example
    from mrpo.models.load import load_backbone
    from mrpo.models.tiny import build_tiny

    torch.set_num_threads(args.threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    path = args.model_path or build_tiny("qwen2_5_vl", Path(tempfile.gettempdir()) / "mrpo_bench_decode_tiny")
    bb = load_backbone(path, device=dev, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    bb.model.eval()
    image = make_example(0, "train", 0, image_size=56)[1]
    questions = [f"Question {i}: is there a lesion in the {'left' if i % 2 else 'right'} kidney?" for i in range(args.rows)]
    batch = bb.encode_prompts(questions, [[image] if i % 2 else [] for i in range(args.rows)])
    outs = {}

    def fn(p):
        def call():
            outs[p] = bb.generate(batch, args.new_tokens, do_sample=False, decode=p)
            if dev == "cuda":
                torch.cuda.synchronize()
        return call

    wall, cpu = common.time_interleaved_cpu({p: fn(p) for p in args.paths}, warmup=1, reps=args.reps)
    steps = max(len(c) for c in outs[args.paths[0]])
    same = {p: outs[p] == outs[args.paths[0]] for p in args.paths}
    meta = {"kernel": "generate", "mode": "greedy", "x_name": "rows", "x_value": args.rows, "dtype": str(bb.model.dtype),
            "device": common.device_name(dev), **common.versions(), "timestamp": common.timestamp()}
    note = f"new_tokens={args.new_tokens}; decode steps={steps}; load={common.load_average()}"
    rows, lines = [], [f"# Decode paths: {meta['device']}", "",
                       f"`python benchmarks/bench_decode.py {' '.join(sys.argv[1:] if argv is None else argv)}`".replace(" `", "`")
                       + f" at {meta['timestamp']}; {args.rows} rows, {note}.", "",
                       "| decode | wall ms / position (p50) | CPU ms / position (p50) | greedy ids = " + args.paths[0] + " |",
                       "|---|---|---|---|"]
    for p in args.paths:
        w = common.quantiles(1e3 * t / steps for t in wall[p])
        c = common.quantiles(1e3 * t / steps for t in cpu[p])
        rows.append({**meta, "provider": p, "metric": "time_per_position", "unit": "ms", "p50": w[0], "p20": w[1],
                     "p80": w[2], "note": note})
        rows.append({**meta, "provider": p, "metric": "cpu_time_per_position", "unit": "ms", "p50": c[0], "p20": c[1],
                     "p80": c[2], "note": note})
        lines.append(f"| {p} | {w[0]:.2f} | {c[0]:.2f} | {'yes' if same[p] else 'NO'} |")
    tag = args.tag or dev
    out = Path(args.out_dir)
    common.write_csv(out / f"decode_{tag}.csv", rows)
    (out / f"decode_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not all(same.values()):
        raise SystemExit("bench_decode: greedy ids differ between decode paths")


if __name__ == "__main__":
    main()
