"""Data command line.

    python -m mrpo.data prepare --source vqa_rad --root ~/data/VQA_RAD --out data/vqa_rad \\
        [--medthink R-RAD.json] [--split-test-from val|0.1] [--max-pixels N] [--strict] \\
        [--columns image=img,question=q,answer=a] [--dataset NAME] [--image-root DIR] [--files a.csv,b.csv]
    python -m mrpo.data prepare --source mrpo_paper --root DATA_DIR --out data/paper [--medthink DIR]
        (the MRPO paper's data folder: DATA_DIR/Data_RAW/{vqa-rad,slake,pathvqa} and DATA_DIR/Medthink)
    python -m mrpo.data synth --out data/synthetic [--n-train 512] [--n-test 64] [--seed 0]

Exit status: 0 done, 1 problems under --strict, 2 unreadable input or bad arguments.
"""
from __future__ import annotations

import argparse
import sys

from .readers import READERS, DataError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mrpo.data", description="Prepare medical VQA data for MRPO.")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prepare", help="convert a local copy of a public data set to train/test JSONL")
    pr.add_argument("--source", required=True, choices=sorted([*READERS, "mrpo_paper"]),
                    help="published format of --root (mrpo_paper: the MRPO paper's DATA_DIR, all three sets)")
    pr.add_argument("--root", required=True, help="folder (or file, for generic) of the local copy")
    pr.add_argument("--out", required=True, help="output folder: train.jsonl, test.jsonl, report.json, images/")
    pr.add_argument("--medthink", help="MedThink rationale file or folder (e.g. Medthink_Dataset/R-RAD; "
                    "for mrpo_paper the folder holding R-RAD/, R-SLAKE/, R-PathVQA/, default DATA_DIR/Medthink)")
    pr.add_argument("--medthink-columns", help="MedThink column names: image=...,question=...,answer=...,rationale=...")
    pr.add_argument("--medthink-key", default="image,question,answer",
                    help="fields matched to attach a rationale (default image,question,answer)")
    pr.add_argument("--split-test-from", help="'val': validation rows become test; a fraction such as 0.1: "
                    "hold out that share of images as test (sources without a test split)")
    pr.add_argument("--max-pixels", type=int, help="write downscaled copies of larger images to out/images/")
    pr.add_argument("--strict", action="store_true", help="any problem row is an error (exit 1)")
    pr.add_argument("--columns", help="column names for generic/hf sources: image=...,question=...,answer=...")
    pr.add_argument("--dataset", help="dataset name in records and ids (default: the source name)")
    pr.add_argument("--image-root", help="extra folder to search for images")
    pr.add_argument("--files", help="comma-separated files under --root to read instead of the defaults")
    pr.add_argument("--examples", type=int, default=5, help="offending rows named per problem (default 5)")

    sy = sub.add_parser("synth", help="write the synthetic data set (offline tests and smoke runs)")
    sy.add_argument("--out", required=True)
    sy.add_argument("--n-train", type=int, default=512)
    sy.add_argument("--n-test", type=int, default=64)
    sy.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "synth":
        from .synthetic import generate_synthetic  # written separately; imported only when asked for
        train_path, test_path = generate_synthetic(args.out, args.n_train, args.n_test, args.seed)
        print(f"synthetic data: {args.n_train} train / {args.n_test} test records: {train_path}, {test_path}")
        return 0

    from .prepare import PrepareError, format_paper_summary, format_summary, prepare, prepare_paper
    key = tuple(f.strip() for f in args.medthink_key.split(",") if f.strip())
    try:
        if args.source == "mrpo_paper":
            report = prepare_paper(args.root, args.out, medthink=args.medthink, strict=args.strict,
                                   medthink_key=key, split_test_from=args.split_test_from,
                                   max_pixels=args.max_pixels, examples=args.examples)
            print(format_paper_summary(report))
            return 0
        report = prepare(args.source, args.root, args.out, medthink=args.medthink,
                         medthink_columns=args.medthink_columns, medthink_key=key,
                         split_test_from=args.split_test_from, max_pixels=args.max_pixels, strict=args.strict,
                         columns=args.columns, dataset=args.dataset, image_root=args.image_root,
                         files=args.files, examples=args.examples)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
