"""scripts/build_data.sh end to end on the shipped samples, with an OpenAI-speaking stub writing the pairs:
every stage's output is where the next expects it, the result trains with run_sft.sh, and a second run
rebuilds the same files and asks the endpoint nothing new."""

import json
import os
import subprocess
import sys

from conftest import REPO
from openai_stub import StubEndpoint
from test_qa_generation import grounded_reply


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def run(script: str, env: dict) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **env)
    return subprocess.run(["bash", os.path.join(REPO, "scripts", script)], env=full_env, capture_output=True,
                          text=True, timeout=900)


def test_build_data_makes_sft_data_that_trains(tiny_model_dir, tmp_path):
    out = tmp_path / "data"
    settings = {"OUT": str(out), "API_MODEL": "stub-writer", "CASES_PER_DISEASE": "2", "EXTRA_SFT": ""}
    with StubEndpoint(grounded_reply) as stub:
        result = run("build_data.sh", {**settings, "API_BASE": stub.url})
        assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
        first_requests = len(stub.server.requests)

        corpus = read_jsonl(out / "pretrain" / "corpus.jsonl")
        assert len(corpus) == 11 and all(record["pmid"].startswith("900000") for record in corpus)
        assert first_requests == len(corpus)  # one request per abstract
        pairs = read_jsonl(out / "qa.jsonl")
        assert {pair["source_id"] for pair in pairs} == {record["pmid"] for record in corpus}
        assert len(read_jsonl(out / "cases.jsonl")) == 6 * 2 * 2
        kept = read_jsonl(out / "deduplicated.jsonl")
        train = read_jsonl(out / "sft" / "train.jsonl")
        validation = read_jsonl(out / "sft_validation" / "validation.jsonl")
        assert len(train) + len(validation) == len(kept) and 1 <= len(validation) <= len(kept) // 5
        assert {record["source_id"] for record in train + validation if "source_id" in record} <= {
            record["pmid"] for record in corpus}
        stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
        assert stats["records"] == len(train)
        assert "TRAIN_DIR=" + str(out / "sft") in result.stdout

        again = run("build_data.sh", {**settings, "API_BASE": stub.url})
        assert again.returncode == 0, again.stderr[-3000:]
        assert len(stub.server.requests) == first_requests  # every source was finished: nothing asked again
    assert read_jsonl(out / "sft" / "train.jsonl") == train

    trained = run("run_sft.sh", {"MODEL": tiny_model_dir, "TRAIN_DIR": str(out / "sft"),
                                 "EVAL_DIR": str(out / "sft_validation"), "OUTPUT_DIR": str(tmp_path / "sft"),
                                 "MAX_STEPS": "2", "MAX_LENGTH": "256", "BATCH_SIZE": "2"})
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert f"train: read {len(train)} records, kept {len(train)}" in trained.stderr
    assert os.path.isfile(tmp_path / "sft" / "adapter_model.safetensors")


def test_build_data_refuses_an_endpoint_without_a_model_name(tmp_path):
    result = run("build_data.sh", {"OUT": str(tmp_path), "API_BASE": "http://127.0.0.1:9/v1"})
    assert result.returncode == 2
    assert result.stderr.strip() == "error: API_BASE needs API_MODEL, the endpoint's model name"
