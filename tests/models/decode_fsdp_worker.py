"""Worker for test_decode_loop_fsdp2_two_ranks (torchrun, 2 gloo processes): for each tiny model folder,
shard the policy as the FSDP2 engine does (passthrough head, apply_fsdp2), then

  rollouts: each rank decodes its own share of the prompts (rollout.decode=loop, G rows per DISTINCT
    prompt, a seed per call from the run seed, step and prompt ids) inside generation_context: the
    weights are all-gathered once per FSDP unit, and the call runs one all-reduce (the vision filler's
    flag) and no collective per token, although the ranks decode different numbers of tokens (different
    max_new_tokens); the completions and their
    log-probs equal those of one unsharded process making the same calls (every share);
  evaluation: mrpo.rollout.greedy_texts over 2 ranks (records split r::2, gathered back in order) equals
    one unsharded process decoding the same chunks.
Prints "<family> ok" per model on each rank."""
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

from mrpo import decoding
from mrpo.data.synthetic import make_example
from mrpo.engines.fsdp2 import generation_context
from mrpo.models.load import load_backbone
from mrpo.models.parallelize import apply_fsdp2, install_passthrough_head
from mrpo.rollout import greedy_texts

QUESTIONS = ["Is there a lesion?", "How many lesions are there in the image, and where?",
             "Which organ is shown?", "Is the liver enlarged on this CT scan?"]
G = 3


class count_collectives:
    """Counts calls of torch.distributed collectives (FSDP2's all-gathers counted apart)."""
    GATHERS = ("all_gather_single", "all_gather_into_tensor")
    OTHERS = ("all_reduce", "broadcast", "all_gather", "all_gather_object", "reduce_scatter_tensor", "barrier")

    def __init__(self):
        self.gathers = self.others = 0
        self.originals = {}
        for name in self.GATHERS + self.OTHERS:
            if hasattr(dist, name):
                self.originals[name] = getattr(dist, name)
                setattr(dist, name, self._counting(name, self.originals[name]))

    def _counting(self, name, original):
        def counting(*args, **kwargs):
            if name in self.GATHERS:
                self.gathers += 1
            else:
                self.others += 1
            return original(*args, **kwargs)
        return counting

    def restore(self):
        for name, fn in self.originals.items():
            setattr(dist, name, fn)


def records(n):
    return [{"id": f"r{i}", "problem": QUESTIONS[i % len(QUESTIONS)],
             "images": [make_example(0, "train", i, 56)[1]] if i % 2 == 0 else []} for i in range(n)]


def share(rank, world, recs):
    """The prompts a rank rolls out, its max_new_tokens (different per rank) and its call seed."""
    mine = recs[rank * 2:(rank + 1) * 2]
    return mine, 6 + 6 * rank, decoding.call_seed(1234, 5, *(r["id"] for r in mine))


def rollout(bb, mine, new, seed):
    prompts = bb.encode_prompts([r["problem"] for r in mine], [r["images"] for r in mine])
    rows = [i for i in range(len(mine)) for _ in range(G)]
    return decoding.generate(bb, prompts, rows, decode="loop", max_new_tokens=new, seed=seed)


def check(path: str, rank: int, world: int) -> None:
    bb, ref = load_backbone(path), load_backbone(path)
    install_passthrough_head(bb.model)
    apply_fsdp2(bb.model, torch.device("cpu"), torch.float32, torch.float32)
    bb.model.eval()
    units = len(bb.model.model.language_model.layers) + 2             # decoder blocks, vision tower, root
    recs = records(2 * world)

    counter = count_collectives()
    try:
        with generation_context(bb.model, gather_all=True):
            gathers_at_entry = counter.gathers
            out = rollout(bb, *share(rank, world, recs))
            during = (counter.gathers - gathers_at_entry, counter.others)
    finally:
        counter.restore()
    assert out.path == "loop", out.path
    # one all-gather per FSDP unit on entry; in the call one all-reduce (the vision filler's "does any rank
    # hold an image" flag), none per token: rank 1 decodes twice the tokens of rank 0 with the same count
    assert gathers_at_entry == units and during == (0, 1), (gathers_at_entry, during)
    everyone = [None] * world
    dist.all_gather_object(everyone, (out.completion_ids, [lp.tolist() for lp in out.logprobs]))
    for r in range(world):                                            # one unsharded process, every share
        want = rollout(ref, *share(r, world, recs))
        assert everyone[r][0] == want.completion_ids, (r, everyone[r][0], want.completion_ids)
        for got, lp in zip(everyone[r][1], want.logprobs):
            assert torch.allclose(torch.tensor(got), lp, atol=1e-5), (r, got, lp)

    # greedy evaluation over the ranks (the trainer's evaluate)
    engine = SimpleNamespace(generation=lambda: generation_context(bb.model, gather_all=True), cfg=None)
    pool = SimpleNamespace(encode=lambda chunk: bb.encode_prompts([r["problem"] for r in chunk],
                                                                   [r["images"] for r in chunk]))
    eval_recs = records(5)                                            # 3 on rank 0, 2 on rank 1
    texts = greedy_texts(engine, bb, pool, eval_recs, 8, batch_size=2, stop=lambda: False, decode="loop")
    want = {}
    for r in range(world):
        theirs = eval_recs[r::world]
        for b in range(0, len(theirs), 2):
            chunk = theirs[b:b + 2]
            p = ref.encode_prompts([x["problem"] for x in chunk], [x["images"] for x in chunk])
            ids = decoding.generate(ref, p, list(range(len(chunk))), decode="loop", max_new_tokens=8,
                                    do_sample=False).completion_ids
            eos = set(ref.eos_token_ids)
            for x, i in zip(chunk, ids):
                want[x["id"]] = ref.tokenizer.decode(i[:-1] if i and i[-1] in eos else i, skip_special_tokens=False)
    assert texts == [want[x["id"]] for x in eval_recs], (texts, want)


def main() -> None:
    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for path in sys.argv[1:]:
        check(path, rank, world)
        print(f"{os.path.basename(path)} ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
