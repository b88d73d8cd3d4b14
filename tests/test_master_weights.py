"""fp32 master weights in one process (mrpo/engines/master.py): a bf16 model's lr-1e-6 AdamW update is
kept, checkpoints hold the fp32 masters and resume exactly, the export is bf16."""
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp

from mrpo.engines import single
from mrpo.engines.master import MasterWeights
from mrpo.engines.single import SingleEngine

OPTIM = SimpleNamespace(lr=1e-6, adam_betas=(0.9, 0.999), adam_eps=1e-8, weight_decay=0.0, max_grad_norm=1.0)


def bf16_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    return model.to(torch.bfloat16)


def backward(model: torch.nn.Module, seed: int, micro_batches: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(micro_batches):   # gradients of several micro-batches accumulate
        x = torch.randn(16, 64, generator=g).bfloat16()
        model(x).float().square().mean().backward()


def trained_weights(engine: SingleEngine) -> dict[str, torch.Tensor]:
    """The weights the optimizer steps on: the fp32 masters, or the parameters themselves without them."""
    with engine.master.masters_in():
        return {n: p.detach().clone() for n, p in engine.model.named_parameters()}


def moved_fraction(with_master: bool, monkeypatch) -> float:
    """Share of the weights with a non-zero gradient that one AdamW step at lr 1e-6 changes (AdamW without
    weight decay cannot move a weight whose gradient is exactly 0: 1 of the 4680 here)."""
    if not with_master:   # the engine as it was: AdamW directly on the bf16 parameters
        monkeypatch.setattr(single, "MasterWeights", lambda params: MasterWeights([]))
    engine = SingleEngine(bf16_model(), None, SimpleNamespace(optim=OPTIM), torch.device("cpu"))
    before = trained_weights(engine)
    backward(engine.model, seed=1)
    engine.step = _keep_grads(engine)
    norm, applied = engine.step()
    assert applied and norm > 0
    after = trained_weights(engine)
    nonzero = {n: g != 0 for n, g in engine.seen_grads.items()}
    assert sum(int(m.sum()) for m in nonzero.values()) >= 0.999 * sum(t.numel() for t in before.values())
    moved = sum(int((after[n] != before[n])[nonzero[n]].sum()) for n in before)
    return moved / sum(int(m.sum()) for m in nonzero.values())


def _keep_grads(engine):
    """engine.step that first records the step's (fp32 or bf16) gradients as engine.seen_grads."""
    step = engine.step

    def recording():
        names = [n for n, _ in engine.model.named_parameters()]
        if engine.master:
            engine.seen_grads = dict(zip(names, (g.clone() for g in engine.master.grads)))
        else:
            engine.seen_grads = {n: p.grad.clone() for n, p in engine.model.named_parameters()}
        return step()
    return recording


def test_every_weight_moves_at_lr_1e6_in_bf16(monkeypatch):
    assert moved_fraction(True, monkeypatch) == 1.0


def test_without_master_weights_the_update_rounds_away(monkeypatch):
    """The check above can fail: AdamW on the bf16 weights themselves keeps almost no update."""
    assert moved_fraction(False, monkeypatch) < 0.05


def test_masters_fp32_forward_bf16_export_rounded():
    engine = SingleEngine(bf16_model(), None, SimpleNamespace(optim=OPTIM), torch.device("cpu"))
    backward(engine.model, seed=1)
    engine.step()
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}   # forwards in model.dtype
    assert all(p.grad is None for p in engine.model.parameters())
    masters = trained_weights(engine)
    assert {t.dtype for t in masters.values()} == {torch.float32}
    assert {v.dtype for s in engine.optimizer.state.values() for k, v in s.items() if k != "step"} == {torch.float32}
    export = engine.full_state_dict()
    for name, t in export.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, masters[name].bfloat16())


def test_gradients_accumulate_in_fp32():
    """The step's gradient is the fp32 sum of the micro-batches' gradients (each computed in bf16)."""
    engine = SingleEngine(bf16_model(), None, SimpleNamespace(optim=OPTIM), torch.device("cpu"))
    reference = bf16_model()
    g = torch.Generator().manual_seed(3)
    expected = None
    for _ in range(3):
        x = torch.randn(16, 64, generator=g).bfloat16()
        engine.model(x).float().square().mean().backward()
        reference(x).float().square().mean().backward()
        grads = [p.grad.float() for p in reference.parameters()]
        expected = grads if expected is None else [e + gr for e, gr in zip(expected, grads)]
        reference.zero_grad(set_to_none=True)
    for got, want in zip(engine.master.grads, expected):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("warmup", [False, True])
def test_checkpoint_holds_fp32_masters_and_resumes_exactly(tmp_path, warmup):
    cfg = SimpleNamespace(optim=OPTIM)
    engine = SingleEngine(bf16_model(), None, cfg, torch.device("cpu"))
    if warmup:   # the supervised warm-up steps the masters too
        opt = engine.warmup_optimizer(lr=1e-6)
        backward(engine.model, seed=7)
        opt.step()
        opt.close()
    backward(engine.model, seed=1)
    engine.step()
    path = engine.save(tmp_path, 1, {"step": 1}, keep_last=2)
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    assert stored["model.0.weight"].properties.dtype == torch.float32
    assert stored["optim.state.0.weight.exp_avg"].properties.dtype == torch.float32

    resumed = SingleEngine(bf16_model(seed=5), None, cfg, torch.device("cpu"))   # other initial weights
    assert resumed.load(path)["step"] == 1
    for name, t in trained_weights(engine).items():
        assert torch.equal(trained_weights(resumed)[name], t), name
    assert {p.dtype for p in resumed.model.parameters()} == {torch.bfloat16}
    for model in (engine, resumed):   # the next step is identical
        backward(model.model, seed=2)
        model.step()
    for name, t in trained_weights(engine).items():
        assert torch.equal(trained_weights(resumed)[name], t), name
        assert torch.equal(dict(resumed.model.named_parameters())[name], t.bfloat16())


def test_fp32_model_and_lora_have_no_masters():
    model = torch.nn.Linear(8, 8)
    engine = SingleEngine(model, None, SimpleNamespace(optim=OPTIM), torch.device("cpu"))
    assert not engine.master
    half = torch.nn.Linear(8, 8).bfloat16().requires_grad_(False)   # frozen bf16 base, fp32 adapter
    adapter = torch.nn.Linear(8, 8)
    engine = SingleEngine(torch.nn.Sequential(half, adapter), None, SimpleNamespace(optim=OPTIM), torch.device("cpu"))
    assert not engine.master
