"""Checkpoint integrity, crash-safe writes and the disk-space check (mrpo.checkpoint), without a model:
the engine's writer is a stand-in that saves one tensor file."""
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mrpo import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
SHARD = "__0_0.distcp"


def _weights(seed: int):
    def save(folder: Path) -> None:
        g = torch.Generator().manual_seed(seed)
        torch.save({"w": torch.randn(64, 64, generator=g)}, folder / SHARD)
        (folder / ".metadata").write_bytes(b"meta" * 10)
    return save


def _save(root, step, keep_last=5, **kw):
    return ckpt.write_checkpoint(root, step, _weights(step), {"step": step}, keep_last, **kw)


def test_marker_records_size_and_crc32_of_every_file(tmp_path):
    path = _save(tmp_path, 3)
    manifest = json.loads((path / "COMPLETE").read_text())
    assert manifest["step"] == 3 and manifest["checksum"] == "crc32"
    assert sorted(manifest["files"]) == [".metadata", SHARD, "rng_rank0.pt", "trainer_state.pt"]
    for rel, rec in manifest["files"].items():
        data = (path / rel).read_bytes()
        import zlib
        assert rec == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    assert ckpt.verify_checkpoint(path) is None


@pytest.mark.parametrize("damage, expected", [
    ("truncate", f"{SHARD}: size mismatch"),
    ("delete", f"{SHARD}: missing"),
    ("flip", "trainer_state.pt: checksum mismatch"),
    ("marker", "COMPLETE: missing"),
])
def test_verify_names_the_file_at_fault(tmp_path, damage, expected):
    path = _save(tmp_path, 1)
    shard, state = path / SHARD, path / "trainer_state.pt"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "delete":
        shard.unlink()
    elif damage == "flip":
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))
    else:
        (path / "COMPLETE").unlink()
    assert ckpt.verify_checkpoint(path).startswith(expected)


def test_auto_falls_back_to_the_newest_intact_and_moves_broken_ones(tmp_path, caplog):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    shard = tmp_path / "step_000003" / SHARD
    shard.write_bytes(shard.read_bytes()[:100])
    (tmp_path / "step_000002" / SHARD).unlink()
    with caplog.at_level(logging.WARNING, logger="mrpo"):
        assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "step_000001"
    assert sorted(p.name for p in (tmp_path / "broken").iterdir()) == ["step_000002", "step_000003"]
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_000001"]
    assert f"step_000003 is broken ({SHARD}: size mismatch" in caplog.text
    assert f"step_000002 is broken ({SHARD}: missing)" in caplog.text
    # a second broken copy of the same step keeps both in broken/
    _save(tmp_path, 3)
    (tmp_path / "step_000003" / SHARD).unlink()
    assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "step_000001"
    assert (tmp_path / "broken" / "step_000003.1").is_dir()


def test_explicit_broken_checkpoint_is_an_error_naming_the_file(tmp_path):
    path = _save(tmp_path, 1)
    (path / "rng_rank0.pt").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint.resume=.*step_000001: broken checkpoint: "
                                                   r"rng_rank0.pt: missing"):
        ckpt.resolve_resume(str(path), tmp_path)
    assert path.is_dir()   # an explicit path is never moved
    with pytest.raises(ckpt.CheckpointError, match="is not a folder"):
        ckpt.resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_earlier_marker_without_checksums_still_loads_presence_checked(tmp_path, caplog):
    path = _save(tmp_path, 1)
    (path / "COMPLETE").write_text("1\n")        # what earlier versions wrote
    shard = path / SHARD
    shard.write_bytes(shard.read_bytes()[:10])   # cannot be seen without checksums
    with caplog.at_level(logging.INFO, logger="mrpo"):
        assert ckpt.resolve_resume("auto", tmp_path) == path
    assert "no checksums (written by an earlier version)" in caplog.text
    (path / "trainer_state.pt").unlink()
    assert ckpt.verify_checkpoint(path) == "trainer_state.pt: missing"


def test_crash_while_writing_leaves_no_complete_checkpoint_and_keeps_the_previous(tmp_path):
    _save(tmp_path, 1, keep_last=1)

    def crashing(folder):
        _weights(2)(folder)
        raise KeyboardInterrupt("killed mid-save")   # stands in for SIGKILL after the shards are written

    with pytest.raises(KeyboardInterrupt):
        ckpt.write_checkpoint(tmp_path, 2, crashing, {"step": 2}, keep_last=1)
    assert (tmp_path / "step_000002.tmp" / SHARD).is_file()
    assert not (tmp_path / "step_000002.tmp" / "COMPLETE").exists()
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_000001"]   # keep_last=1 kept it
    assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "step_000001"
    assert not (tmp_path / "step_000002.tmp").exists()   # cleaned at the next start
    _save(tmp_path, 2, keep_last=1)                      # the next save prunes only once it is complete
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_000002"]


def test_replacing_a_checkpoint_of_the_same_step_cut_between_the_renames(tmp_path):
    _save(tmp_path, 4)
    (tmp_path / "step_000004").rename(tmp_path / "step_000004.replaced")   # the kill came between the renames
    ckpt.clean_partial(tmp_path)
    assert ckpt.verify_checkpoint(tmp_path / "step_000004") is None
    assert not (tmp_path / "step_000004.replaced").exists()
    _save(tmp_path, 4)   # a normal replacement leaves one intact folder
    assert [p.name for p in tmp_path.iterdir()] == ["step_000004"]


def test_short_disk_skips_the_checkpoint_naming_folder_and_bytes(tmp_path, monkeypatch, caplog):
    _save(tmp_path, 1)
    needed = ckpt.checkpoint_bytes(tmp_path / "step_000001")
    free = needed // 2
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 * needed, 9 * needed, free))
    called = []
    with caplog.at_level(logging.ERROR, logger="mrpo"):
        got = ckpt.write_checkpoint(tmp_path, 2, lambda f: called.append(f), {"step": 2}, keep_last=1)
    assert got is None and not called
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]   # nothing partial, nothing pruned
    msg = caplog.text
    assert f"not enough disk space for checkpoint step 2 in {tmp_path}" in msg
    assert f"({int(needed * 1.1)} bytes" in msg and f"({free} bytes) free" in msg and "checkpoint skipped" in msg
    # before the first checkpoint the caller's estimate is used
    assert ckpt.write_checkpoint(tmp_path / "fresh", 1, called.append, {}, 1, expected_bytes=free) is None
    assert ckpt.write_checkpoint(tmp_path / "fresh", 1, _weights(1), {}, 1, expected_bytes=free // 2) is not None


def test_export_is_skipped_when_the_disk_is_short(tmp_path, monkeypatch, caplog):
    from mrpo.engines.base import Engine

    state = {"w": torch.zeros(1024, 1024)}   # 4 MiB
    assert Engine._room_for_export(state, tmp_path / "final_model")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(2**40, 2**40, 2**20))
    with caplog.at_level(logging.ERROR, logger="mrpo"):
        assert not Engine._room_for_export(state, tmp_path / "final_model")
    assert f"the exported model in {tmp_path}" in caplog.text and "export skipped" in caplog.text
    assert not (tmp_path / "final_model").exists()


@pytest.mark.slow
def test_all_ranks_agree_on_the_checkpoint_they_verified_together(tmp_path):
    """Two gloo ranks verify a share each: a flipped byte (same size) only its owner checksums is still seen by
    both; only rank 0 moves the broken checkpoint; both resume from the same one, and an explicit broken
    path fails on both ranks."""
    root = tmp_path / "ckpts"
    for step in (1, 2):
        _save(root, step)
    shard = root / "step_000002" / SHARD
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    script = tmp_path / "w.py"
    script.write_text(
        "import sys\n"
        "import torch.distributed as dist\n"
        "from mrpo import checkpoint as ckpt\n"
        "dist.init_process_group('gloo')\n"
        f"path = ckpt.resolve_resume('auto', {str(root)!r})\n"
        "try:\n"
        f"    ckpt.resolve_resume({str(root / 'broken' / 'step_000002')!r}, {str(root)!r})\n"
        "    err = None\n"
        "except ckpt.CheckpointError as e:\n"
        "    err = str(e)\n"
        "print(f'rank{dist.get_rank()} path={path.name} err={err}', flush=True)\n"
        "dist.destroy_process_group()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for r in (0, 1):
        assert f"rank{r} path=step_000001 err=checkpoint.resume=" in run.stdout
    assert run.stdout.count(f"{SHARD}: checksum mismatch") == 2
    assert (root / "broken" / "step_000002").is_dir() and not (root / "broken" / "step_000002.1").exists()


def test_first_checkpoint_estimate_matches_a_real_save(tmp_path):
    """Before the first checkpoint the space check uses the engine's estimate: weights + two fp32 AdamW
    moments per trainable parameter; a real DCP save of a small model holds about that."""
    from types import SimpleNamespace

    from mrpo.engines.single import SingleEngine

    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 8))
    model[1].requires_grad_(False)   # frozen weights are saved, without optimizer state
    optim = SimpleNamespace(lr=1e-3, adam_betas=(0.9, 0.999), adam_eps=1e-8, weight_decay=0.0, max_grad_norm=1.0)
    engine = SingleEngine(model, None, SimpleNamespace(optim=optim), torch.device("cpu"))
    model(torch.randn(4, 256)).sum().backward()
    engine.step()   # the AdamW moments exist
    estimate = engine.checkpoint_bytes()
    assert estimate == 65792 * (4 + 8) + 2056 * 4
    path = engine.save(tmp_path, 1, {"step": 1}, keep_last=1)
    actual = ckpt.checkpoint_bytes(path)
    assert estimate <= actual <= 1.05 * estimate + 64 * 2**10, (estimate, actual)


# ---------------------------------------------------------------------------------------------- issue 29
def _names(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def test_rewind_moves_later_checkpoints_aside_and_retention_counts_the_new_timeline(tmp_path, caplog):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step)
    with caplog.at_level(logging.WARNING, logger="mrpo"):
        assert ckpt.resolve_resume(str(tmp_path / "step_000002"), tmp_path) == tmp_path / "step_000002"
    assert _names(tmp_path / "abandoned") == ["step_000003", "step_000004"]
    assert f"rewind to {tmp_path / 'step_000002'}" in caplog.text
    assert str(tmp_path / "abandoned" / "step_000004") in caplog.text   # named in the log
    _save(tmp_path, 9)
    (tmp_path / "step_000009").rename(tmp_path / "step_000009.replaced")   # a replacement cut between its renames
    ckpt.resolve_resume(str(tmp_path / "step_000002"), tmp_path)          # settled first, then set aside
    assert _names(tmp_path / "abandoned") == ["step_000003", "step_000004", "step_000009"]
    _save(tmp_path, 3, keep_last=2)          # the new timeline: retention keeps its own 2 and 3
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "step_000003"   # never the abandoned step 4
    _save(tmp_path, 4, keep_last=2)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_000003", "step_000004"]
    # rewinding again keeps both abandoned copies of step 4; resume=none abandons the whole timeline
    ckpt.resolve_resume(str(tmp_path / "step_000003"), tmp_path)
    assert (tmp_path / "abandoned" / "step_000004.1").is_dir()
    assert ckpt.resolve_resume("none", tmp_path) is None
    assert ckpt.complete_checkpoints(tmp_path) == [] and (tmp_path / "abandoned" / "step_000003.1").is_dir()
    assert ckpt.resolve_resume("auto", tmp_path) is None   # nothing on the current timeline: a new run
    # resuming an abandoned checkpoint sets aside the current timeline's own folder of that step too
    _save(tmp_path, 3)
    _save(tmp_path, 4)
    again = tmp_path / "abandoned" / "step_000003"
    assert ckpt.resolve_resume(str(again), tmp_path) == again
    assert ckpt.complete_checkpoints(tmp_path) == [] and (tmp_path / "abandoned" / "step_000003.2").is_dir()


@pytest.mark.parametrize("marker, why", [
    ('{"step": 1, "checksum": "crc32", "fi', "truncated or garbage"),
    ("", "truncated or garbage"),
    ("\x00\x17garbage", "truncated or garbage"),
    ('{"step": 1}', "without a valid 'files' table"),
    ('{"files": {"trainer_state.pt": {"size": "12"}}}', "without a valid 'files' table"),
    ("7\n", "records step 7 in the folder of step 1"),
])
def test_a_marker_that_is_neither_manifest_nor_old_format_is_broken(tmp_path, marker, why, caplog):
    path = _save(tmp_path, 1)
    (path / "COMPLETE").write_text(marker)
    problem = ckpt.verify_checkpoint(path)
    assert problem.startswith("COMPLETE: ") and why in problem
    _save(tmp_path, 0)
    with caplog.at_level(logging.WARNING, logger="mrpo"):
        assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "step_000000"
    assert f"step_000001 is broken ({problem}): skipped" in caplog.text
    assert (tmp_path / "broken" / "step_000001").is_dir()


def test_no_intact_checkpoint_stops_instead_of_starting_over(tmp_path):
    for step in (1, 2):
        _save(tmp_path, step)
    (tmp_path / "step_000002" / SHARD).unlink()
    (tmp_path / "step_000001" / "COMPLETE").write_text("{trunc")
    (tmp_path / "step_000003").mkdir()    # a step folder without a marker is named too
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.resolve_resume("auto", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"checkpoint.resume=auto: no intact checkpoint in {tmp_path}")
    assert "step_000003: COMPLETE: missing" in msg and f"step_000002: {SHARD}: missing" in msg
    assert "step_000001: COMPLETE: neither a manifest" in msg
    assert "fresh output_dir or checkpoint.resume=none" in msg
    assert _names(tmp_path) == ["step_000001", "step_000002", "step_000003"]   # left in place: a rerun says it again
    with pytest.raises(ckpt.CheckpointError):
        ckpt.resolve_resume("auto", tmp_path)
    assert ckpt.resolve_resume("none", tmp_path) is None                      # starting over on purpose
    assert _names(tmp_path) == ["abandoned"]


def test_each_save_is_logged_with_step_size_and_seconds(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="mrpo"):
        path = _save(tmp_path, 5)
    mib = ckpt.checkpoint_bytes(path) / 2**20
    assert f"saved checkpoint {path}: step 5, {mib:.1f} MiB, " in caplog.text
    assert caplog.text.count("saved checkpoint") == 1 and caplog.text.rstrip().endswith(" s")


def test_files_are_split_over_ranks_by_bytes_and_each_rank_checks_its_share(tmp_path):
    sizes = {"a": 100, "b": 100, "c": 10, "d": 10, "e": 1}
    shares = [ckpt.share(sizes, r, 2) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(sizes) and not set(shares[0]) & set(shares[1])
    assert {sum(sizes[f] for f in s) for s in shares} == {111, 110}
    assert ckpt.share(sizes, 0, 1) == ["a", "b", "c", "d", "e"]
    path = _save(tmp_path, 1)
    data = bytearray((path / SHARD).read_bytes())
    data[100] ^= 0xFF
    (path / SHARD).write_bytes(bytes(data))          # same size: only the rank holding it sees the damage
    manifest = ckpt.read_manifest(path)
    owner = next(r for r in range(2) if SHARD in ckpt.share({k: v["size"] for k, v in manifest["files"].items()}, r, 2))
    assert ckpt.verify_checkpoint(path, owner, 2).startswith(f"{SHARD}: checksum mismatch")
    assert ckpt.verify_checkpoint(path, 1 - owner, 2) is None
    assert ckpt.verify_together(path).startswith(f"{SHARD}: checksum mismatch")   # one process: all of it


def test_folder_creation_and_moves_fsync_the_parent(tmp_path, monkeypatch):
    synced = []
    real = ckpt._fsync_dir
    monkeypatch.setattr(ckpt, "_fsync_dir", lambda p: (synced.append(Path(p)), real(p)))
    root = tmp_path / "out" / "checkpoints"
    _save(root, 1)
    assert tmp_path in synced and tmp_path / "out" in synced   # the new folders' parents
    assert synced.count(root) >= 2                              # step_000001.tmp created, renamed into place
    synced.clear()
    _save(root, 2)
    (root / "step_000002" / SHARD).unlink()
    ckpt.resolve_resume("auto", root)                           # step 2 moves to broken/
    assert root / "broken" in synced and root in synced
