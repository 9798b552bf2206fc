"""Record formats (in files written in MedicalGPT's formats and in its real files), bad input and how it is reported."""

import json
import os

import pytest

from conftest import FIXTURES, TEST_DATA, needs_medicalgpt_files, run_script, tiny_training_flags
from medgpt.data import CONVERTERS, DataReport, RecordError, load_records, query_to_messages, record_to_messages
from medgpt.errors import InputError


def write_lines(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_sharegpt_with_system_prompt_key_and_multi_turn():
    record = {
        "system_prompt": "You are a doctor.",
        "conversations": [
            {"from": "human", "value": "I have a cough."},
            {"from": "gpt", "value": "How long?"},
            {"from": "human", "value": "Two weeks."},
            {"from": "gpt", "value": "See a doctor."},
        ],
    }
    assert record_to_messages(record) == [
        {"role": "system", "content": "You are a doctor."},
        {"role": "user", "content": "I have a cough."},
        {"role": "assistant", "content": "How long?"},
        {"role": "user", "content": "Two weeks."},
        {"role": "assistant", "content": "See a doctor."},
    ]


def call(name, arguments=None, **extra):
    return {**extra, "type": "function", "function": {"name": name, "arguments": arguments or {}}}


def test_sharegpt_tool_call_turns_and_tools():
    record = {
        "tools": [{"name": "lookup_drug", "description": "Drug facts", "parameters": {"type": "object", "properties": {}}}],
        "conversations": [
            {"from": "human", "value": "Dose of ibuprofen?"},
            {"from": "function_call", "value": '{"name": "lookup_drug", "arguments": {"drug": "ibuprofen"}}'},
            {"from": "observation", "value": '{"dose": "200-400 mg"}'},
            {"from": "gpt", "value": "200-400 mg every 6-8 hours."},
        ],
    }
    converted = CONVERTERS["conversation"](record)
    assert converted["messages"] == [
        {"role": "user", "content": "Dose of ibuprofen?"},
        {"role": "assistant", "content": "", "tool_calls": [call("lookup_drug", {"drug": "ibuprofen"})]},
        {"role": "tool", "content": '{"dose": "200-400 mg"}'},
        {"role": "assistant", "content": "200-400 mg every 6-8 hours."},
    ]
    # Tools travel beside the messages, not in a system turn; bare function definitions are wrapped.
    assert converted["tools"] == [{"type": "function", "function": record["tools"][0]}]


def test_consecutive_function_call_turns_are_one_assistant_turn_with_several_calls():
    record = {"conversations": [
        {"from": "human", "value": "BMI and dose for 70 kg?"},
        {"from": "function_call", "value": '{"name": "bmi", "arguments": {"kg": 70, "m": 1.75}}'},
        {"from": "function_call", "value": '{"name": "dose", "arguments": "{\\"kg\\": 70}"}'},
        {"from": "observation", "value": '{"bmi": 22.9}'},
        {"from": "observation", "value": '{"dose": "500 mg"}'},
        {"from": "gpt", "value": "BMI 22.9; 500 mg."},
    ]}
    messages = record_to_messages(record)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "assistant"]
    assert messages[1]["tool_calls"] == [call("bmi", {"kg": 70, "m": 1.75}), call("dose", {"kg": 70})]


def test_openai_tool_calls_with_string_arguments_are_parsed():
    record = {
        "tools": json.dumps([{"type": "function", "function": {"name": "bmi", "parameters": {"type": "object"}}}]),
        "messages": [
            {"role": "user", "content": "My BMI? 70 kg, 1.75 m."},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "bmi", "arguments": '{"kg": 70, "m": 1.75}'}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "name": "bmi", "content": '{"bmi": 22.9}'},
            {"role": "assistant", "content": "22.9, in the normal range."},
        ],
    }
    converted = CONVERTERS["conversation"](record)
    assert converted["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [call("bmi", {"kg": 70, "m": 1.75}, id="call_1")]}
    assert converted["messages"][2] == {"role": "tool", "content": '{"bmi": 22.9}', "tool_call_id": "call_1", "name": "bmi"}
    assert converted["tools"] == [{"type": "function", "function": {"name": "bmi", "parameters": {"type": "object"}}}]
    # Content may be missing when there are calls; a conversation may end with a call (it is trained on).
    del record["messages"][1]["content"]
    assert record_to_messages({"messages": record["messages"][:2]})[1]["content"] == ""
    assert CONVERTERS["conversation"]({"messages": record["messages"][:1] + [{"role": "assistant", "content": "A"}]})["tools"] is None


def test_sharegpt_tool_call_file_gives_calls_and_tools():
    """The glaive tool-call format MedicalGPT uses: function_call turns (one call, a list of calls, or several
    turns in a row) become one assistant message with its calls, observation turns tool messages, and the
    tools JSON string the definitions."""
    path = os.path.join(TEST_DATA, "sft", "toolcall_zh.jsonl")
    records = load_records(path, "conversation", DataReport("train"), skip_invalid=False)
    assert len(records) == 12
    assistant_calls = [m for r in records for m in r["messages"] if m.get("tool_calls")]
    assert sum(1 for r in records if any(m.get("tool_calls") for m in r["messages"])) == 9
    assert len(assistant_calls) == 11 and sum(len(m["tool_calls"]) for m in assistant_calls) == 13
    assert all(m["content"] == "" and isinstance(c["function"]["arguments"], dict) for m in assistant_calls for c in m["tool_calls"])
    first = records[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant", "tool", "assistant"]
    assert first[1]["tool_calls"][0]["function"] == {"name": "calculate_bmi", "arguments": {"weight_kg": 70, "height_m": 1.75}}
    assert [t["function"]["name"] for t in records[0]["tools"]] == ["calculate_bmi", "book_appointment"]
    assert set(records[0]["tools"][0]) == {"type", "function"} and set(records[0]["tools"][0]["function"]) == {"name", "description", "parameters"}
    # Two calls as a list in one turn, and two function_call turns in a row: each one message with both calls,
    # answered by one tool message per call.
    for record in (records[5], records[6]):
        assert [m["role"] for m in record["messages"]] == ["user", "assistant", "tool", "tool", "assistant"]
        assert len(record["messages"][1]["tool_calls"]) == 2
    # A call written into an answer's text, then its result: kept as ShareGPT data has it.
    assert [m["role"] for m in records[4]["messages"]][:4] == ["user", "assistant", "tool", "assistant"]


@needs_medicalgpt_files
def test_glaive_tool_call_file_gives_calls_and_tools():
    records = load_records(os.path.join(FIXTURES, "sft", "glaive_toolcall_zh_demo.jsonl"), "conversation", DataReport("train"), skip_invalid=False)
    assert len(records) == 300
    assistant_calls = [m for r in records for m in r["messages"] if m.get("tool_calls")]
    assert sum(1 for r in records if any(m.get("tool_calls") for m in r["messages"])) == 157
    assert sum(len(m["tool_calls"]) for m in assistant_calls) == 216
    assert all(m["content"] == "" and isinstance(c["function"]["arguments"], dict) for m in assistant_calls for c in m["tool_calls"])
    first = records[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant", "tool", "assistant"]
    assert first[1]["tool_calls"][0]["function"] == {"name": "generate_invoice", "arguments": {
        "customer_name": "约翰·多伊", "items": [{"name": "苹果", "quantity": 2, "price": 1}, {"name": "香蕉", "quantity": 3, "price": 0.5}]}}
    assert [t["function"]["name"] for t in records[0]["tools"]] == ["generate_invoice", "generate_password"]
    assert set(records[0]["tools"][0]) == {"type", "function"} and set(records[0]["tools"][0]["function"]) == {"name", "description", "parameters"}
    assert sum(1 for r in records if r["tools"]) == 200 and all(r["tools"] is None for r in records if not r["tools"])  # "[]": no tools
    assert not any(m["role"] == "system" for r in records for m in r["messages"])  # nothing pasted into a system turn
    # Two lines give a tool result after an answer that wrote its call as text: kept, as ShareGPT data has it.
    assert [m["role"] for m in records[197]["messages"]][:4] == ["user", "assistant", "tool", "assistant"]


BAD_TOOL_RECORDS = [
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "bmi", "arguments": "{kg: 70}"}}]}]},
     "malformed tool call", r"messages\[1\]\.tool_calls\[0\]\.function\.arguments is not a JSON object \(Expecting"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "bmi", "arguments": "[70]"}}]}]},
     "malformed tool call", r"messages\[1\]\.tool_calls\[0\]\.function\.arguments is not a JSON object \(got list\)"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "function_call", "value": "bmi(70)"}]},
     "malformed tool call", r"conversations\[1\]\.value is not a JSON tool call"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "function_call", "value": '{"arguments": {}}'}]},
     "malformed tool call", r"conversations\[1\]\.value has no string 'name'"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Let me look."},
                   {"role": "tool", "content": "{}"}, {"role": "assistant", "content": "A"}]},
     "tool turn without a call", r"messages\[2\] is a 'tool' turn, but the assistant turn before it \(messages\[1\]\) calls no tool"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "observation", "value": "{}"}, {"from": "gpt", "value": "A"}]},
     "wrong role order", r"conversations\[1\] is a 'tool' turn where a 'assistant' turn belongs"),
    ({"conversations": [{"from": "observation", "value": "{}"}, {"from": "gpt", "value": "A"}]},
     "wrong role order", r"conversations\[0\] is a 'tool' turn where a 'user' turn belongs"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "function_call", "value": '{"name": "bmi"}'},
                        {"from": "human", "value": "and?"}, {"from": "gpt", "value": "A"}]},
     "wrong role order", r"conversations\[2\] is a 'user' turn where a 'tool' turn belongs \(the results of conversations\[1\]'s tool calls\)"),
    ({"messages": [{"role": "user", "content": "Q", "tool_calls": [{"name": "bmi"}]}, {"role": "assistant", "content": "A"}]},
     "malformed tool call", r"messages\[0\] is a 'user' turn with tool_calls"),
    ({"tools": {"name": "bmi"}, "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
     "malformed tools", "tools must be a list of tool definitions, got dict"),
    ({"tools": '[{"name": "bmi"}, {"description": "no name"}]', "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
     "malformed tools", r"tools\[1\] is not a function definition with a string 'name'"),
    ({"tools": "[{", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
     "malformed tools", "tools is not valid JSON"),
]


@pytest.mark.parametrize("record, kind, message", BAD_TOOL_RECORDS, ids=[kind for _, kind, _ in BAD_TOOL_RECORDS])
def test_bad_tool_records_are_located(record, kind, message):
    with pytest.raises(RecordError, match=message) as error:
        CONVERTERS["conversation"](record)
    assert error.value.kind == kind


def test_sharegpt_observation_after_a_plain_answer_is_kept_but_not_in_openai_messages():
    turns = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "Calling bmi {kg: 70}"}, {"from": "observation", "value": "{}"},
             {"from": "gpt", "value": "A"}]
    assert [m["role"] for m in record_to_messages({"conversations": turns})] == ["user", "assistant", "tool", "assistant"]
    with pytest.raises(RecordError, match="calls no tool"):
        record_to_messages({"messages": [{"role": t["from"], "content": t["value"]} for t in turns]})


def test_openai_messages_format():
    record = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    assert record_to_messages(record) == record["messages"]


def test_content_as_a_list_of_text_parts_is_joined():
    record = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "I have a fever"}, {"type": "text", "text": " and a cough."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Rest and drink water."}]},
    ]}
    assert record_to_messages(record) == [
        {"role": "user", "content": "I have a fever and a cough."}, {"role": "assistant", "content": "Rest and drink water."},
    ]
    record["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": "x.png"}})
    with pytest.raises(ValueError, match=r"messages\[0\].content\[2\] is a 'image_url' part"):
        record_to_messages(record)


def test_alpaca_with_input_history_and_system():
    record = {
        "instruction": "What dose?",
        "input": "Adult, 70 kg.",
        "output": "500 mg.",
        "history": [["Is paracetamol safe?", "Usually, at normal doses."]],
        "system": "Be brief.",
    }
    assert record_to_messages(record) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Is paracetamol safe?"},
        {"role": "assistant", "content": "Usually, at normal doses."},
        {"role": "user", "content": "What dose?\nAdult, 70 kg."},
        {"role": "assistant", "content": "500 mg."},
    ]


def test_text_formats_txt_jsonl_and_json_array(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n", encoding="utf-8")
    write_lines(tmp_path / "b.jsonl", [{"text": "third"}])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.json").write_text(json.dumps([{"text": "fourth"}, {"text": "fifth"}], indent=1), encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("x\n", encoding="utf-8")
    report = DataReport("train")
    records = load_records(str(tmp_path), "text", report, skip_invalid=False)
    assert [r["text"] for r in records] == ["first line", "second line", "third", "fourth", "fifth"]
    assert records[1]["source"].endswith("a.txt:3")
    assert records[3]["source"].endswith("c.json:2") and records[4]["source"].endswith("c.json:5")  # where each record starts
    assert report.read == 5


@pytest.mark.parametrize(
    "relative, kind, count",
    [
        ("sft/medical_sft_1K_format.jsonl", "conversation", 1000),
        ("sft/glaive_toolcall_zh_demo.jsonl", "conversation", 300),
        ("pretrain/fever.txt", "text", None),
        ("pretrain/en_article_tail500.txt", "text", None),
    ],
)
@needs_medicalgpt_files
def test_real_medicalgpt_files_load_unchanged(relative, kind, count):
    path = os.path.join(FIXTURES, relative)
    report = DataReport("train")
    records = load_records(path, kind, report, skip_invalid=False)
    with open(path, encoding="utf-8") as handle:
        non_empty = sum(1 for line in handle if line.strip())
    assert len(records) == non_empty == (count or non_empty)
    assert not report.rejected


def test_inference_queries():
    assert query_to_messages({"question": "Q?", "answer": "A"}) == ([{"role": "user", "content": "Q?"}], "A", None)
    messages, reference, tools = query_to_messages({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "R"}]})
    assert messages == [{"role": "user", "content": "Q"}] and reference == "R" and tools is None
    messages, reference, tools = query_to_messages({"system": "S", "question": "Q?", "tools": [{"name": "bmi"}]})
    assert messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}]
    assert tools == [{"type": "function", "function": {"name": "bmi"}}]
    # A trailing call is no text reference; a query with nothing left to answer is refused, not a crash.
    calls = [{"from": "human", "value": "Q"}, {"from": "function_call", "value": '{"name": "bmi"}'}]
    assert query_to_messages({"conversations": calls})[:2] == ([{"role": "user", "content": "Q"}], None)
    with pytest.raises(RecordError, match="must end with a user turn"):
        query_to_messages({"conversations": [{"from": "gpt", "value": "A"}]})


BAD_RECORDS = [
    ('{"conversations": [{"from": "human", "value": "hi"}', "malformed JSON"),
    ({"question": "no known keys", "label": 1}, "record in no known format"),
    ({"conversations": []}, "conversations is empty"),
    ({"conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]}, "conversations[0] is a 'assistant' turn where a 'user' turn belongs"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": 3}]}, "conversations[1].value must be a string, got int"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "doctor", "value": "A"}]}, "conversations[1].from is 'doctor'"),
    ({"conversations": [{"from": "human", "value": "Q"}]}, "ends with a 'user' turn, not an answer"),
]


@pytest.mark.parametrize("bad, message", BAD_RECORDS, ids=[m.split(" ")[0] for _, m in BAD_RECORDS])
def test_bad_record_gives_one_line_error_and_status_2(tmp_path, tiny_model_dir, bad, message):
    good = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    data = write_lines(tmp_path / "train.jsonl", [good, good, bad, good])
    result = run_script(
        "supervised_finetuning.py", "--model_name_or_path", tiny_model_dir, "--train_file_dir", data,
        "--template_name", "chatml", *tiny_training_flags(tmp_path / "out"),
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {data}:3: "), last
    assert message in last
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "out" / "adapter_config.json")


def test_skip_invalid_records_reports_how_many_and_why(tmp_path, tiny_model_dir):
    good = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    data = write_lines(tmp_path / "train.jsonl", [good, BAD_RECORDS[0][0], good, BAD_RECORDS[2][0], BAD_RECORDS[4][0], good])
    result = run_script(
        "supervised_finetuning.py", "--model_name_or_path", tiny_model_dir, "--train_file_dir", data,
        "--template_name", "chatml", "--skip_invalid_records", "True", *tiny_training_flags(tmp_path / "out", steps=1),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train: read 6 records, kept 3, truncated 0, rejected 3" in result.stderr
    assert f"rejected 1 x malformed JSON (first at {data}:2)" in result.stderr
    assert f"rejected 1 x empty conversation (first at {data}:4)" in result.stderr
    assert f"rejected 1 x non-string value (first at {data}:5)" in result.stderr


def test_unknown_flag_and_unknown_config_key_are_errors(tmp_path, tiny_model_dir):
    result = run_script("supervised_finetuning.py", "--model_name_or_path", tiny_model_dir, "--lora_r", "8")
    assert result.returncode == 2
    assert "unrecognized arguments: --lora_r 8" in result.stderr
    config = tmp_path / "sft.yaml"
    config.write_text(f"model_name_or_path: {tiny_model_dir}\nlora_r: 8\n", encoding="utf-8")
    result = run_script("supervised_finetuning.py", str(config))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {config}:2: unknown option 'lora_r'"


def test_missing_data_folder_is_a_clear_error(tmp_path, tiny_model_dir):
    result = run_script(
        "pretraining.py", "--model_name_or_path", tiny_model_dir, "--train_file_dir", str(tmp_path / "nope"),
        *tiny_training_flags(tmp_path / "out"),
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nope'}: no such file or folder"


def test_load_records_raises_input_error_with_location(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [{"text": "ok"}, {"conversations": []}])
    with pytest.raises(InputError) as error:
        load_records(path, "text", DataReport("train"), skip_invalid=False)
    assert str(error.value).startswith(f"{path}:2: expected a plain text line")


def test_byte_order_mark_and_crlf_line_ends_are_not_text(tmp_path):
    (tmp_path / "notes.txt").write_bytes(b"\xef\xbb\xbfFever is a symptom.\r\nCough too.\r\n")
    (tmp_path / "rows.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "Headache."}\r\n')
    records = load_records(str(tmp_path), "text", DataReport("train"), skip_invalid=False)
    assert [r["text"] for r in records] == ["Fever is a symptom.", "Cough too.", "Headache."]


def test_invalid_utf8_is_located_and_can_be_skipped_in_every_format(tmp_path):
    bad = b"caf\xe9"
    (tmp_path / "a.txt").write_bytes(b"good\n" + bad + b"\ngood\n")
    (tmp_path / "b.json").write_bytes(b'[{"text": "good"},\n {"text": "' + bad + b'"},\n {"text": "good"}]')
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "good"}\n{"text": "' + bad + b'"}\n')
    for name in ("a.txt", "b.json", "c.jsonl"):
        with pytest.raises(InputError, match=f"^{tmp_path / name}:2: not valid UTF-8 text"):
            load_records(str(tmp_path / name), "text", DataReport("train"), skip_invalid=False)
    report = DataReport("train")
    records = load_records(str(tmp_path), "text", report, skip_invalid=True)
    assert [r["text"] for r in records] == ["good"] * 5
    assert report.rejected["invalid UTF-8"] == 3


def test_preference_pair_with_the_same_answer_twice_is_rejected():
    from medgpt.data import RecordError, record_to_preference

    with pytest.raises(RecordError, match="chosen and rejected are the same answer"):
        record_to_preference({"prompt": "Q?", "chosen": "Rest.", "rejected": " Rest. "})


def test_validation_split_percentage_and_sample_caps(tmp_path):
    from medgpt.arguments import DataArguments
    from medgpt.data import load_splits

    records = [{"conversations": [{"from": "human", "value": f"Q{i}"}, {"from": "gpt", "value": f"A{i}"}]} for i in range(40)]
    path = write_lines(tmp_path / "train.jsonl", records)
    train, evaluation, train_report, eval_report = load_splits(DataArguments(train_file_dir=path, validation_split_percentage=10), "conversation")
    assert (len(train), len(evaluation)) == (36, 4)
    assert not {r["source"] for r in train} & {r["source"] for r in evaluation}
    assert (train_report.read, eval_report.read) == (36, 4)
    train, evaluation, train_report, _ = load_splits(DataArguments(train_file_dir=path, max_train_samples=5), "conversation")
    assert (len(train), len(evaluation)) == (5, 0)
    train_report.kept = len(train)
    assert train_report.summary() == "train: read 40 records, kept 5, truncated 0, rejected 0, left out 35 (over --max_train_samples)"


def test_rl_questions_with_tools_are_refused_with_their_line_or_counted(tmp_path):
    from medgpt.arguments import DataArguments
    from medgpt.data import load_question_splits
    from medgpt.errors import InputError

    records = [{"question": "Q1?", "answer": "A"},
               {"question": "BMI of 70 kg, 1.75 m?", "answer": "22.9",
                "tools": [{"name": "bmi", "parameters": {"type": "object"}}]}]
    path = write_lines(tmp_path / "train.jsonl", records)
    with pytest.raises(InputError, match=r"train.jsonl:2.*not supported by the RL stages"):
        load_question_splits(DataArguments(train_file_dir=path), seed=1, needs_answer=True)
    train, _ = load_question_splits(DataArguments(train_file_dir=path, skip_invalid_records=True), seed=1, needs_answer=True)
    assert [row["prompt"][-1]["content"] for row in train] == ["Q1?"]


def test_openai_legacy_function_call_field_and_function_role():
    from medgpt.data import CONVERTERS

    record = {"messages": [{"role": "user", "content": "BMI for 70 kg?"},
                           {"role": "assistant", "content": None, "function_call": {"name": "bmi", "arguments": '{"kg": 70}'}},
                           {"role": "function", "name": "bmi", "content": '{"bmi": 22.9}'},
                           {"role": "assistant", "content": "22.9"}]}
    messages = CONVERTERS["conversation"](record)["messages"]
    assert messages[1]["tool_calls"] == [{"type": "function", "function": {"name": "bmi", "arguments": {"kg": 70}}}]
    assert messages[2] == {"role": "tool", "content": '{"bmi": 22.9}', "name": "bmi"}
