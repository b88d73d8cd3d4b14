"""Decode side by side in one process, rounds interleaved (so load from other processes hits all alike):
Backbone.generate with rollout.decode = eager / static / static_compiled, plain `model.generate` with the
same settings, and the settings Backbone.generate passed before the lean decode, on the same batch.

    python benchmarks/bench_decode.py                       # tiny Qwen2.5-VL, CPU, 16 rows x 96 tokens
    python benchmarks/bench_decode.py --mode sample greedy --providers eager plain all-neutral
    python benchmarks/bench_decode.py --model-path DIR      # any local folder (e.g. gpu_models.py output)

Providers:
  eager, static, static_compiled  Backbone.generate with that rollout.decode (only the sampling settings that
                                  change something, vision tokens suppressed by a mask built once)
  plain                           model.generate(**batch, do_sample, temperature, top_k=0 (sampling: the full
                                  distribution, as ours), max_new_tokens, pad/eos ids, suppress_tokens=vision ids)
  all-neutral                     model.generate with every neutral sampling setting spelled out (min_p=0.0,
                                  min_new_tokens=0, ...: what Backbone.generate passed before the lean decode)
Modes: sample (temperature 0.7, the rollout setting; every provider starts from one seed) and greedy.
Reports p50 wall ms and (CPU) process CPU ms per decoded position (call time / longest completion) and
the ratio to `plain`, and checks that the ids agree across providers within each mode. On CPU
static_compiled runs as static (transformers compiles only on CUDA-type devices).
Writes results/decode_<tag>.md and .csv.

    python benchmarks/bench_decode.py --loop                # our decode loop (mrpo.models.decode) vs generate

--loop: mrpo.models.decode.decode_groups against Backbone.generate (transformers' generate over the repeated
batch, as rollouts ran it) on the tiny Qwen2.5-VL, rounds interleaved, at each of --threads (default 1 2):
  (a) default   2 prompts x G = 8 rows, 96 new tokens, sampling at T = 1 (the EOS set is one suppressed id,
                so every row decodes all 96 positions in both): time per decoded position;
  (b) stop16    the same rows, greedy, with one more EOS id that the first prompt's greedy completion
                emits first at token 16 and the second never: half the rows stop after 16 tokens; ours
                with compaction on and off, and generate (ids checked equal across the three);
  (c) longimg   2 prompts with a large image (--long-image-side px, hundreds of image tokens) x G = 8,
                32 new tokens: ours with the shared prefill (each prompt once), ours prefilling every row
                (the 16 rows passed as 16 prompts), and generate; time per call.
Writes results/decode_loop_<tag>.md and .csv (tag default: <device>).
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
PROVIDERS = PATHS + ["plain", "all-neutral"]
# what Backbone.generate passed before the lean decode (min_p=0.0 and min_new_tokens=0 add processors)
ALL_NEUTRAL = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
                   repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
                   num_beams=1, num_return_sequences=1, bad_words_ids=None, begin_suppress_tokens=None,
                   forced_bos_token_id=None, forced_eos_token_id=None, sequence_bias=None,
                   exponential_decay_length_penalty=None, renormalize_logits=False)


def cut_at_eos(seqs, prompt_len: int, eos: set[int]) -> list[list[int]]:
    """Completion ids of model.generate output, cut after the first EOS (as Backbone.generate)."""
    out = []
    for row in seqs[:, prompt_len:].tolist():
        out.append(row[:next((i + 1 for i, t in enumerate(row) if t in eos), len(row))])
    return out


def capture_processors(bb, fns: dict) -> dict:
    """{(provider, mode): the LogitsProcessorList generate() builds for it}, from one short call each
    (a spy on transformers' private `_get_logits_processor`)."""
    seen, original = {}, bb.model._get_logits_processor
    key = [None]

    def spy(*a, **k):
        out = original(*a, **k)
        seen.setdefault(key[0], out)
        return out

    bb.model._get_logits_processor = spy
    try:
        for k, call in fns.items():
            key[0] = k
            call()
    finally:
        del bb.model._get_logits_processor
    return seen


def time_processors(processors: dict, input_ids: torch.Tensor, vocab: int, reps: int = 7, iters: int = 200) -> dict:
    """{key: (processor names, p50 microseconds per call on [rows, vocab] scores)}, rounds interleaved."""
    scores = torch.randn(input_ids.shape[0], vocab)
    fns = {}
    for k, plist in processors.items():
        def call(plist=plist):
            for _ in range(iters):
                plist(input_ids, scores.clone())
        fns[k] = call
    wall, cpu = common.time_interleaved_cpu(fns, warmup=1, reps=reps)
    clone_s = common.quantiles(common.time_interleaved_cpu({"clone": lambda: [scores.clone() for _ in range(iters)]},
                                                           warmup=1, reps=reps)[1]["clone"])[0]
    return {k: ([type(p).__name__ for p in processors[k]], 1e6 * (common.quantiles(cpu[k])[0] - clone_s) / iters)
            for k in processors}


def _loop_cases(bb, long_side: int) -> dict:
    """{case: (prompts, rows, kwargs of both providers, eos ids)} for --loop (see the module docstring)."""
    import dataclasses

    from mrpo.data.synthetic import make_example

    exs = [make_example(0, "train", i, image_size=56) for i in range(2)]
    prompts = bb.encode_prompts([e[0]["problem"] for e in exs], [[e[1]] for e in exs])
    rows = [i for i in range(2) for _ in range(8)]
    cases = {"default": (prompts, rows, dict(max_new_tokens=96, do_sample=True, temperature=1.0),
                         bb.suppress_token_ids[:1])}
    # (b): an id that prompt 0's greedy completion first emits at index 15 (its 16th token), prompt 1's never
    greedy = bb.generate(prompts, 96, do_sample=False)
    cands = [t for t in set(greedy[0]) if greedy[0].index(t) == 15 and t not in greedy[1]]
    if not cands:
        raise SystemExit(f"bench_decode --loop: no token first emitted at index 15 by prompt 0: {greedy}")
    cases["stop16"] = (prompts, rows, dict(max_new_tokens=96, do_sample=False), bb.eos_token_ids + cands[:1])
    big = dataclasses.replace(bb, max_pixels=long_side * long_side)
    imgs = [make_example(0, "train", i, image_size=long_side)[1] for i in range(2)]
    long_prompts = big.encode_prompts([e[0]["problem"] for e in exs], [[im] for im in imgs])
    cases["longimg"] = (long_prompts, rows, dict(max_new_tokens=32, do_sample=True, temperature=1.0),
                        bb.suppress_token_ids[:1])
    return cases


def _loop_providers(case: str, cb, prompts: dict, rows: list[int], kw: dict, dev: str, outs: dict, stats: dict
                    ) -> dict:
    """{provider: call} for one --loop case; each call records its completion ids in outs (and our stats)."""
    from mrpo.models.decode import decode_groups

    repeated = cb.select_rows(prompts, rows)

    def ours(name: str, every_row: bool = False, **extra):
        def call():
            g = torch.Generator(device=dev).manual_seed(1234)
            if every_row:     # the repeated batch as R prompts: no prefill is shared
                o = decode_groups(cb, repeated, list(range(len(rows))), generator=g, **kw, **extra)
            else:
                o = decode_groups(cb, prompts, rows, generator=g, **kw, **extra)
            outs[name], stats[name] = o.completion_ids, o.stats
        return call

    def generate():
        torch.manual_seed(1234)
        outs["generate"] = cb.generate(repeated, kw["max_new_tokens"], do_sample=kw["do_sample"],
                                       temperature=kw.get("temperature", 1.0))

    fns = {"ours": ours("ours")}
    if case == "stop16":
        fns["ours, no compaction"] = ours("ours, no compaction", compaction=False)
    if case == "longimg":
        fns["ours, every row prefilled"] = ours("ours, every row prefilled", every_row=True)
    fns["generate"] = generate
    return fns


def loop_main(args) -> None:
    """--loop: our decode loop vs generate on cases (a), (b), (c), at each thread count."""
    import dataclasses

    from mrpo.models.load import load_backbone
    from mrpo.models.tiny import build_tiny

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    path = args.model_path or build_tiny("qwen2_5_vl", Path(tempfile.gettempdir()) / "mrpo_bench_decode_tiny")
    bb = load_backbone(path, device=dev, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    bb.model.eval()
    cases = _loop_cases(bb, args.long_image_side)
    load_before = common.load_average()
    meta = {"kernel": "decode_loop", "x_name": "threads", "dtype": str(bb.model.dtype),
            "device": common.device_name(dev), **common.versions(), "timestamp": common.timestamp()}
    rows_out, table, failed = [], [], []
    for threads in args.threads_list:
        torch.set_num_threads(threads)
        for case, (prompts, rows, kw, eos) in cases.items():
            cb = dataclasses.replace(bb, eos_token_ids=list(eos))
            outs: dict[str, list[list[int]]] = {}
            stats: dict[str, dict] = {}
            fns = _loop_providers(case, cb, prompts, rows, kw, dev, outs, stats)
            wall, cpu = common.time_interleaved_cpu(fns, warmup=1, reps=args.reps)
            if case == "stop16" and not all(outs[n] == outs["generate"] for n in outs):
                failed.append((threads, case))
            gen_cpu = common.quantiles(cpu["generate"])[0]
            gen_wall = common.quantiles(wall["generate"])[0]
            for name in fns:
                steps = max(len(c) for c in outs[name])
                w, c = common.quantiles(wall[name]), common.quantiles(cpu[name])
                st = stats.get(name, {})
                note = (f"case={case}; rows={len(rows)}; new_tokens={kw['max_new_tokens']}; decoded positions={steps}; "
                        f"prompt_len={prompts['input_ids'].shape[1]}; buckets={st.get('buckets', '-')}; "
                        f"prefill_rows={st.get('prefill_rows', len(rows))}")
                for metric, q, unit in (("call_wall", w, "s"), ("call_cpu", c, "s")):
                    rows_out.append({**meta, "x_value": threads, "provider": name, "mode": case, "metric": metric,
                                     "unit": unit, "p50": q[0], "p20": q[1], "p80": q[2], "note": note})
                table.append(f"| {threads} | {case} | {name} | {steps} | {1e3 * w[0] / steps:.3f} | "
                             f"{1e3 * c[0] / steps:.3f} | {w[0] / gen_wall:.3f} | {c[0] / gen_cpu:.3f} | "
                             f"{st.get('buckets', '-')} |")
    load = common.load_average()
    lines = [f"# Decode loop: {meta['device']}", "",
             f"`python benchmarks/bench_decode.py --loop{' ' + ' '.join(args.argv) if args.argv else ''}` at "
             f"{meta['timestamp']}; tiny Qwen2.5-VL ({meta['dtype']}), {args.reps} interleaved rounds, p50; load "
             f"average {load_before} before and {load} after the run (shared machine: compare within a row group "
             f"only).",
             "Cases: default = 2 prompts x G 8, 96 new tokens, sampling T 1, no row stops; stop16 = greedy, half "
             "the rows stop after 16 tokens; longimg = 2 prompts with a large image x G 8, 32 new tokens, sampling.",
             "ms / position = call time (prefill included) / decoded positions (the longest row).", "",
             "| threads | case | provider | positions | wall ms / position | CPU ms / position | wall vs generate "
             "| CPU vs generate | buckets |", "|---:|---|---|---:|---:|---:|---:|---:|---|", *table]
    tag = args.tag or dev
    out = Path(args.out_dir)
    common.write_csv(out / f"decode_loop_{tag}.csv", rows_out)
    (out / f"decode_loop_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if failed:
        raise SystemExit(f"bench_decode --loop: greedy ids differ from generate for {failed}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", help="local model folder (default: build the tiny qwen2_5_vl)")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--providers", "--paths", nargs="+", choices=PROVIDERS, default=["eager", "plain", "all-neutral"])
    ap.add_argument("--mode", nargs="+", choices=["sample", "greedy"], default=["sample", "greedy"])
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--tag", help="results/decode_<tag>.* (default: <device>)")
    ap.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    ap.add_argument("--loop", action="store_true", help="our decode loop vs generate (cases a, b, c)")
    ap.add_argument("--threads-list", type=int, nargs="+", default=[1, 2], help="--loop: thread counts")
    ap.add_argument("--long-image-side", type=int, default=448, help="--loop case longimg: image side (px)")
    args = ap.parse_args(argv)
    if args.loop:
        args.argv = sys.argv[1:] if argv is None else list(argv)
        args.argv = [a for a in args.argv if a != "--loop"]
        return loop_main(args)

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
    eos = set(bb.eos_token_ids)
    prompt_len = batch["input_ids"].shape[1]
    outs: dict[tuple[str, str], list[list[int]]] = {}

    def fn(provider, mode):
        sample = mode == "sample"

        def call():
            torch.manual_seed(1234)
            if provider in PATHS:
                ids = bb.generate(batch, args.new_tokens, temperature=args.temperature, do_sample=sample, decode=provider)
            else:
                kwargs = dict(ALL_NEUTRAL) if provider == "all-neutral" else ({"top_k": 0} if sample else {})
                if sample:
                    kwargs["temperature"] = args.temperature
                seqs = bb.model.generate(**batch, **kwargs, max_new_tokens=args.new_tokens, do_sample=sample,
                                         pad_token_id=bb.pad_token_id, eos_token_id=bb.eos_token_ids,
                                         suppress_tokens=bb.suppress_token_ids or None)
                ids = cut_at_eos(seqs, prompt_len, eos)
            outs[(provider, mode)] = ids
            if dev == "cuda":
                torch.cuda.synchronize()
        return call

    fns = {(p, m): fn(p, m) for m in args.mode for p in args.providers}
    processors = capture_processors(bb, fns)
    wall, cpu = common.time_interleaved_cpu(fns, warmup=1, reps=args.reps)
    proc_us = time_processors(processors, batch["input_ids"], bb.model.config.get_text_config().vocab_size)
    meta = {"kernel": "generate", "x_name": "rows", "x_value": args.rows, "dtype": str(bb.model.dtype),
            "device": common.device_name(dev), **common.versions(), "timestamp": common.timestamp()}
    cmd = " ".join(sys.argv[1:] if argv is None else argv)
    rows, lines = [], [f"# Decode: {meta['device']}", "",
                       f"`python benchmarks/bench_decode.py{' ' + cmd if cmd else ''}` at {meta['timestamp']}; "
                       f"{args.rows} rows (half with an image), {args.new_tokens} new tokens, temperature "
                       f"{args.temperature} when sampling, {args.threads} thread(s), {args.reps} interleaved rounds; "
                       f"load {common.load_average()} (shared machine: compare within a table only).", "",
                       "| mode | provider | decode steps | wall ms / position (p50) | CPU ms / position (p50) "
                       "| CPU vs plain | ids = " + args.providers[0] + " |",
                       "|---|---|---:|---:|---:|---:|---|"]
    failed = []
    for m in args.mode:
        first = outs[(args.providers[0], m)]
        steps = max(len(c) for c in first)
        plain_cpu = common.quantiles(cpu[("plain", m)])[0] if "plain" in args.providers else None
        for p in args.providers:
            same = outs[(p, m)] == first
            failed += [] if same else [(p, m)]
            w = common.quantiles(1e3 * t / steps for t in wall[(p, m)])
            c = common.quantiles(1e3 * t / steps for t in cpu[(p, m)])
            ratio = common.quantiles(cpu[(p, m)])[0] / plain_cpu if plain_cpu else float("nan")
            note = f"new_tokens={args.new_tokens}; decode steps={steps}; temperature={args.temperature if m == 'sample' else 0}"
            for metric, q in (("time_per_position", w), ("cpu_time_per_position", c)):
                rows.append({**meta, "provider": p, "mode": m, "metric": metric, "unit": "ms", "p50": q[0],
                             "p20": q[1], "p80": q[2], "note": note})
            lines.append(f"| {m} | {p} | {steps} | {w[0]:.3f} | {c[0]:.3f} | {ratio:.3f} | {'yes' if same else 'NO'} |")
    lines += ["", "Logits processors that generate() built for each provider, timed alone on [rows, V] fp32 scores "
              "(p50 of interleaved rounds; the per-position work they add on top of the forward):", "",
              "| mode | provider | processors | us / position (p50) |", "|---|---|---|---:|"]
    for (p, m), (names, us) in proc_us.items():
        lines.append(f"| {m} | {p} | {', '.join(names) or '-'} | {us:.1f} |")
        rows.append({**meta, "provider": p, "mode": m, "metric": "logits_processors_per_position", "unit": "us",
                     "p50": us, "note": ", ".join(names)})
    tag = args.tag or dev
    out = Path(args.out_dir)
    common.write_csv(out / f"decode_{tag}.csv", rows)
    (out / f"decode_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if failed:
        raise SystemExit(f"bench_decode: ids differ from {args.providers[0]} for {failed}")


if __name__ == "__main__":
    main()
