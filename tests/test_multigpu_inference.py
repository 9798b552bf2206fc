"""inference_multigpu_demo.py with two CPU processes: every question answered once, in input order, with the
answers single-process inference.py gives; a rerun answers only what is missing."""

import json

from conftest import TORCHRUN, run_script

QUESTIONS = ["What causes anemia?", "高血压怎么办？", "Is fever dangerous?", "What is insulin?", "咳嗽两周了",
             "How much water a day?", "Why do joints ache?"]  # an odd number: the shards differ in size


def rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_two_processes_answer_in_input_order_and_resume(tiny_model_dir, random_adapter, tmp_path):
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": q}, ensure_ascii=False) + "\n" for q in QUESTIONS), encoding="utf-8")
    model = ["--base_model", tiny_model_dir, "--lora_model", random_adapter, "--template_name", "chatml",
             "--max_new_tokens", "6", "--temperature", "0", "--batch_size", "2", "--data_file", str(questions)]
    single = tmp_path / "single.jsonl"
    result = run_script("inference.py", *model, "--output_file", str(single))
    assert result.returncode == 0, result.stderr[-3000:]

    parallel = tmp_path / "parallel.jsonl"
    result = run_script("inference_multigpu_demo.py", *model, "--output_file", str(parallel), launcher=TORCHRUN)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = rows(parallel)
    assert [row.pop("index") for row in answers] == list(range(len(QUESTIONS)))
    assert answers == rows(single)
    assert not list(tmp_path.glob("parallel.jsonl.rank*"))  # partial files are gone

    kept = parallel.read_text(encoding="utf-8").splitlines()[::2]  # delete every other answer
    parallel.write_text("\n".join(kept) + "\n", encoding="utf-8")
    result = run_script("inference_multigpu_demo.py", *model, "--output_file", str(parallel), launcher=TORCHRUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "7 questions, 4 answered before, 3 to answer on 2 process(es)" in result.stderr
    assert [{k: v for k, v in row.items() if k != "index"} for row in rows(parallel)] == rows(single)
