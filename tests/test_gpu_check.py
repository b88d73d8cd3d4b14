"""benchmarks/gpu_check.py helpers: the wheels step unpacks only what does not import (the machine's own
packages win, wheels for another CPython are left out), and the report's ratios against the targets."""
import csv
import json
import sys
import types
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def _wheel(folder: Path, name: str, files: dict) -> Path:
    path = folder / name
    with zipfile.ZipFile(path, "w") as z:
        for n, text in files.items():
            z.writestr(n, text)
    return path


def test_unpack_wheels_only_missing(tmp_path, monkeypatch, capsys):
    wheels, site = tmp_path / "w", tmp_path / "site"
    wheels.mkdir()
    _wheel(wheels, "json-9.9-py3-none-any.whl", {"json/__init__.py": "X = 1\n"})          # importable: kept
    _wheel(wheels, "zz_mrpo_missing-1.0-py3-none-any.whl", {"zz_mrpo_missing/__init__.py": "X = 2\n",
                                                            "zz_mrpo_missing-1.0.dist-info/METADATA": ""})
    _wheel(wheels, "zz_binary-1.0-cp27-cp27-manylinux1_x86_64.whl", {"zz_binary/__init__.py": ""})   # other Python
    gpu_check.unpack_wheels(wheels, site)
    assert (site / "zz_mrpo_missing" / "__init__.py").exists()
    assert not (site / "json").exists() and not (site / "zz_binary").exists()
    msg = capsys.readouterr().out
    assert "zz_mrpo_missing-1.0-py3-none-any.whl" in msg and "not for this Python" in msg
    assert gpu_check.wheel_modules(wheels / "zz_mrpo_missing-1.0-py3-none-any.whl") == ["zz_mrpo_missing"]


def test_report_ratios(tmp_path):
    out = tmp_path
    rows = [("ours-triton", "time", 11.0), ("bound", "time", 10.0), ("liger", "time", 20.0),
            ("ours-triton", "peak_mem_extra", 900.0), ("liger", "peak_mem_extra", 1000.0), ("bound", "peak_mem_extra", 5.0)]
    with open(out / "loss_h200.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["provider", "mode", "metric", "p50"])
        w.writeheader()
        w.writerows({"provider": p, "mode": "fwd+bwd", "metric": m, "p50": v} for p, m, v in rows)
    (out / "model").mkdir()
    (out / "model" / "gpu_model.json").write_text(json.dumps({"params": 10, "decode_weight_bytes": 4e9}))
    (out / "step.json").write_text(json.dumps({"decode": "eager", "step_s": 2.0, "phases": {"generate": 1.5},
                                               "tokens_per_s": 100.0, "padding_fraction": 0.1,
                                               "allgathers_per_rollout": "n/a", "decode_ms_per_token": 5.0}))
    (out / "packing.json").write_text(json.dumps({"packed_kernel": "torch_varlen", "packed_s": 0.8, "padded_s": 1.0,
                                                  "ratio_p50": 0.8, "dtype": "bfloat16", "logprob_max_abs_diff": 0.03}))
    (out / "plan.json").write_text(json.dumps({"phases": {
        "rollout": {"planned_gib": 5.0, "measured_gib": 4.5, "error": 0.111},
        "train": {"planned_gib": 7.0, "measured_gib": 5.0, "error": 0.4}}}))
    args = types.SimpleNamespace(out=str(out), dry_run=False, tag="h200", budget_s=480.0)
    runner = types.SimpleNamespace(results={"env": {"status": "ok"}}, t0=0.0)
    gpu_check.report(args, runner, {"torch": "x"}, {"gb_per_s": 4000.0})
    got = {r["metric"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert got["plan rollout error"]["value"] == "11.1" and got["plan rollout error"]["met"] == "yes"
    assert got["plan train error"]["met"] == "no" and got["plan train measured"]["value"] == "5.0"
    assert got["loss ours / 3 GEMMs"]["value"] == "1.1" and got["loss ours / 3 GEMMs"]["met"] == "yes"
    assert got["loss peak mem ours / liger"]["met"] == "yes"
    # 4e9 bytes at 4000 GB/s = 1 ms; 5 ms per decode step = 5x > 3x
    assert got["step weights read once at measured bandwidth"]["value"] == "1.0"
    assert got["step decode / weight read"]["value"] == "5.0" and got["step decode / weight read"]["met"] == "no"
    assert got["packing packed / padded loss+backward"]["value"] == "0.8"
    assert got["packing packed / padded loss+backward"]["met"] == "yes"
    assert got["packing loss+backward packed (torch_varlen)"]["value"] == "0.8"
    assert got["packing log-probs packed vs padded, max abs diff (bfloat16)"]["value"] == "0.03"


def test_hbm_bandwidth_table_flag_and_fallback():
    assert gpu_check.hbm_gbs("NVIDIA H200") == (4800.0, "peak HBM of H200")
    assert gpu_check.hbm_gbs("NVIDIA H100 80GB HBM3")[0] == 3350.0
    assert gpu_check.hbm_gbs("NVIDIA H100 PCIe")[0] == 2000.0
    assert gpu_check.hbm_gbs("NVIDIA H200", flag=1000.0) == (1000.0, "--hbm-gbs")
    assert gpu_check.hbm_gbs("cpu", measured=20.0) == (20.0, "measured copy")
    assert gpu_check.hbm_gbs("cpu") == (None, "unknown")


def test_report_decode_stage(tmp_path):
    (tmp_path / "decode.json").write_text(json.dumps({
        "device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16", "rows": 16, "prompts": 2, "new_tokens": 128,
        "reps": 3, "call_s": 0.5, "tokens_per_s": 4000.0, "decode_step_ms": 2.0, "prefill_s": 0.02,
        "decode_steps": 127, "graph_captures": 3, "compactions": 2, "weight_bytes": 3.35e9}))
    args = types.SimpleNamespace(out=str(tmp_path), dry_run=False, tag="cuda", budget_s=480.0, hbm_gbs=None)
    gpu_check.report(args, types.SimpleNamespace(results={}, t0=0.0), {}, {"gb_per_s": 2500.0})
    got = {r["metric"]: r["value"] for r in csv.DictReader(open(tmp_path / "summary.csv"))}
    # 3.35e9 bytes at the H100's 3350 GB/s = 1 ms per step; 2 ms measured = 2x
    assert got["decode loop weight-read bound (3350 GB/s, peak HBM of H100)"] == "1.0"
    assert got["decode loop step / weight-read bound"] == "2.0"
    assert got["decode loop graph captures per call"] == "3"
    assert got["decode loop tokens/s (16 rows, 128 new tokens, bfloat16)"] == "4000.0"


def test_decode_stage_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu_decode.py on the tiny GPU-shaped model on the CPU: the stage's JSON is complete."""
    import pytest
    import subprocess

    pytest.importorskip("mrpo.models.decode")
    import torch

    import gpu_models

    path = gpu_models.make_qwen2_5_vl_1b(tmp_path / "model", size="tiny", dtype=torch.float32, device="cpu")["path"]
    out = tmp_path / "decode.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_decode.py"), path, "--json", str(out),
                           "--new-tokens", "6", "--reps", "1", "--threads", "1", "--group", "2"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["rows"] == 4 and s["graph_captures"] == 0 and s["device"] == "cpu" and s["tokens_per_s"] > 0
    assert 0 < s["weight_bytes"] < sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
