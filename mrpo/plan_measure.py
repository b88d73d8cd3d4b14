"""Measured memory for mrpo.plan: a live-tensor tracker that works on CPU, per-phase peaks in the trainer,
and the calibration of the planner's per-token activation costs on the real model classes.

    python -m mrpo.plan_measure --out mrpo/plan_calibration.json     # re-measure the coefficients (CPU, ~1 min)

`LiveBytes` is a TorchDispatchMode that adds up the storages created by every op run inside it and drops
them when their storage is freed (weak references), so its `peak` is the high-water mark of the bytes
allocated inside the block on any device, CPU included, on torch 2.11 and 2.13 alike (torch's own
`torch.distributed._tools.mem_tracker.MemTracker` does the same with module attribution on top; it is not
needed here). Views and in-place results share a storage with an input and are not counted twice.

Calibration: a language model (or vision tower) of each family is built from its shipped config.json at toy
widths, and for several (hidden, MLP, heads, KV heads, head_dim) points the bytes per token and layer are
measured: saved for backward (`train`), saved with gradient checkpointing (`ckpt`), the working set of a
no-grad forward (`infer`) and the transient on top of the saved tensors in backward (`backward`). Each is
fitted (least squares) as a linear form in [hidden, intermediate, heads x head_dim, kv_heads x head_dim,
heads], whose coefficients are bytes per unit of each size, so the same form scales to 7B widths.
"""
from __future__ import annotations

import contextlib
import functools
import json
import weakref
from pathlib import Path

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

CALIBRATION_FILE = Path(__file__).with_name("plan_calibration.json")
FEATURES = ("hidden", "intermediate", "q_dim", "kv_dim", "heads")
BACKBONE_DIR = Path(__file__).resolve().parents[1] / "configs" / "backbones"
BACKBONE_NAMES = {"qwen2_5_vl": "qwen2_5_vl_7b", "qwen3_vl": "qwen3_vl_8b", "internvl3": "internvl3_8b"}


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the mode and still alive (`live`), and their maximum
    (`peak`). Storages that existed before the mode are not seen (see `tensor_bytes` for those)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage(a)[1] for a in pytree.tree_leaves((args, kwargs)) if _storage(a)}
        for t in pytree.tree_leaves(out):
            found = _storage(t) if isinstance(t, torch.Tensor) and not t._is_view() else None
            if found is None:
                continue
            storage, ptr, n = found
            if n == 0 or ptr in inputs or ptr in self._refs:
                continue
            self._refs[ptr] = weakref.ref(storage, functools.partial(self._free, ptr, n))
            self.live += n
            self.peak = max(self.peak, self.live)
        return out

    def _free(self, ptr: int, n: int, _ref) -> None:
        if self._refs.pop(ptr, None) is not None:
            self.live -= n

    def reset_peak(self) -> None:
        self.peak = self.live


def _storage(t) -> tuple | None:
    """(untyped storage, data pointer, bytes) of a tensor with real storage (a DTensor's local shard), else
    None (meta tensors, storages FSDP2 has freed)."""
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return None
    t = getattr(t, "_local_tensor", t)   # a DTensor: its shard (made by ops the mode does not see)
    try:
        st = t.untyped_storage()
        return st, st.data_ptr(), st.nbytes()
    except (RuntimeError, NotImplementedError):
        return None


def tensor_bytes(*objects) -> int:
    """Bytes of the distinct storages of every tensor in `objects` (modules: parameters, their gradients
    and buffers; optimizers: their state; anything else: the tensors in it)."""
    seen: dict[int, int] = {}

    def add(t):
        found = _storage(t)
        if found is not None:
            seen[found[1]] = found[2]

    for obj in objects:
        if obj is None:
            continue
        if isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                add(p)
                add(p.grad)
            for b in obj.buffers():
                add(b)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for v in state.values():
                    add(v)
        else:
            for t in pytree.tree_leaves(obj):
                add(t)
    return sum(seen.values())


class PhaseMemory:
    """Peak memory of the phases of one RL step (rollout, logprobs, train), in bytes.

    On CUDA: torch.cuda.max_memory_allocated with reset_peak_memory_stats at each phase's start. On CPU only
    when `cpu_objects` is given (tests: the model, reference model and optimizer whose tensors exist before
    each phase): their bytes at the phase's start plus the LiveBytes peak inside it. Otherwise nothing is
    measured and `peaks` stays empty."""

    def __init__(self, device: torch.device, cpu_objects: tuple | None = None):
        self.device, self.cpu_objects = device, cpu_objects
        self.peaks: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self.device.type == "cuda" or self.cpu_objects is not None

    def stop(self) -> None:
        """Measure nothing from now on (the peaks measured so far are kept)."""
        self.device, self.cpu_objects = torch.device("meta"), None

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self.peaks[name] = max(self.peaks.get(name, 0), torch.cuda.max_memory_allocated(self.device))
        elif self.cpu_objects is not None:
            base = tensor_bytes(*self.cpu_objects())
            with LiveBytes() as live:
                yield
            self.peaks[name] = max(self.peaks.get(name, 0), base + live.peak)
        else:
            yield


def toy_config(family: str, hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int,
               layers: int, v_hidden: int = 64, v_intermediate: int = 128, v_heads: int = 4, v_depth: int = 1):
    """The family's shipped config.json with toy widths (vocabulary 512): the real model classes."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(BACKBONE_DIR / BACKBONE_NAMES[family])
    text = cfg.text_config
    text.update(dict(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                     num_key_value_heads=kv_heads, head_dim=head_dim, num_hidden_layers=layers, vocab_size=512,
                     max_position_embeddings=4096))
    text.layer_types = ["full_attention"] * layers
    vis = cfg.vision_config
    if family == "internvl3":
        vis.update(dict(hidden_size=v_hidden, intermediate_size=v_intermediate, num_attention_heads=v_heads,
                        num_hidden_layers=v_depth, image_size=[112, 112]))
    else:
        vis.update(dict(hidden_size=v_hidden, intermediate_size=v_intermediate, num_heads=v_heads, depth=v_depth,
                        out_hidden_size=hidden))
        if family == "qwen2_5_vl":
            vis.fullatt_block_indexes = [0]
        else:
            vis.deepstack_visual_indexes = []
    rope = getattr(text, "rope_parameters", None)
    if isinstance(rope, dict) and "mrope_section" in rope:   # M-RoPE sections sum to head_dim / 2
        q = head_dim // 2
        rope["mrope_section"] = [q - 2 * (q // 3), q // 3, q // 3]
    cfg.tie_word_embeddings = False
    return cfg


def _language_model(model):
    inner = model.model
    return getattr(inner, "language_model", inner)


def _vision_tower(model):
    inner = model.model
    return getattr(inner, "visual", None) or getattr(inner, "vision_tower")


def _vision_input(family: str, cfg, dtype):
    """(call, n_patches): a function running the tower on one toy image, and its patch count."""
    v = cfg.vision_config
    if family == "internvl3":
        side = v.image_size[0]
        pixels = torch.randn(1, 3, side, side, dtype=dtype)
        return (lambda tower: tower(pixel_values=pixels)), (side // v.patch_size[0]) ** 2
    p, tp, grid = v.patch_size, v.temporal_patch_size, 16   # 16 x 16 patches (window attention needs >= 8)
    pixels = torch.randn(grid * grid, 3 * tp * p * p, dtype=dtype)
    thw = torch.tensor([[1, grid, grid]])
    return (lambda tower: tower(pixels, grid_thw=thw)), grid * grid


def _measure(run, tokens: int, train: bool, checkpointing: bool = False) -> dict:
    """Bytes per token: saved after forward, peak of forward (+ backward when train)."""
    with LiveBytes() as live:
        if not train:
            with torch.no_grad():
                out = run()
            return {"peak": live.peak / tokens}
        out = run()
        first = pytree.tree_leaves(out)[0]
        saved = live.live - first.untyped_storage().nbytes()
        fwd_peak = live.peak
        first.float().sum().backward()
        return {"saved": saved / tokens, "peak": max(fwd_peak, live.peak) / tokens}


def measure_point(family: str, dtype: torch.dtype, dims: dict, tokens: int = 128, vision: bool = False) -> dict:
    """Per-token-per-layer bytes at one toy point (layer slope from 1 vs 3 layers)."""
    from transformers import AutoModelForImageTextToText

    out = {}
    for layers in (1, 3):
        if vision:
            cfg = toy_config(family, 64, 128, 4, 2, 16, 1, v_hidden=dims["hidden"], v_intermediate=dims["intermediate"],
                             v_heads=dims["heads"], v_depth=layers)
        else:
            cfg = toy_config(family, dims["hidden"], dims["intermediate"], dims["heads"], dims["kv_heads"],
                             dims["head_dim"], layers)
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype, attn_implementation="sdpa").train()
        if vision:
            call, n = _vision_input(family, cfg, dtype)
            module = _vision_tower(model)
            run = functools.partial(call, module)
        else:
            module, n = _language_model(model), tokens
            x = torch.randn(1, tokens, dims["hidden"], dtype=dtype, requires_grad=True)
            run = functools.partial(module, inputs_embeds=x, use_cache=False)
        res = {"train": _measure(run, n, True), "infer": _measure(run, n, False)}
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        res["ckpt"] = _measure(run, n, True)
        out[layers] = res
    a, b = out[1], out[3]
    return {
        "train": (b["train"]["saved"] - a["train"]["saved"]) / 2,
        "ckpt": (b["ckpt"]["saved"] - a["ckpt"]["saved"]) / 2,
        # the transient of one layer on top of what is saved (forward working set or backward), per token
        "backward": b["train"]["peak"] - b["train"]["saved"],
        "infer": b["infer"]["peak"],
    }


# head_dim = hidden / heads at every point, as in all three recipe backbones (Qwen2.5-VL's text attention
# does not accept another head_dim); heads x head_dim is then collinear with hidden and lstsq takes the
# minimum-norm solution, exact for such models
TEXT_POINTS = [dict(hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16),
               dict(hidden=128, intermediate=128, heads=4, kv_heads=2, head_dim=32),
               dict(hidden=64, intermediate=384, heads=4, kv_heads=2, head_dim=16),
               dict(hidden=64, intermediate=128, heads=8, kv_heads=2, head_dim=8),
               dict(hidden=64, intermediate=128, heads=4, kv_heads=4, head_dim=16),
               dict(hidden=128, intermediate=256, heads=8, kv_heads=4, head_dim=16)]
VISION_POINTS = [dict(hidden=64, intermediate=128, heads=4), dict(hidden=128, intermediate=128, heads=4),
                 dict(hidden=64, intermediate=384, heads=4), dict(hidden=64, intermediate=128, heads=8),
                 dict(hidden=128, intermediate=256, heads=8)]


def features(dims: dict) -> list[float]:
    """[hidden, intermediate, heads x head_dim, kv_heads x head_dim, heads] of a text or vision block."""
    hd = dims.get("head_dim", dims["hidden"] // dims["heads"])
    return [dims["hidden"], dims["intermediate"], dims["heads"] * hd, dims.get("kv_heads", dims["heads"]) * hd,
            dims["heads"]]


def fit(points: list[dict], measured: list[dict]) -> dict:
    """Least-squares coefficients (bytes per unit of each feature) per quantity, and the worst fit error."""
    x = torch.tensor([features(p) for p in points], dtype=torch.float64)
    out = {}
    for key in measured[0]:
        y = torch.tensor([m[key] for m in measured], dtype=torch.float64)
        coef = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)
        rel = ((x @ coef - y).abs() / y.abs().clamp_min(1e-9)).max().item()
        out[key] = {"coef": [round(c, 4) for c in coef.tolist()], "max_rel_err": round(rel, 4)}
    return out


def calibrate(families=("qwen2_5_vl", "qwen3_vl", "internvl3"), dtypes=("float32", "bfloat16")) -> dict:
    """Measure and fit every family x dtype x {text, vision}; returns the JSON-able calibration table."""
    table = {"features": list(FEATURES), "torch": torch.__version__, "units": "bytes per token (or patch) per "
             "layer per unit of feature; infer and backward are one layer's transient, per token"}
    for family in families:
        for dname in dtypes:
            dtype = getattr(torch, dname)
            text = [measure_point(family, dtype, p) for p in TEXT_POINTS]
            vision = [measure_point(family, dtype, p, vision=True) for p in VISION_POINTS]
            table[f"{family}/{dname}"] = {"text": fit(TEXT_POINTS, text), "vision": fit(VISION_POINTS, vision)}
    return table


def load_calibration() -> dict:
    return json.loads(CALIBRATION_FILE.read_text())


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Re-measure mrpo.plan's per-token activation coefficients (CPU).")
    ap.add_argument("--out", default=str(CALIBRATION_FILE))
    ap.add_argument("--families", nargs="*", default=["qwen2_5_vl", "qwen3_vl", "internvl3"])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    table = calibrate(tuple(args.families))
    Path(args.out).write_text(json.dumps(table, indent=1) + "\n")
    for key, val in table.items():
        if isinstance(val, dict):
            for part in ("text", "vision"):
                errs = {k: v["max_rel_err"] for k, v in val[part].items()}
                print(f"{key} {part}: max fit error {errs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
