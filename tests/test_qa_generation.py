"""QA generation: pairs parsed from model replies, checked against their source, written resumably; an
endpoint that fails is retried and reported; a local model writes through the generation engine."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from medgpt.qa_generation import PairChecks, Source, parse_pairs, support
from openai_stub import StubEndpoint

sys.path.insert(0, os.path.join(REPO, "tools"))
import generate_qa  # noqa: E402

SOURCES = [
    {"pmid": "90000101", "title": "Wilson disease",
     "text": "Wilson disease is an autosomal recessive disorder of copper transport caused by variants in ATP7B. "
             "Low serum ceruloplasmin and Kayser-Fleischer rings support the diagnosis."},
    {"pmid": "90000102", "title": "Gaucher disease",
     "text": "Gaucher disease type 1 results from deficient glucocerebrosidase activity. "
             "Enzyme replacement therapy reduces spleen volume and raises platelet counts."},
    {"pmid": "90000103", "title": "Fabry disease",
     "text": "Fabry disease is an X-linked lysosomal disorder caused by deficient alpha-galactosidase A. "
             "Burning pain in the hands and feet often begins in childhood."},
    {"pmid": "90000104", "title": "Pompe disease",
     "text": "Late-onset Pompe disease causes progressive proximal muscle weakness and respiratory insufficiency. "
             "Acid alpha-glucosidase activity is reduced in dried blood spots."},
    {"id": "note-5", "text": "肝豆状核变性是一种常染色体隐性遗传的铜代谢障碍疾病。治疗包括青霉胺或曲恩汀等螯合剂以及锌剂。"},
]


def source_of(prompt: str) -> str:
    return prompt.split("\n\n")[0].split("：", 1)[-1].split(": ", 1)[-1]


def grounded_reply(prompt: str) -> str:
    """One pair restating the source's first sentence, one that points at "the text", one answered from
    outside the source."""
    text = source_of(prompt)
    if "。" in text:
        first = text.split("。")[0] + "。"
        return f"问：{text[:6]}是什么样的疾病？\n答：{first}\n问：本文讲了什么？\n答：{first}"
    first = text.split(". ")[0] + "."
    topic = " ".join(text.split()[:3])
    return (f"Q: What is known about {topic}?\nA: {first}\n\n"
            f"Q: What does the text say about {topic}?\nA: {first}\n\n"
            f"Q: Which city hosts the most famous opera house of {topic}?\nA: Sydney, Australia, with its harbour.")


def write_sources(tmp_path, records=SOURCES) -> str:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return str(path)


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream if line.strip()]


def test_pairs_are_read_from_labelled_lines_run_together_text_and_json():
    assert parse_pairs("Question: What is X? Answer: X is y. Question: Why? Answer: Because z.\n\nNot an answer") == [
        ("What is X?", "X is y."), ("Why?", "Because z.")]
    assert parse_pairs("1. Q: Is vitamin A: a vitamin?\nA: Yes it is.\nstill the answer\n\nQ: left without answer") == [
        ("Is vitamin A: a vitamin?", "Yes it is.\nstill the answer")]
    assert parse_pairs("问：什么是肝豆状核变性？\n答：一种铜代谢障碍疾病。\n问：如何治疗？答：螯合剂。") == [
        ("什么是肝豆状核变性？", "一种铜代谢障碍疾病。"), ("如何治疗？", "螯合剂。")]
    assert parse_pairs('Here:\n```json\n[{"question": "Q1?", "answer": "A1"}]\n```') == [("Q1?", "A1")]
    assert parse_pairs("Q: question: What is ATP7B?\nA: A copper transporter gene.") == [
        ("What is ATP7B?", "A copper transporter gene.")]
    assert parse_pairs("I cannot help with that.") == []


def test_the_checks_keep_grounded_pairs_and_name_why_others_go():
    source = Source("1", SOURCES[0]["text"])
    checks, seen = PairChecks(), {"whatcauseswilsondisease"}
    assert support("Variants in ATP7B cause Wilson disease.", source.text) == 1.0
    assert support("Paris is the capital of France.", source.text) == 0.0
    assert checks.reason_to_drop("Which gene causes Wilson disease?", "Variants in ATP7B.", source, seen) is None
    assert checks.reason_to_drop("What does the study report?", "Variants in ATP7B.", source, seen) == \
        "question refers to the source text"
    assert checks.reason_to_drop("Which city is the capital of France?", "Paris is the capital of France.", source,
                                 seen).startswith("answer not supported")
    assert checks.reason_to_drop("What causes Wilson disease?", "Variants in ATP7B.", source, seen) == "duplicate question"
    assert checks.reason_to_drop("Why?", "Variants in ATP7B.", source, seen).startswith("question under")
    assert checks.reason_to_drop("", "x", source, seen) == "empty question or answer"
    chinese = Source("2", SOURCES[4]["text"])
    assert checks.reason_to_drop("肝豆状核变性怎么治疗？", "青霉胺或曲恩汀等螯合剂以及锌剂。", chinese, seen) is None


def test_pairs_from_an_endpoint_keep_their_source_and_drop_what_fails(tmp_path, capsys):
    corpus, output = write_sources(tmp_path), tmp_path / "qa.jsonl"
    with StubEndpoint(grounded_reply) as stub:
        generate_qa.main(["--input", corpus, "--output_file", str(output), "--api_base", stub.url,
                          "--model", "stub-writer", "--concurrency", "2", "--batch_size", "2"])
        requests = stub.server.requests
    assert len(requests) == len(SOURCES)
    assert all(request["model"] == "stub-writer" for request in requests)
    records = read_jsonl(output)
    assert [record["source_id"] for record in records] == ["90000101", "90000102", "90000103", "90000104", "note-5"]
    first = records[0]
    assert first["conversations"] == [
        {"from": "human", "value": "What is known about Wilson disease is?"},
        {"from": "gpt", "value": "Wilson disease is an autosomal recessive disorder of copper transport caused by "
                                 "variants in ATP7B."}]
    assert first["language"] == "en" and records[4]["language"] == "zh"
    assert records[4]["conversations"][1]["value"] == "肝豆状核变性是一种常染色体隐性遗传的铜代谢障碍疾病。"
    state = read_jsonl(str(output) + ".state")
    assert [entry["finished"] for entry in state[1:]] == [record["source_id"] for record in records]
    assert state[1]["dropped"] == {"question refers to the source text": 1,
                                   "answer not supported by the source (under 60% of its words)": 1}
    assert "pairs: 5 kept from 5 sources, 9 dropped" in capsys.readouterr().err


def test_alpaca_output_and_chinese_prompts(tmp_path):
    corpus, output = write_sources(tmp_path, SOURCES[4:]), tmp_path / "qa.jsonl"
    with StubEndpoint(grounded_reply) as stub:
        generate_qa.main(["--input", corpus, "--output_file", str(output), "--api_base", stub.url,
                          "--model", "m", "--format", "alpaca", "--pairs_per_source", "2"])
        prompt = stub.server.requests[0]["messages"][0]["content"]
    assert "写出2个问题" in prompt and SOURCES[4]["text"] in prompt
    assert read_jsonl(output) == [{"instruction": "肝豆状核变性是什么样的疾病？", "input": "",
                                   "output": "肝豆状核变性是一种常染色体隐性遗传的铜代谢障碍疾病。",
                                   "source_id": "note-5", "language": "zh"}]


def test_a_run_killed_midway_resumes_and_keeps_every_pair_once(tmp_path):
    corpus, output = write_sources(tmp_path), tmp_path / "qa.jsonl"
    state_file = str(output) + ".state"
    command = [sys.executable, os.path.join(REPO, "tools", "generate_qa.py"), "--input", corpus,
               "--output_file", str(output), "--model", "stub-writer", "--concurrency", "1", "--batch_size", "1"]
    with StubEndpoint(grounded_reply) as stub:
        stub.server.delay = 0.4
        process = subprocess.Popen(command + ["--api_base", stub.url], cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and (not os.path.exists(state_file) or len(read_jsonl(state_file)) < 3):
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        finished_before = [entry["finished"] for entry in read_jsonl(state_file)[1:]]
        assert 2 <= len(finished_before) < len(SOURCES)
        # As if killed while writing: a pair of an unfinished source, then half a line cut inside a character
        with open(output, "ab") as stream:
            stream.write((json.dumps({"conversations": [], "source_id": "90000104"}) + "\n").encode())
            stream.write('{"conversations": [{"from": "human", "value": "肝'.encode()[:-1])
        stub.server.delay, stub.server.requests = 0.0, []
        generate_qa.main(command[2:] + ["--api_base", stub.url])
        asked_again = len(stub.server.requests)
    assert asked_again == len(SOURCES) - len(finished_before)
    records = read_jsonl(output)
    assert sorted(record["source_id"] for record in records) == sorted(["90000101", "90000102", "90000103", "90000104",
                                                                        "note-5"])
    assert all(record["conversations"] for record in records)
    assert [entry["finished"] for entry in read_jsonl(state_file)[1:]][:len(finished_before)] == finished_before


def test_a_resume_drops_the_pairs_of_sources_no_longer_in_the_input(tmp_path):
    output = tmp_path / "qa.jsonl"
    with StubEndpoint(grounded_reply) as stub:
        flags = ["--output_file", str(output), "--api_base", stub.url, "--model", "m"]
        generate_qa.main(["--input", write_sources(tmp_path, SOURCES[:3])] + flags)
        stub.server.requests = []
        generate_qa.main(["--input", write_sources(tmp_path, SOURCES[1:4])] + flags)  # the same file, rewritten
        assert len(stub.server.requests) == 1  # only the new source
    assert [record["source_id"] for record in read_jsonl(output)] == ["90000102", "90000103", "90000104"]
    assert [entry["finished"] for entry in read_jsonl(str(output) + ".state")[1:]] == ["90000102", "90000103",
                                                                                      "90000104"]


def run_tool(args) -> int:
    with pytest.raises(SystemExit) as exit_info:
        generate_qa.main(args)
    return exit_info.value.code


def test_a_failing_endpoint_is_retried_then_reported_and_keeps_what_was_written(tmp_path, capsys):
    corpus, output = write_sources(tmp_path), tmp_path / "qa.jsonl"
    with StubEndpoint(grounded_reply) as stub:
        base = ["--input", corpus, "--output_file", str(output), "--api_base", stub.url, "--model", "m",
                "--batch_size", "1", "--concurrency", "1", "--retries", "2"]  # one request at a time
        stub.server.mode = "error"
        assert run_tool(base) == 2
        assert len(stub.server.requests) == 3  # the first request and two retries; the run stops there
        stderr = capsys.readouterr().err
        assert "Traceback" not in stderr
        assert stderr.strip().splitlines()[-1] == (f"error: {stub.url}: the endpoint failed on model m: HTTP 500: "
                                                   '{"error": {"message": "the stub is down"}}')
        stub.server.mode, stub.server.requests = "not_json", []
        assert run_tool(base) == 2
        assert "did not stream its answer" in capsys.readouterr().err
        stub.server.mode, stub.server.requests = "cut", []
        assert run_tool(base) == 2  # a cut-off answer is not taken for a whole one: retried, then reported
        assert len(stub.server.requests) == 3
        assert "the answer's stream ended before it was complete" in capsys.readouterr().err
        assert read_jsonl(output) == []
        stub.server.mode, stub.server.requests = "ok", []
        generate_qa.main(base)
    assert len(read_jsonl(output)) == len(SOURCES)


def test_an_endpoint_that_refuses_the_key_stops_before_any_output_is_written(tmp_path, capsys):
    output = tmp_path / "qa.jsonl"
    with StubEndpoint(grounded_reply) as stub:
        stub.server.mode = "unauthorized"
        assert run_tool(["--input", write_sources(tmp_path), "--output_file", str(output), "--api_base", stub.url,
                         "--model", "m"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {stub.url}: the endpoint refused the API key (HTTP 401): pass --api_key")
    assert not output.exists()


def test_bad_runs_stop_before_any_work_with_one_line(tmp_path, capsys):
    corpus, output = write_sources(tmp_path), tmp_path / "qa.jsonl"
    output.write_text('{"old": "results"}\n', encoding="utf-8")
    assert run_tool(["--input", corpus, "--output_file", str(output), "--api_base", "http://127.0.0.1:9/v1",
                     "--model", "m"]) == 2
    assert "already holds results that are not a resumable run" in capsys.readouterr().err
    assert output.read_text(encoding="utf-8") == '{"old": "results"}\n'
    assert run_tool(["--input", corpus, "--output_file", str(tmp_path / "new.jsonl")]) == 2
    assert "no model to write the pairs" in capsys.readouterr().err
    for output_file, message in ((corpus, "--output_file is one of the input files"),
                                 (tmp_path / "qa.txt", "--output_file must be a .jsonl file")):
        assert run_tool(["--input", corpus, "--output_file", str(output_file), "--api_base", "http://x/v1",
                         "--model", "m", "--overwrite", "True"]) == 2
        assert message in capsys.readouterr().err
    assert read_jsonl(corpus) == SOURCES
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine, and long enough to count as a source text for the tool to use ok"}\n[1, 2]\n',
                   encoding="utf-8")
    assert run_tool(["--input", str(bad), "--output_file", str(tmp_path / "n.jsonl"), "--api_base", "http://x/v1",
                     "--model", "m"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}:2: a record must be a JSON object, got list"
    with StubEndpoint(grounded_reply) as stub:
        generate_qa.main(["--input", corpus, "--output_file", str(output), "--api_base", stub.url, "--model", "m",
                          "--overwrite", "True"])
        assert run_tool(["--input", corpus, "--output_file", str(output), "--api_base", stub.url, "--model", "m",
                         "--pairs_per_source", "5"]) == 2
    assert "was started with other settings (pairs_per_source)" in capsys.readouterr().err


def test_a_local_model_writes_through_the_generation_engine(tiny_model_dir, tmp_path, capsys):
    corpus, output = write_sources(tmp_path, SOURCES[:3]), tmp_path / "qa.jsonl"
    generate_qa.main(["--input", corpus, "--output_file", str(output), "--model_name_or_path", tiny_model_dir,
                      "--max_new_tokens", "12", "--batch_size", "3"])
    # A random model writes no pairs: every source is finished, and each reply is counted as dropped.
    assert read_jsonl(output) == []
    state = read_jsonl(str(output) + ".state")
    assert state[0]["settings"]["writer"] == os.path.abspath(tiny_model_dir)
    assert [entry["dropped"] for entry in state[1:]] == [{"reply without question-answer pairs": 1}] * 3
    assert "pairs: 0 kept from 3 sources, 3 dropped" in capsys.readouterr().err
