"""Each user-caused failure before the first RL step prints one line naming the file, key or row and the
fix, and exits 2 without a traceback; a bug in our code keeps its traceback (python -m mrpo.train, one
process, tiny settings)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(Path(__file__).parent)}


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _image(folder: Path) -> str:
    from PIL import Image

    Image.new("RGB", (32, 32), (90, 90, 90)).save(folder / "img.png")
    return "img.png"


def _no_usable_rows(tmp: Path) -> tuple[dict, list[str]]:
    path = _jsonl(tmp / "train.jsonl", [{"id": f"r{i}", "image": "missing.png", "problem": "Q?", "solution": "yes"}
                                        for i in range(3)])
    return {"data.train_path": path}, [f"data.train_path={path}: 0 usable training records",
                                       "bad_image: 3", "missing.png", "fix the rows or use a larger file"]


def _missing_file(tmp: Path):
    return {"data.train_path": tmp / "nope.jsonl"}, [f"data.train_path={tmp / 'nope.jsonl'}: file not found",
                                                     "python -m mrpo.data prepare"]


def _bad_row_strict(tmp: Path):
    img = _image(tmp)
    path = _jsonl(tmp / "train.jsonl", [{"id": "ok", "image": img, "problem": "Q?", "solution": "yes"},
                                        {"id": "r2", "image": img, "problem": "Q?"}])
    return ({"data.train_path": path, "data.on_bad_row": "error"},
            [f"{path}:2: row 'r2': missing key 'solution'", "data.on_bad_row=skip"])


def _not_utf8(tmp: Path):
    path = tmp / "train.jsonl"
    path.write_bytes(b'{"id": "r1", "problem": "\xff\xfe"}\n')
    return {"data.train_path": path}, [f"data.train_path={path}: not UTF-8 text", "must be UTF-8 JSONL"]


def _prompts_too_long(tmp: Path):
    return {"data.max_prompt_length": 16}, ["training prompts fit data.max_prompt_length=16",
                                            "raise data.max_prompt_length or lower data.max_pixels"]


def _model_missing(tmp: Path):
    return {"model.path": tmp / "nope"}, [f"model.path={tmp / 'nope'}: cannot load the model: model folder not found"]


def _model_incomplete(tmp: Path):
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text("{}")
    return {"model.path": tmp / "model"}, [f"model.path={tmp / 'model'}: cannot load the model", "is incomplete",
                                           "model.safetensors"]


def _labels_missing(tmp: Path):
    return ({"judge.kind": "labels", "judge.labels_path": tmp / "labels.jsonl"},
            [f"judge.kind=labels: judge.labels_path={tmp / 'labels.jsonl'}: LabelsJudge: labels file not found"])


def _lora_targets(tmp: Path):
    return {"lora.rank": 2, "lora.target_modules": "[nope_proj]"}, ["lora.target_modules: ['nope_proj'] match no module"]


def _output_not_a_folder(tmp: Path):
    (tmp / "afile").write_text("")
    return {"output_dir": tmp / "afile" / "run"}, [f"output_dir={tmp / 'afile' / 'run'}: cannot create or lock",
                                                   "choose a writable folder"]


def _bert_not_a_folder(tmp: Path):
    return ({"reward.bert_model_path": tmp / "bert"},
            [f"reward.bert_model_path='{tmp / 'bert'}' is invalid: not a folder", "or null (ROUGE/BLEU fallback)"])


def _image_token_strict(tmp: Path):
    img = _image(tmp)
    path = _jsonl(tmp / "train.jsonl", [{"id": "ok", "image": img, "problem": "Q?", "solution": "yes"},
                                        {"id": "r2", "image": img, "problem": "Is <|image_pad|> a lesion?",
                                         "solution": "yes"}])
    return ({"data.train_path": path, "data.on_bad_row": "error"},
            [f"{path}:2: row 'r2': key 'problem' holds the image placeholder token '<|image_pad|>'",
             "data.on_bad_row=skip"])


def _image_token_skipped(tmp: Path):
    img = _image(tmp)
    path = _jsonl(tmp / "train.jsonl", [{"id": f"r{i}", "image": img, "problem": "<|vision_start|>Q?",
                                         "solution": "yes"} for i in range(3)])
    return {"data.train_path": path}, [f"data.train_path={path}: 0 usable training records",
                                       "image_token_in_text: 3", "key 'problem' holds the image placeholder"]


CASES = {"no_usable_rows": _no_usable_rows, "missing_file": _missing_file, "bad_row_strict": _bad_row_strict,
         "not_utf8": _not_utf8, "prompts_too_long": _prompts_too_long, "model_missing": _model_missing,
         "model_incomplete": _model_incomplete, "labels_missing": _labels_missing, "lora_targets": _lora_targets,
         "output_not_a_folder": _output_not_a_folder, "bert_not_a_folder": _bert_not_a_folder,
         "image_token_strict": _image_token_strict, "image_token_skipped": _image_token_skipped}
SUBPROCESS = {"no_usable_rows", "prompts_too_long",   # the reproductions, through the real entry point
              "labels_missing", "lora_targets"}      # (and the cases that load the model)


def _assert_one_line_error(code: int, stderr: str, expected: list[str]) -> None:
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith(("error: ", "config error: "))]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr[-3000:]
    for part in expected:
        assert part in errors[0], (part, errors[0])


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(SUBPROCESS))
def test_user_error_is_one_line_and_exit_2(shared_data, tmp_path, case):
    overrides, expected = CASES[case](tmp_path)
    run = subprocess.run([sys.executable, "-m", "mrpo.train",
                          *tiny_overrides(shared_data, tmp_path / "run", **{"optim.max_steps": 1, **overrides})],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    _assert_one_line_error(run.returncode, run.stderr, expected)


@pytest.mark.parametrize("case", sorted(set(CASES) - SUBPROCESS))
def test_user_error_is_one_line_and_exit_2_in_process(shared_data, tmp_path, case, capfd):
    """The same through mrpo.train.main in this process (no interpreter start-up per case)."""
    from mrpo.train import main

    overrides, expected = CASES[case](tmp_path)
    code = main(tiny_overrides(shared_data, tmp_path / "run", **{"optim.max_steps": 1, **overrides}))
    _assert_one_line_error(code, capfd.readouterr().err, expected)


@pytest.mark.slow
def test_user_error_is_the_last_line_of_a_combined_log(shared_data, tmp_path):
    """stdout and stderr in one stream (a log file, `2>&1`): the resolved configuration and the memory plan
    first, the error last; here the prompts fail during the warm-up, whose progress bar closes (and prints)
    when the failed start-up is collected: that happens before the error line, not after it."""
    overrides, expected = CASES["prompts_too_long"](tmp_path)
    run = subprocess.run([sys.executable, "-m", "mrpo.train",
                          *tiny_overrides(shared_data, tmp_path / "run", **{"optim.max_steps": 1, "logging.progress": True,
                                                                            **overrides})],
                         cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert run.returncode == 2, run.stdout[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    assert lines[0] == "resolved config:"
    assert lines[-1].startswith("error: ") and all(part in lines[-1] for part in expected), lines[-5:]
    assert any("memory plan" in line for line in lines[:-1])
    assert sum(line.startswith("error: ") for line in lines) == 1


@pytest.mark.slow
def test_a_bug_keeps_its_traceback(shared_data, tmp_path):
    run = subprocess.run([sys.executable, "-m", "mrpo.train",
                          *tiny_overrides(shared_data, tmp_path / "run", **{"optim.max_steps": 1})],
                         cwd=REPO, env={**ENV, "MRPO_TEST_HOOK": "fault_hooks:raise_a_bug"},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 1
    assert "Traceback" in run.stderr and "ValueError: a bug in our code" in run.stderr
