"""The data tools in tools/: conversion (round trips, real MedicalGPT files), validation with the training
code's own messages, weighted merging, exact and near-duplicate removal, group-keeping splits and statistics.
Most tests call each tool's main(argv) in this process; one runs a tool as a user would."""

import importlib.util
import json
import os
import random
import string
import sys

import pytest

from conftest import FIXTURES, REPO, TEST_DATA, needs_medicalgpt_files

from medgpt.data import DataReport, load_records, load_question_splits, record_to_conversation
from medgpt.metrics import language_of
from medgpt.errors import InputError


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_data, validate_data, merge_data, dedup_data, split_data, data_stats = (
    load_tool(name) for name in ("convert_data", "validate_data", "merge_data", "dedup_data", "split_data", "data_stats")
)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return str(path)


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def exit_status(call) -> int:
    with pytest.raises(SystemExit) as stopped:
        call()
    return stopped.value.code


def conversation(*turns, **extra) -> dict:
    """ShareGPT record from (speaker, text) pairs."""
    return {"conversations": [{"from": speaker, "value": text} for speaker, text in turns], **extra}


TOOLS = [{"name": "bmi", "description": "Body-mass index", "parameters": {
    "type": "object", "properties": {"kg": {"type": "number"}, "m": {"type": "number"}}, "required": ["kg", "m"]}}]
WITH_SYSTEM = conversation(("system", "你是一名医生。"), ("human", "发烧怎么办？"), ("gpt", "多喝水，注意休息。"),
                           id="a1", source="clinic", pmid=12345)
MULTI_TURN = conversation(("human", "What is a fever?"), ("gpt", "A body temperature above 38 °C."),
                          ("human", "When should I worry?"), ("gpt", "Above 40 °C, or with a stiff neck."), disease="fever")
TOOL_USE = conversation(
    ("human", "BMI for 70 kg and 1.75 m? And for 80 kg?"),
    ("function_call", json.dumps({"name": "bmi", "arguments": {"kg": 70, "m": 1.75}})),
    ("function_call", json.dumps({"name": "bmi", "arguments": {"kg": 80, "m": 1.75}})),
    ("observation", '{"bmi": 22.9}'), ("observation", '{"bmi": 26.1}'),
    ("gpt", "22.9 (normal) and 26.1 (overweight)."), tools=json.dumps(TOOLS), id="t1")
SYSTEM_KEY = {"id": "k1", "system_prompt": "Answer briefly.",
              "conversations": [{"from": "human", "value": "Is aspirin safe for children?"},
                                {"from": "gpt", "value": "Not under 16, because of Reye's syndrome."}]}


# ---- convert ----


def convert(tmp_path, records_or_path, target: str, name: str, *extra) -> tuple[list[dict], object]:
    source = records_or_path if isinstance(records_or_path, str) else write_jsonl(tmp_path / f"{name}_in.jsonl", records_or_path)
    output = tmp_path / f"{name}.jsonl"
    tally = convert_data.main(["--input", source, "--output_file", str(output), "--to", target, *extra])
    return read_jsonl(output), tally


def test_round_trip_through_openai_is_exact_with_system_prompt_turns_and_tool_calls(tmp_path):
    records = [WITH_SYSTEM, MULTI_TURN, TOOL_USE]
    openai, tally = convert(tmp_path, records, "openai", "openai")
    assert tally.read == 3 and tally.kept == 3 and not tally.dropped
    assert openai[0] == {"messages": [{"role": "system", "content": "你是一名医生。"}, {"role": "user", "content": "发烧怎么办？"},
                                      {"role": "assistant", "content": "多喝水，注意休息。"}],
                         "id": "a1", "source": "clinic", "pmid": 12345}
    calls = openai[2]["messages"][1]
    assert calls["role"] == "assistant" and calls["content"] == ""
    assert [json.loads(call["function"]["arguments"]) for call in calls["tool_calls"]] == [{"kg": 70, "m": 1.75}, {"kg": 80, "m": 1.75}]
    assert [message["role"] for message in openai[2]["messages"]] == ["user", "assistant", "tool", "tool", "assistant"]
    assert openai[2]["tools"] == [{"type": "function", "function": TOOLS[0]}] and openai[2]["id"] == "t1"

    back, _ = convert(tmp_path, str(tmp_path / "openai.jsonl"), "sharegpt", "back")
    assert back == records  # every key, every turn, the tools text


def test_round_trip_through_alpaca_keeps_system_and_history_and_reports_tool_calls(tmp_path, capsys):
    alpaca, tally = convert(tmp_path, [WITH_SYSTEM, MULTI_TURN, TOOL_USE], "alpaca", "alpaca")
    assert alpaca == [
        {"instruction": "发烧怎么办？", "input": "", "output": "多喝水，注意休息。", "system": "你是一名医生。",
         "id": "a1", "source": "clinic", "pmid": 12345},
        {"instruction": "When should I worry?", "input": "", "output": "Above 40 °C, or with a stiff neck.",
         "history": [["What is a fever?", "A body temperature above 38 °C."]], "disease": "fever"},
    ]
    assert tally.read == 3 and tally.kept == 2
    assert dict(tally.dropped) == {"not convertible to alpaca: tool calls and results (Alpaca has no place for them)": 1}
    assert "alpaca_in.jsonl:3: not converted: tool calls and results" in capsys.readouterr().err

    back, _ = convert(tmp_path, str(tmp_path / "alpaca.jsonl"), "sharegpt", "back")
    assert back == [WITH_SYSTEM, MULTI_TURN]


def test_system_prompt_key_and_alpaca_input_become_turns_that_train_the_same(tmp_path):
    alpaca_record = {"instruction": "Summarise:", "input": "Fever, cough, 3 days.", "output": "A short febrile cough.",
                     "system": "Be terse.", "history": [["Hi", "Hello."]], "pmid": 7}
    sharegpt, _ = convert(tmp_path, [SYSTEM_KEY, alpaca_record], "sharegpt", "sharegpt")
    assert sharegpt[0] == {"id": "k1", "conversations": [
        {"from": "system", "value": "Answer briefly."}, *SYSTEM_KEY["conversations"]]}
    assert sharegpt[1]["conversations"][-2] == {"from": "human", "value": "Summarise:\nFever, cough, 3 days."}
    assert sharegpt[1]["pmid"] == 7
    for original, converted in zip([SYSTEM_KEY, alpaca_record], sharegpt):
        assert record_to_conversation(converted) == record_to_conversation(original)


def test_openai_tool_ids_survive_sharegpt_and_text_beside_calls_is_reported(tmp_path):
    with_ids = {"messages": [
        {"role": "user", "content": "BMI for 70 kg, 1.75 m?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_7", "type": "function", "function": {"name": "bmi", "arguments": '{"kg": 70, "m": 1.75}'}}]},
        {"role": "tool", "tool_call_id": "call_7", "name": "bmi", "content": '{"bmi": 22.9}'},
        {"role": "assistant", "content": "22.9"}], "tools": [{"type": "function", "function": TOOLS[0]}]}
    text_and_call = {"messages": [
        {"role": "user", "content": "BMI?"},
        {"role": "assistant", "content": "Let me compute it.", "tool_calls": [
            {"type": "function", "function": {"name": "bmi", "arguments": {"kg": 70, "m": 1.75}}}]},
        {"role": "tool", "content": '{"bmi": 22.9}'}, {"role": "assistant", "content": "22.9"}]}
    sharegpt, tally = convert(tmp_path, [with_ids, text_and_call], "sharegpt", "sharegpt")
    assert sharegpt[0]["conversations"][1:3] == [
        {"from": "function_call", "value": '{"id": "call_7", "name": "bmi", "arguments": {"kg": 70, "m": 1.75}}'},
        {"from": "observation", "value": '{"bmi": 22.9}', "tool_call_id": "call_7", "name": "bmi"}]
    assert len(sharegpt) == 1 and list(tally.dropped) == [
        "not convertible to sharegpt: an assistant turn with both text and tool calls (ShareGPT writes calls as turns of their own)"]
    again, _ = convert(tmp_path, str(tmp_path / "sharegpt.jsonl"), "openai", "again")
    assert again == [with_ids]


def test_strict_and_invalid_records_stop_with_path_and_line(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [MULTI_TURN, TOOL_USE])
    output = tmp_path / "out.jsonl"
    assert exit_status(lambda: convert_data.main(["--input", source, "--output_file", str(output), "--to", "alpaca",
                                                  "--strict", "True"])) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {source}:2: not convertible to alpaca: tool calls and results (Alpaca has no place for them)")
    assert not output.exists()

    bad = write_jsonl(tmp_path / "bad.jsonl", [MULTI_TURN, conversation(("human", "Hi"), ("human", "Hello?"))])
    assert exit_status(lambda: convert_data.main(["--input", bad, "--output_file", str(output)])) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"error: {bad}:2: conversations[1] is a 'user' turn where a 'assistant' turn belongs")
    tally = convert_data.main(["--input", bad, "--output_file", str(output), "--skip_invalid", "True"])
    assert tally.kept == 1 and dict(tally.dropped) == {"invalid: wrong role order": 1}

    only_tools = write_jsonl(tmp_path / "tools.jsonl", [TOOL_USE])
    empty = tmp_path / "empty.jsonl"
    assert exit_status(lambda: convert_data.main(["--input", only_tools, "--output_file", str(empty), "--to", "alpaca"])) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {only_tools}: no records left to write: every one was dropped (see the report above)")
    assert not empty.exists()


def assert_round_trips_exactly(tmp_path, medical: str, glaive: str, text_then_result: tuple[int, ...]):
    """`medical` (ShareGPT conversations) comes back unchanged from OpenAI messages and from Alpaca; `glaive`
    (ShareGPT with tool calls and a tools string) from OpenAI messages byte for byte, but for the records at
    the lines `text_then_result`, which answer in text, then a tool result follows: ShareGPT data allows it,
    OpenAI messages (a tool message answers a call) cannot hold it."""
    originals = {path: read_jsonl(path) for path in (medical, glaive)}

    for target in ("openai", "alpaca"):
        _, tally = convert(tmp_path, medical, target, f"medical_{target}")
        back, _ = convert(tmp_path, str(tmp_path / f"medical_{target}.jsonl"), "sharegpt", f"medical_{target}_back")
        assert tally.kept == len(originals[medical]) and back == originals[medical]

    _, tally = convert(tmp_path, glaive, "openai", "glaive_openai")
    assert sum(tally.dropped.values()) == len(text_then_result)
    assert sorted(where for where in tally.examples.values()) == [f"{glaive}:{text_then_result[0]}"]
    back, _ = convert(tmp_path, str(tmp_path / "glaive_openai.jsonl"), "sharegpt", "glaive_back")
    assert back == [record for line, record in enumerate(originals[glaive], start=1) if line not in text_then_result]
    with open(tmp_path / "glaive_back.jsonl", encoding="utf-8") as converted, open(glaive, encoding="utf-8") as original:
        kept_lines = [line for number, line in enumerate(original, start=1) if number not in text_then_result]
        assert converted.read().splitlines() == [line.rstrip("\n") for line in kept_lines]  # byte for byte

    _, tally = convert(tmp_path, glaive, "alpaca", "glaive_alpaca")
    with_tool_turns = sum(any(turn["from"] in ("function_call", "observation") for turn in record["conversations"])
                          for record in originals[glaive])
    assert tally.kept == len(originals[glaive]) - with_tool_turns and sum(tally.dropped.values()) == with_tool_turns


def test_sharegpt_files_round_trip_exactly(tmp_path):
    # The sample SFT records as MedicalGPT's medical_sft file has them: a top-level system_prompt comes back as
    # a system turn, which is not the same record.
    samples = read_jsonl(os.path.join(REPO, "data", "finetune", "medical_sft_zh.jsonl"))
    medical = write_jsonl(tmp_path / "medical_sft.jsonl", [record for record in samples if "system_prompt" not in record])
    # Likewise a list of calls in one function_call turn comes back as one turn per call (glaive's form).
    calls = read_jsonl(os.path.join(TEST_DATA, "sft", "toolcall_zh.jsonl"))
    glaive = write_jsonl(tmp_path / "toolcall.jsonl", [
        record for record in calls
        if not any(turn["from"] == "function_call" and turn["value"].startswith("[") for turn in record["conversations"])])
    assert len(read_jsonl(glaive)) == len(calls) - 1
    assert_round_trips_exactly(tmp_path, medical, glaive, text_then_result=(5,))


@needs_medicalgpt_files
def test_real_medicalgpt_files_round_trip_exactly(tmp_path):
    assert_round_trips_exactly(tmp_path, os.path.join(FIXTURES, "sft", "medical_sft_1K_format.jsonl"),
                               os.path.join(FIXTURES, "sft", "glaive_toolcall_zh_demo.jsonl"), text_then_result=(198, 294))


# ---- validate ----


BAD_SFT = [
    conversation(("human", "Hi"), ("human", "Hello?")),
    conversation(("human", "Hi"), ("gpt", "")),
    {"conversations": []},
    {"text": "a pretraining line"},
    {"question": "no format"},
    conversation(("human", "BMI?"), ("gpt", "Sure"), tools="[not json"),
    conversation(("doctor", "Hi"), ("gpt", "Hello")),
    ["not", "an", "object"],
]


def training_error(path: str, kind: str) -> str:
    """The message training stops with on the first bad record of `path`."""
    with pytest.raises(InputError) as error:
        if kind == "grpo":
            from medgpt.arguments import DataArguments

            load_question_splits(DataArguments(train_file_dir=path), seed=1, needs_answer=True)
        else:
            load_records(path, {"sft": "conversation", "pt": "text", "preference": "preference"}[kind], DataReport("x"), False)
    return str(error.value)


def test_validator_reports_every_bad_record_with_the_training_message(tmp_path, capsys):
    good = conversation(("human", "Hi"), ("gpt", "Hello"))
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join([json.dumps(good)] + [json.dumps(record) for record in BAD_SFT] + ["{broken json"]) + "\n",
                    encoding="utf-8")
    assert validate_data.main(["--input", str(path)]) == 2
    printed = capsys.readouterr().out.splitlines()
    problems = [line for line in printed if line.startswith(str(path))]
    assert [problem.split(":")[1] for problem in problems] == [str(line) for line in range(2, 11)]
    # The same words as training, record by record.
    for number, record in enumerate(BAD_SFT, start=2):
        single = write_jsonl(tmp_path / f"single{number}.jsonl", [record])
        assert problems[number - 2] == training_error(single, "sft").replace(single, str(path)).replace(":1:", f":{number}:")
    assert problems[-1] == f"{path}:10: malformed JSON: Expecting property name enclosed in double quotes at column 2"
    assert "sft data for supervised fine-tuning: read 10 records, 1 valid, 9 invalid" in printed
    assert "  invalid: 1 x wrong role order" in printed and "  invalid: 1 x not an object" in printed

    assert validate_data.main(["--input", str(path), "--max_errors", "2"]) == 2
    printed = capsys.readouterr().out.splitlines()
    assert len([line for line in printed if line.startswith(str(path))]) == 2
    assert "... and 7 more problems (--max_errors shows more)" in printed

    # A JSON array with a syntax error: training stops there; the validator says so and checks the other files.
    folder = tmp_path / "folder"
    folder.mkdir()
    broken = folder / "a.json"
    broken.write_text('[\n' + json.dumps(good) + ',\n{"conversations": [}\n]\n', encoding="utf-8")
    write_jsonl(folder / "b.jsonl", [good, BAD_SFT[0]])
    assert validate_data.main(["--input", str(folder)]) == 2
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == [f"{broken}:3: malformed JSON: Expecting value at column 20 (the rest of this file cannot be read)",
                           f"{folder / 'b.jsonl'}:2: conversations[1] is a 'user' turn where a 'assistant' turn belongs"]
    assert "sft data for supervised fine-tuning: read 3 records, 2 valid, 2 invalid" in printed
    assert "  invalid: 1 x unreadable file" in printed


def test_validator_kinds_match_their_training_stages(tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    pairs = write_jsonl(folder / "pairs.jsonl", [
        {"conversations": [{"from": "human", "value": "Ibuprofen?"}], "chosen": "With food.", "rejected": "Double it."},
        {"question": "Fever?", "response_chosen": "Rest.", "response_rejected": "Rest."}])
    questions = write_jsonl(tmp_path / "questions.jsonl", [
        {"question": "1+1?", "answer": "2"}, {"question": "Fever?"},
        {"question": "BMI?", "answer": "22", "tools": TOOLS}])
    text = tmp_path / "notes.txt"
    text.write_text("Fever is common.\n\nCough too.\n", encoding="utf-8")

    assert validate_data.main(["--input", str(folder)]) == 2  # guessed: preference
    out = capsys.readouterr().out
    assert f"{pairs}:2: response_chosen and response_rejected are the same answer: the pair teaches nothing" in out
    assert "preference data for reward modeling / DPO / ORPO: read 2 records, 1 valid, 1 invalid" in out

    assert validate_data.main(["--input", questions]) == 2  # guessed: grpo
    lines = capsys.readouterr().out.splitlines()
    for number in (2, 3):
        single = write_jsonl(tmp_path / f"q{number}.jsonl", [read_jsonl(questions)[number - 1]])
        assert training_error(single, "grpo").replace(f"{single}:1:", f"{questions}:{number}:") in lines
    assert validate_data.main(["--input", questions, "--require_answer", "False"]) == 2
    assert "read 3 records, 2 valid, 1 invalid" in capsys.readouterr().out

    assert validate_data.main(["--input", str(text)]) == 0  # guessed: pt
    assert "pt data for pretraining: read 2 records, 2 valid, 0 invalid" in capsys.readouterr().out


def test_validator_reports_what_a_token_length_would_cut(tmp_path, tokenizer_dir, capsys):
    long_answer = conversation(("human", "Tell me about fever."), ("gpt", "Fever is a raised temperature. " * 40))
    long_prompt = conversation(("human", "Here is my history. " * 80 + "What now?"), ("gpt", "See a doctor."))
    short = conversation(("human", "Hi"), ("gpt", "Hello"))
    path = write_jsonl(tmp_path / "sft.jsonl", [short, long_answer, long_prompt])
    flags = ["--input", path, "--tokenizer", tokenizer_dir, "--template_name", "chatml", "--max_length", "64"]
    assert validate_data.main(flags) == 0
    out = capsys.readouterr().out
    assert f"{path}:2: note: longer than --max_length 64 tokens: training truncates it" in out
    assert f"{path}:3: note: longer than --max_length 64 tokens: training truncates it" in out
    assert "valid but truncated by training: 2" in out

    assert validate_data.main(flags + ["--truncate_long_prompts", "False"]) == 2
    out = capsys.readouterr().out
    assert f"{path}:3: the prompt alone is longer than 64 tokens (at --max_length 64)" in out
    assert "  invalid: 1 x prompt longer than max_length" in out


# ---- merge ----


def numbered(prefix: str, count: int, **extra) -> list[dict]:
    return [conversation(("human", f"{prefix} question {i}"), ("gpt", f"{prefix} answer {i}"), **extra) for i in range(count)]


def test_merge_samples_by_weight_marks_sources_and_shuffles_with_the_seed(tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", numbered("first", 10))
    second = write_jsonl(tmp_path / "second.jsonl", numbered("second", 10, source="pubmed"))
    folder = tmp_path / "third"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", numbered("third", 4))
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": f"alpaca q{i}", "output": f"alpaca a{i}"} for i in range(6)])
    output = tmp_path / "merged.jsonl"
    flags = ["--input", first, second, str(folder), alpaca, "--weights", "1", "0.5", "2.5", "0", "--output_file",
             str(output), "--to", "openai", "--seed", "7"]
    tallies = merge_data.main(flags)
    assert [(tally.read, tally.kept, written) for tally, written in tallies] == [(10, 10, 10), (10, 10, 5), (4, 4, 10), (6, 6, 0)]
    merged = read_jsonl(output)
    assert len(merged) == 25 and all("messages" in record for record in merged)
    sources = [record["source"] for record in merged]
    assert sorted(s for s in sources if s.startswith(first)) == sorted(f"{first}:{line}" for line in range(1, 11))
    assert sources.count("pubmed") == 5
    third = [s for s in sources if "third" in s]
    assert len(third) == 10 and len(set(third)) == 4  # each twice, two of them three times
    assert sorted(third.count(s) for s in set(third)) == [2, 2, 3, 3]
    assert [record["messages"][0]["content"] for record in merged][:3] != [f"first question {i}" for i in range(3)]

    again = tmp_path / "again.jsonl"
    merge_data.main(flags[:-6] + ["--output_file", str(again), "--to", "openai", "--seed", "7"])
    assert read_jsonl(again) == merged
    other = tmp_path / "other.jsonl"
    merge_data.main(flags[:-6] + ["--output_file", str(other), "--to", "openai", "--seed", "8"])
    assert read_jsonl(other) != merged


def test_merge_unchanged_keeps_any_kind_and_checks_weights(tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Fever?", "chosen": "Rest.", "rejected": "Run."}])
    text = tmp_path / "notes.txt"
    text.write_text("Fever is common.\n", encoding="utf-8")
    output = tmp_path / "merged.jsonl"
    merge_data.main(["--input", pairs, str(text), "--output_file", str(output), "--to", "unchanged"])
    assert sorted(read_jsonl(output), key=str) == sorted([
        {"prompt": "Fever?", "chosen": "Rest.", "rejected": "Run.", "source": f"{pairs}:1"},
        {"text": "Fever is common.", "source": f"{text}:1"}], key=str)
    assert exit_status(lambda: merge_data.main(["--input", pairs, str(text), "--weights", "1", "--output_file",
                                                str(tmp_path / "x.jsonl")])) == 2
    assert "--weights needs one weight per --input source (2), got [1.0]" in capsys.readouterr().err


# ---- dedup ----


QUESTION = "What are the common symptoms of type 2 diabetes, and when should I see a doctor?"
ANSWER = ("Common symptoms of type 2 diabetes include increased thirst, frequent urination, increased hunger, unexplained "
          "weight loss, tiredness, blurred vision, slow-healing sores and frequent infections. Many people have no symptoms "
          "for years, so screening matters if you are overweight or have a family history of diabetes. See a doctor if you "
          "notice these signs; a fasting blood glucose or HbA1c test confirms the diagnosis.")
SAME_TOPIC = ("Treatment of type 2 diabetes starts with lifestyle changes: a balanced diet, regular physical activity and "
              "weight loss. If blood sugar stays high, doctors usually add metformin, and later other medicines such as "
              "SGLT2 inhibitors, GLP-1 receptor agonists or insulin. Regular checks of HbA1c, blood pressure, kidneys, eyes "
              "and feet help prevent complications.")
ZH_QUESTION = "高血压患者日常生活中应该注意什么？"
ZH_ANSWER = ("高血压患者应当低盐饮食，每天食盐摄入量不超过5克，多吃新鲜蔬菜和水果，控制体重，戒烟限酒，保持规律作息和充足睡眠。"
             "适量进行有氧运动，如快走、慢跑、游泳等，每周至少150分钟。按医嘱规律服用降压药物，不要自行停药或减量，"
             "并定期监测血压，如出现头痛、头晕、胸闷等不适应及时就医。")


def test_dedup_removes_exact_and_near_duplicates_in_english_and_chinese(tmp_path):
    records = [
        conversation(("human", QUESTION), ("gpt", ANSWER), id="en-1"),
        conversation(("human", "How is type 2 diabetes treated?"), ("gpt", SAME_TOPIC), id="en-2"),
        conversation(("human", QUESTION), ("gpt", ANSWER.replace("increased thirst", "excessive thirst")
                                           .replace("tiredness", "fatigue")), id="en-near"),
        conversation(("human", "  " + QUESTION.upper().replace(" ", "   ")), ("gpt", ANSWER.replace(". ", ".\n\n  ")), id="en-exact"),
        conversation(("human", ZH_QUESTION), ("gpt", ZH_ANSWER), id="zh-1"),
        conversation(("human", ZH_QUESTION), ("gpt", ZH_ANSWER.replace("戒烟限酒", "戒烟戒酒").replace("快走", "散步")), id="zh-near"),
        {"messages": [{"role": "system", "content": "You are a doctor."}, {"role": "user", "content": QUESTION},
                      {"role": "assistant", "content": ANSWER}], "id": "en-openai"},  # the same turns in another format
    ]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    output, removed = tmp_path / "out.jsonl", tmp_path / "removed.jsonl"
    tally = dedup_data.main(["--input", source, "--output_file", str(output), "--removed_file", str(removed),
                             "--threshold", "0.8"])
    assert [record["id"] for record in read_jsonl(output)] == ["en-1", "en-2", "zh-1"]
    assert dict(tally.dropped) == {"near duplicate": 2, "exact duplicate": 2}
    entries = {entry["record"]["id"]: entry for entry in read_jsonl(removed)}
    assert {name: (entry["match"], entry["duplicate_of"], entry["duplicate_of_id"]) for name, entry in entries.items()} == {
        "en-near": ("near", f"{source}:1", "en-1"), "en-exact": ("exact", f"{source}:1", "en-1"),
        "zh-near": ("near", f"{source}:5", "zh-1"), "en-openai": ("exact", f"{source}:1", "en-1")}
    assert entries["en-near"]["where"] == f"{source}:3" and 0.8 <= entries["en-near"]["similarity"] < 1

    strict = tmp_path / "strict.jsonl"
    dedup_data.main(["--input", source, "--output_file", str(strict), "--threshold", "0.95"])
    assert [record["id"] for record in read_jsonl(strict)] == ["en-1", "en-2", "en-near", "zh-1", "zh-near"]
    only_exact = tmp_path / "exact.jsonl"
    dedup_data.main(["--input", source, "--output_file", str(only_exact), "--threshold", "1"])
    assert [record["id"] for record in read_jsonl(only_exact)] == ["en-1", "en-2", "en-near", "zh-1", "zh-near"]


def test_dedup_is_deterministic_and_refuses_to_overwrite(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [conversation(("human", QUESTION), ("gpt", ANSWER)),
                                                 conversation(("human", QUESTION), ("gpt", ANSWER.replace("tiredness", "fatigue")))])
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    dedup_data.main(["--input", source, "--output_file", str(first), "--removed_file", str(second)])
    kept, removed = first.read_text(), second.read_text()
    assert exit_status(lambda: dedup_data.main(["--input", source, "--output_file", str(first)])) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {first}: --output_file already holds results: pass --overwrite True to replace them")
    dedup_data.main(["--input", source, "--output_file", str(first), "--removed_file", str(second), "--overwrite", "True"])
    assert first.read_text() == kept and second.read_text() == removed
    assert exit_status(lambda: dedup_data.main(["--input", source, "--output_file", source, "--overwrite", "True"])) == 2
    assert "is one of the input files" in capsys.readouterr().err


# ---- split ----


def random_text(rng: random.Random, words: int) -> str:
    return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9))) for _ in range(words))


def test_split_keeps_near_duplicate_groups_on_one_side(tmp_path):
    rng = random.Random(0)
    base = random_text(rng, 60)
    group = [conversation(("human", "What does this mean?"), ("gpt", variant), id=f"g{i}")
             for i, variant in enumerate([base, base.replace(base.split()[3], "changed"), base + " indeed"])]
    others = [conversation(("human", random_text(rng, 8)), ("gpt", random_text(rng, 40)), id=f"o{i}") for i in range(17)]
    records = others[:5] + group[:1] + others[5:11] + group[1:] + others[11:]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    sides = set()
    for seed in range(8):
        train_file, validation_file = tmp_path / f"train{seed}.jsonl", tmp_path / f"valid{seed}.jsonl"
        train, validation = split_data.main(["--input", source, "--train_file", str(train_file), "--validation_file",
                                             str(validation_file), "--validation_ratio", "0.25", "--seed", str(seed)])
        assert read_jsonl(train_file) == train and read_jsonl(validation_file) == validation
        in_validation = {record["id"] for record in validation} & {"g0", "g1", "g2"}
        assert in_validation in (set(), {"g0", "g1", "g2"})
        sides.add(bool(in_validation))
        assert abs(len(validation) - 5) < 3 and len(train) + len(validation) == 20
        assert train == [record for record in records if record in train]  # the input's order
    assert sides == {True, False}

    sized = split_data.main(["--input", source, "--train_file", str(tmp_path / "t.jsonl"), "--validation_file",
                             str(tmp_path / "v.jsonl"), "--validation_size", "2", "--seed", "3"])
    assert len(sized[1]) == 2


# ---- statistics ----


STATS_RECORDS = [
    conversation(("system", "你是医生。"), ("human", "发烧怎么办？"), ("gpt", "多喝水，注意休息，必要时服用退烧药。")),
    {"messages": [{"role": "user", "content": "BMI for 70 kg?"},
                  {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "bmi", "arguments": {"kg": 70}}}]},
                  {"role": "tool", "content": "22.9"}, {"role": "assistant", "content": "Your BMI is 22.9."}], "tools": TOOLS},
    {"instruction": "请解释 hypertension 是什么", "output": "Hypertension 就是高血压，指血压持续升高。",
     "history": [["Hello", "Hi, how can I help?"]]},
    {"text": "Fever is a common symptom of infection."},
    {"question": "12+34=?", "answer": "46"},
]


def expected_texts() -> list[str]:
    call = json.dumps({"name": "bmi", "arguments": {"kg": 70}}, ensure_ascii=False)
    return ["你是医生。\n发烧怎么办？\n多喝水，注意休息，必要时服用退烧药。",
            f"BMI for 70 kg?\n{call}\n22.9\nYour BMI is 22.9.",
            "Hello\nHi, how can I help?\n请解释 hypertension 是什么\nHypertension 就是高血压，指血压持续升高。",
            "Fever is a common symptom of infection.", "12+34=?\n46"]


def test_stats_on_a_small_file(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", STATS_RECORDS)
    output = tmp_path / "stats.json"
    stats = data_stats.main(["--input", source, "--output_file", str(output)])
    lengths = sorted(len(text) for text in expected_texts())
    assert stats["records"] == 5
    assert stats["formats"] == {"sharegpt": 1, "openai": 1, "alpaca": 1, "text": 1, "question": 1}
    assert stats["turns_per_conversation"] == {"conversations": 3, "mean": 3.33, "max": 4}  # 2, 4 and 4 turns
    assert stats["with_system_prompt"] == 1 and stats["with_tools"] == 1
    assert stats["characters_per_record"] == {"mean": round(sum(lengths) / 5, 1), "median": lengths[2], "p95": lengths[4],
                                              "max": lengths[4]}
    # zh, en (tool call and result left out), mixed (English greeting, then Chinese), en, other (digits only)
    assert stats["languages"] == {"zh": 1, "en": 2, "mixed": 1, "other": 1}
    assert json.loads(output.read_text(encoding="utf-8")) == stats
    table = capsys.readouterr().out
    assert "with a system prompt    1 (20.0%)" in table and "languages               zh 1 (20.0%)" in table


def test_stats_counts_tokens_with_the_tokenizer(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    counts = sorted(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in expected_texts())
    stats = data_stats.main(["--input", write_jsonl(tmp_path / "in.jsonl", STATS_RECORDS), "--tokenizer", tokenizer_dir])
    assert stats["tokens_per_record"] == {"mean": round(sum(counts) / 5, 1), "median": counts[2], "p95": counts[4], "max": counts[4]}


def test_language_labels():
    assert language_of("发烧时应多喝水，服用阿莫西林（amoxicillin）500mg。") == "zh"
    assert language_of("Take 板蓝根 daily for a week to ease the symptoms of a cold.") == "en"
    assert language_of("Fever means a raised temperature. 发烧就是体温升高。") == "mixed"
    assert language_of("Лихорадка") == "other" and language_of("12 + 34 = 46") == "other"


# ---- bad input, as a user sees it ----


def test_a_bad_record_ends_a_tool_with_one_line_and_status_2(tmp_path):
    import subprocess

    source = tmp_path / "bad.jsonl"
    source.write_text(json.dumps(MULTI_TURN) + "\n" + '{"conversations": "not a list"}\n', encoding="utf-8")
    output = tmp_path / "out.jsonl"
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "data_stats.py"), "--input", str(source)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {source}:2: conversations must be a list, got str (--skip_invalid True drops such records and counts them)")
    for tool, flags in ((convert_data, ["--output_file", str(tmp_path / "out.txt")]),
                        (dedup_data, ["--output_file", str(output), "--unknown", "1"])):
        assert exit_status(lambda: tool.main(["--input", str(source), *flags])) == 2
    assert not output.exists() and not (tmp_path / "out.txt").exists()
