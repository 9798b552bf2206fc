"""vLLM serving and batch inference. They need a CUDA GPU and .venv-vllm (bash scripts/setup_env.sh --vllm):
without them the end-to-end test is skipped with the reason, and what runs everywhere is checked here: the
scripts refuse clearly when vLLM is missing."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

VLLM_PYTHON = os.path.join(REPO, ".venv-vllm", "bin", "python")


def test_without_vllm_the_scripts_say_what_to_do(tiny_model_dir, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "What is a fever?"}) + "\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "scripts/vllm_batch_inference.py", "--model", tiny_model_dir,
                             "--data_file", str(questions), "--output_file", str(tmp_path / "a.jsonl")],
                            cwd=REPO, capture_output=True, text=True)
    if result.returncode == 0:
        pytest.skip("vllm is importable here")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: vllm is not installed")
    assert not (tmp_path / "a.jsonl").exists()
    env = dict(os.environ, VLLM_PYTHON=str(tmp_path / "no-venv" / "python"), MODEL=tiny_model_dir)
    result = subprocess.run(["bash", "scripts/serve_vllm.sh"], cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "setup_env.sh --vllm" in result.stderr


@pytest.mark.skipif(not (os.path.exists(VLLM_PYTHON) and shutil.which("nvidia-smi")),
                    reason="needs a CUDA GPU and .venv-vllm (bash scripts/setup_env.sh --vllm)")
def test_vllm_batch_answers_in_inference_format(tiny_model_dir, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question": q, "answer": "x"}) + "\n" for q in ("Fever?", "Cough?")),
                         encoding="utf-8")
    result = subprocess.run([VLLM_PYTHON, "scripts/vllm_batch_inference.py", "--model", tiny_model_dir,
                             "--data_file", str(questions), "--output_file", str(tmp_path / "a.jsonl"),
                             "--max_new_tokens", "8", "--max_model_len", "512"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["input"] for row in rows] == ["Fever?", "Cough?"] and all(row["reference"] == "x" for row in rows)
