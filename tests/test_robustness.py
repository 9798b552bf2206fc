"""What a run does when its surroundings are not as planned: an output folder that holds an earlier run's
checkpoints (some of them damaged), an output folder inside the data, records a JSON reader accepts but
nothing after it can use (lone surrogates, nesting 100,000 deep), files and folders the user may not read,
data files with upper-case suffixes, and a disk that fills up while results or checkpoints are written.

Scripts run in this process (conftest.run_main) where that is enough to see what a user sees: one line on
stderr and an exit status, no traceback (any other exception fails the test). Reading as another user
needs a subprocess."""

import errno
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import REPO, exit_of_a_main_raising, run_main, run_script, tiny_training_flags

GOOD = {"conversations": [{"from": "human", "value": "What is a fever?"}, {"from": "gpt", "value": "A raised body temperature."}]}
# Written as JSON text: the escape is what a JSON file holds.
LONE_SURROGATE = '{"conversations": [{"from": "human", "value": "bad \\ud800 text"}, {"from": "gpt", "value": "A"}]}'
PAIRED_SURROGATES = '{"conversations": [{"from": "human", "value": "fine \\ud83d\\ude00"}, {"from": "gpt", "value": "A"}]}'
DEEP_LIST = "[" * 100_000 + "]" * 100_000
DEEP_OBJECT = '{"a":' * 100_000 + "1" + "}" * 100_000
SURROGATE_MESSAGE = "text holds a lone surrogate (a \\ud800-\\udfff escape without its other half), which is no character"
DEPTH_MESSAGE = "lists and objects nested more than 100 levels deep"


def write(path, text: str) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return str(path)


def jsonl(*records) -> str:
    return "".join((record if isinstance(record, str) else json.dumps(record)) + "\n" for record in records)


def tool_main(name: str):
    """A tool's main, loaded from tools/ (not a package)."""
    spec = importlib.util.spec_from_file_location(f"robustness_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_tool(name: str, argv: list, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a tool's main run here."""
    main = tool_main(name)
    capsys.readouterr()
    try:
        result = main([str(argument) for argument in argv])
        status = result if isinstance(result, int) else 0  # validate_data returns its status
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


@pytest.fixture(autouse=True)
def fresh_logging(monkeypatch):
    """No log handler an earlier test's script installed: it would write to that test's captured stream."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def sft_flags(model_dir, data, out, steps=2, *extra) -> list:
    return ["--model_name_or_path", model_dir, "--template_name", "chatml", "--use_peft", "True",
            "--train_file_dir", data, "--model_max_length", "64", *tiny_training_flags(out, steps), *extra]


def trainer_state(folder) -> dict:
    with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as handle:
        return json.load(handle)


def checkpoints(out) -> list[str]:
    return sorted((name for name in os.listdir(out) if name.startswith("checkpoint-")), key=lambda n: int(n.split("-")[1]))


def fake_checkpoint(folder, step: int, state: str | None = None, weights=True, optimizer=b"state") -> str:
    """A checkpoint folder as the trainer leaves it (the file contents do not matter to the checks)."""
    os.makedirs(folder)
    if state is not None:
        write(os.path.join(folder, "trainer_state.json"), state)
    if weights:
        write(os.path.join(folder, "adapter_model.safetensors"), "weights")
    if optimizer is not None:
        with open(os.path.join(folder, "optimizer.pt"), "wb") as handle:
            handle.write(optimizer)
    return str(folder)


# ---- an output folder that holds an earlier run ----


def test_a_rerun_stops_a_damaged_checkpoint_is_skipped_and_starting_over_removes_the_old_ones(tiny_model_dir, tmp_path, capsys):
    data, out = write(tmp_path / "sft.jsonl", jsonl(*[GOOD] * 8)), tmp_path / "out"
    every_step = ["--save_strategy", "steps", "--save_steps", "1"]
    status, stderr = run_main("supervised_finetuning.py", sft_flags(tiny_model_dir, data, out, 2, *every_step), capsys)
    assert status == 0, stderr[-3000:]
    assert checkpoints(out) == ["checkpoint-1", "checkpoint-2"]
    before = {name: os.path.getmtime(out / name / "trainer_state.json") for name in checkpoints(out)}

    # The same command again: stopped before any work, the newest checkpoint and both ways on named.
    status, stderr = run_main("supervised_finetuning.py", sft_flags(tiny_model_dir, data, out, 2, *every_step), capsys)
    assert status == 2
    assert last_line(stderr) == (
        f"error: {out}/checkpoint-2: {out} holds an earlier run's checkpoints, the newest this one: pass "
        "--resume_from_checkpoint last (or a checkpoint folder) to continue that run, or --overwrite_output_dir True "
        "to start over (its checkpoint-N folders are removed)")
    assert "model and tokenizer saved" not in stderr and "Traceback" not in stderr
    assert {name: os.path.getmtime(out / name / "trainer_state.json") for name in checkpoints(out)} == before

    # The newest checkpoint was cut off while its state was written: resumed from the one before it.
    state_file = out / "checkpoint-2" / "trainer_state.json"
    text = state_file.read_text()
    state_file.write_text(text[:len(text) // 2])
    status, stderr = run_main("supervised_finetuning.py", sft_flags(
        tiny_model_dir, data, out, 3, *every_step, "--resume_from_checkpoint", "last"), capsys)
    assert status == 0, stderr[-3000:]
    assert (f"skipping the damaged checkpoint {out}/checkpoint-2 (trainer_state.json is damaged (not the JSON a "
            "trainer writes)): trying the one before it") in stderr
    assert f"resuming from {out}/checkpoint-1 (step 1)" in stderr
    state = trainer_state(out)
    assert state["global_step"] == 3
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3]  # step 2 redone, once
    assert checkpoints(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert trainer_state(out / "checkpoint-2")["global_step"] == 2  # rewritten whole

    # Starting over: the earlier checkpoints go, so a later --resume_from_checkpoint last cannot find them.
    status, stderr = run_main("supervised_finetuning.py", sft_flags(
        tiny_model_dir, data, out, 1, "--overwrite_output_dir", "True"), capsys)
    assert status == 0, stderr[-3000:]
    assert f"removed the earlier run's checkpoint-1, checkpoint-2, checkpoint-3 from {out}" in stderr
    assert checkpoints(out) == []
    assert trainer_state(out)["global_step"] == 1
    assert "resuming from" not in stderr


@pytest.mark.parametrize("damage, problem", [
    ("no state", "no trainer_state.json"),
    ("truncated state", "trainer_state.json is damaged (not the JSON a trainer writes)"),
    ("state without a step", "trainer_state.json is damaged (not the JSON a trainer writes)"),
    ("no weights", "no model weights"),
    ("no optimizer", "no optimizer state (optimizer.pt)"),
    ("empty optimizer", "no optimizer state (optimizer.pt)"),
])
def test_a_damaged_checkpoint_is_named_with_what_it_lacks(damage, problem, tmp_path):
    from medgpt.outputs import checkpoint_problem

    state = {"no state": None, "truncated state": '{"global_step": 4, "log_hist', "state without a step": "[]"}.get(
        damage, '{"global_step": 4}')
    folder = fake_checkpoint(tmp_path / "checkpoint-4", 4, state, weights=damage != "no weights",
                             optimizer={"no optimizer": None, "empty optimizer": b""}.get(damage, b"state"))
    assert checkpoint_problem(folder) == problem
    assert checkpoint_problem(fake_checkpoint(tmp_path / "checkpoint-5", 5, '{"global_step": 5}')) is None


def test_resuming_with_no_complete_checkpoint_is_one_line_after_a_warning_for_each(tiny_model_dir, tmp_path):
    # From the command line: the warnings come before logging is set up, and must still be seen.
    data, out = write(tmp_path / "sft.jsonl", jsonl(GOOD, GOOD)), tmp_path / "out"
    fake_checkpoint(out / "checkpoint-2", 2, None)
    fake_checkpoint(out / "checkpoint-4", 4, '{"global_step": 4}', optimizer=None)
    result = run_script("supervised_finetuning.py", *sft_flags(
        tiny_model_dir, data, out, 2, "--resume_from_checkpoint", "last"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"skipping the damaged checkpoint {out}/checkpoint-4 (no optimizer state (optimizer.pt)): trying the one before it",
        f"skipping the damaged checkpoint {out}/checkpoint-2 (no trainer_state.json): trying the one before it",
        f"error: {out}: no complete checkpoint to resume from (--resume_from_checkpoint): all 2 checkpoint-N folders are damaged",
    ]


@pytest.mark.parametrize("case", ["damaged-named-checkpoint", "resume-and-overwrite", "adapter-inside-a-checkpoint", "ppo-rerun"])
def test_checkpoint_choices_refused_before_any_work(case, tiny_model_dir, tmp_path, capsys):
    data, out = write(tmp_path / "sft.jsonl", jsonl(GOOD, GOOD)), tmp_path / "out"
    complete = fake_checkpoint(out / "checkpoint-2", 2, '{"global_step": 2}')
    damaged = fake_checkpoint(out / "checkpoint-3", 3, '{"global_step": 3}', weights=False)
    script, argv, expected = {
        "damaged-named-checkpoint": ("supervised_finetuning.py", ["--resume_from_checkpoint", damaged],
                                     f"error: {damaged}: cannot resume from this checkpoint (--resume_from_checkpoint): no model weights"),
        "resume-and-overwrite": ("supervised_finetuning.py", ["--resume_from_checkpoint", "last", "--overwrite_output_dir", "True"],
                                 "error: --overwrite_output_dir True starts over, --resume_from_checkpoint continues: give one of them"),
        "adapter-inside-a-checkpoint": ("supervised_finetuning.py", ["--overwrite_output_dir", "True", "--peft_path", complete],
                                        f"error: {complete}: --peft_path is inside {complete}, which --overwrite_output_dir True "
                                        "would remove: copy it elsewhere first, or resume (--resume_from_checkpoint)"),
        "ppo-rerun": ("ppo_training.py", [],
                      f"error: {damaged}: {out} holds an earlier run's checkpoints, the newest this one: pass "
                      "--resume_from_checkpoint last (or a checkpoint folder) to continue that run, or "
                      "--overwrite_output_dir True to start over (its checkpoint-N folders are removed)"),
    }[case]
    if case == "adapter-inside-a-checkpoint":
        with open(os.path.join(complete, "adapter_config.json"), "w") as handle:
            json.dump({"peft_type": "LORA", "base_model_name_or_path": tiny_model_dir}, handle)
    if script == "ppo_training.py":
        questions = write(tmp_path / "q.jsonl", jsonl({"question": "What is a fever?", "answer": "heat"}))
        flags = ["--model_name_or_path", tiny_model_dir, "--template_name", "chatml", "--train_file_dir", questions,
                 "--reward_funcs", "length", "--output_dir", out, "--report_to", "none"]
    else:
        flags = sft_flags(tiny_model_dir, data, out, 2)
    status, stderr = run_main(script, flags + argv, capsys)
    assert status == 2
    assert last_line(stderr) == expected
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-3"]


# ---- outputs inside inputs ----


@pytest.mark.parametrize("case", ["output-is-the-data", "output-inside-the-data", "output-inside-the-validation-data"])
def test_a_stage_does_not_write_into_its_data_folder(case, tiny_model_dir, tmp_path, capsys):
    train, validation = tmp_path / "train", tmp_path / "validation"
    for folder in (train, validation):
        folder.mkdir()
        write(folder / "sft.jsonl", jsonl(GOOD, GOOD))
    out, folder, flag = {
        "output-is-the-data": (train, train, "--train_file_dir"),
        "output-inside-the-data": (train / "runs" / "sft", train, "--train_file_dir"),
        "output-inside-the-validation-data": (validation / "sft", validation, "--validation_file_dir"),
    }[case]
    where = "is the" if out == folder else "is inside the"
    status, stderr = run_main("supervised_finetuning.py", sft_flags(
        tiny_model_dir, train, out, 2, "--validation_file_dir", validation), capsys)
    assert status == 2
    assert last_line(stderr) == (f"error: {out}: --output_dir {where} {flag} folder ({folder}), which is read as data, "
                                 "all files below it: write elsewhere")
    assert sorted(os.listdir(train)) == ["sft.jsonl"] and sorted(os.listdir(validation)) == ["sft.jsonl"]


@pytest.mark.parametrize("tool, argv, flag", [
    ("convert_data", ["--input", "{data}", "--output_file", "{data}/converted.jsonl"], "--output_file"),
    ("dedup_data", ["--input", "{data}", "--output_file", "{tmp}/kept.jsonl", "--removed_file", "{data}/sub/removed.jsonl"], "--removed_file"),
    ("split_data", ["--input", "{data}", "--train_file", "{tmp}/train.jsonl", "--validation_file", "{data}/validation.jsonl"], "--validation_file"),
    ("merge_data", ["--input", "{tmp}/other.jsonl", "{data}", "--output_file", "{data}/merged.jsonl"], "--output_file"),
    ("data_stats", ["--input", "{data}", "--output_file", "{data}/stats.json"], "--output_file"),
    ("generate_qa", ["--input", "{data}", "--output_file", "{data}/qa.jsonl", "--api_base", "http://127.0.0.1:9/v1", "--model", "m"], "--output_file"),
    ("extend_tokenizer", ["--model_name_or_path", "{tiny}", "--corpus", "{data}", "--output_dir", "{data}/extended"], "--output_dir"),
    ("pubmed_corpus", ["--input", "{data}", "--output_file", "{tmp}/corpus.jsonl", "--query", "fever", "--email", "a@b.c",
                       "--download_dir", "{data}/sub"], "--download_dir"),
    ("../evaluate_models", ["--models", "{tiny}", "--open_file", "{data}", "--output_dir", "{data}"], "--output_dir"),
])
def test_a_tool_does_not_write_into_its_input_folder(tool, argv, flag, tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    write(data / "sft.jsonl", jsonl(GOOD, {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "B"}]}))
    write(data / "abstracts.nbib", "PMID- 1\nTI  - Fever.\n")  # a PubMed export, for pubmed_corpus
    write(tmp_path / "other.jsonl", jsonl(GOOD))
    argv = [argument.format(data=data, tmp=tmp_path, tiny=tiny_model_dir) for argument in argv]
    output = argv[argv.index(flag) + 1]
    input_flag = {"extend_tokenizer": "--corpus", "../evaluate_models": "--open_file"}.get(tool, "--input")
    where = "is the" if output == str(data) else "is inside the"
    status, _, stderr = run_tool(tool, argv, capsys)
    assert status == 2
    assert last_line(stderr) == (f"error: {output}: {flag} {where} {input_flag} folder ({data}), which is read as "
                                 "data, all files below it: write elsewhere")
    assert sorted(os.listdir(data)) == ["abstracts.nbib", "sft.jsonl", "sub"] and os.listdir(data / "sub") == []
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".jsonl") and name != "other.jsonl"]


# ---- records JSON accepts and nothing after it can use ----


def bad_text_files(tmp_path) -> dict:
    """One file per shape; in each, the bad record is the one at line 2 (the .json array's second element)."""
    array = "[" + json.dumps(GOOD) + ",\n" + DEEP_LIST + ",\n" + json.dumps(GOOD) + "\n]\n"
    return {
        "surrogate.jsonl": (jsonl(GOOD, LONE_SURROGATE, PAIRED_SURROGATES), SURROGATE_MESSAGE, "lone surrogate"),
        "deep_list.jsonl": (jsonl(GOOD, DEEP_LIST, GOOD), DEPTH_MESSAGE, "too deeply nested"),
        "deep_object.jsonl": (jsonl(GOOD, DEEP_OBJECT, GOOD), DEPTH_MESSAGE, "too deeply nested"),
        "deep_array.json": (array, DEPTH_MESSAGE, "too deeply nested"),
    }


@pytest.mark.parametrize("name", ["surrogate.jsonl", "deep_list.jsonl", "deep_object.jsonl", "deep_array.json"])
def test_a_lone_surrogate_or_deep_nesting_is_the_same_record_error_in_every_tool_and_in_training(name, tiny_model_dir, tmp_path, capsys):
    text, message, kind = bad_text_files(tmp_path)[name]
    path = write(tmp_path / name, text)
    where = f"{path}:2"

    status, stdout, _ = run_tool("validate_data", ["--input", path, "--kind", "sft"], capsys)
    assert status == 2
    assert f"{where}: {message}" in stdout.splitlines()
    assert f"read 3 records, 2 valid, 1 invalid" in stdout

    for tool, extra in (("convert_data", ["--output_file", tmp_path / "out.jsonl"]), ("data_stats", [])):
        status, _, stderr = run_tool(tool, ["--input", path, *extra], capsys)
        assert status == 2, stderr[-2000:]
        assert last_line(stderr) == f"error: {where}: {message} (--skip_invalid True drops such records and counts them)"
    assert not os.path.exists(tmp_path / "out.jsonl")
    status, _, stderr = run_tool("convert_data", ["--input", path, "--output_file", tmp_path / "out.jsonl", "--to", "openai",
                                                  "--skip_invalid", "True"], capsys)
    assert status == 0, stderr[-2000:]
    assert f"dropped 1 x invalid: {kind} (first at {where})" in stderr
    with open(tmp_path / "out.jsonl", encoding="utf-8") as handle:
        converted = [json.loads(line) for line in handle]
    assert len(converted) == 2 and all("messages" in record for record in converted)

    status, stderr = run_main("supervised_finetuning.py", sft_flags(tiny_model_dir, path, tmp_path / "sft"), capsys)
    assert status == 2
    assert last_line(stderr) == f"error: {where}: {message}"
    assert not os.path.exists(tmp_path / "sft")


def test_training_skips_such_records_when_asked(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    files = bad_text_files(tmp_path)
    for name, (text, _, _) in files.items():
        write(data / name, text)
    status, stderr = run_main("supervised_finetuning.py", sft_flags(
        tiny_model_dir, data, tmp_path / "out", 1, "--skip_invalid_records", "True"), capsys)
    assert status == 0, stderr[-3000:]
    assert "train: read 12 records, kept 8, truncated 0, rejected 4" in stderr
    assert f"rejected 3 x too deeply nested (first at {data}/deep_array.json:2)" in stderr
    assert f"rejected 1 x lone surrogate (first at {data}/surrogate.jsonl:2)" in stderr


def test_nesting_up_to_the_limit_is_read_and_one_level_more_is_not():
    from medgpt.data import MAX_JSON_DEPTH, RecordError, parse_json

    assert MAX_JSON_DEPTH == 100
    assert parse_json("[" * 100 + "]" * 100) == json.loads("[" * 100 + "]" * 100)
    assert parse_json('{"a": ' * 99 + "[1]" + "}" * 99)["a"]["a"]["a"]
    for deeper in ("[" * 101 + "]" * 101, '{"a": ' * 100 + "[1]" + "}" * 100, DEEP_LIST, DEEP_OBJECT):
        error = parse_json(deeper)
        assert isinstance(error, RecordError) and error.kind == "too deeply nested"
    assert parse_json('{"\\udc00": "key"}').kind == "lone surrogate"
    assert parse_json('{"a": "\\\\ud800 is only text"}') == {"a": "\\ud800 is only text"}  # an escaped backslash
    assert parse_json('{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}  # a whole pair is one character


def test_tool_definitions_and_call_arguments_given_as_json_text_are_checked_too():
    from medgpt.data import RecordError, record_to_conversation

    calls = {"conversations": [{"from": "human", "value": "BMI?"},
                               {"from": "function_call", "value": '{"name": "bmi", "arguments": ' + DEEP_OBJECT + "}"},
                               {"from": "observation", "value": "22"}, {"from": "gpt", "value": "22"}]}
    with pytest.raises(RecordError, match="nested more than 100 levels"):
        record_to_conversation(calls)
    with pytest.raises(RecordError, match="lone surrogate"):
        record_to_conversation(dict(GOOD, tools='[{"name": "bmi\\ud800"}]'))


# ---- files that cannot be read, suffixes in capitals ----


def as_nobody() -> list[str]:
    """A command prefix that runs as the unprivileged user 'nobody' (root reads any file whatever its mode)."""
    if os.geteuid() != 0:
        return []
    for prefix in (["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"], ["runuser", "-u", "nobody", "--"]):
        if shutil.which(prefix[0]) and subprocess.run(prefix + ["true"], capture_output=True).returncode == 0:
            return prefix
    pytest.skip("running as root and neither setpriv nor runuser can switch to an unprivileged user")


@pytest.fixture
def shared_folder():
    """A folder another user can enter and write in (pytest's tmp_path is private to root)."""
    folder = tempfile.mkdtemp(prefix="robustness-")
    os.chmod(folder, 0o777)
    yield folder
    for root, dirs, _ in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
    shutil.rmtree(folder)


@pytest.mark.parametrize("what", ["file", "folder", "file-in-a-folder"])
def test_an_unreadable_file_or_folder_is_one_line_naming_it(what, shared_folder):
    prefix = as_nobody()
    data = os.path.join(shared_folder, "data")
    os.makedirs(os.path.join(data, "private"))
    os.chmod(data, 0o755)
    write(os.path.join(data, "sft.jsonl"), jsonl(GOOD))
    locked = write(os.path.join(data, "private", "locked.jsonl"), jsonl(GOOD))
    os.chmod(locked, 0o644)
    target = {"file": locked, "folder": os.path.join(data, "private"), "file-in-a-folder": locked}[what]
    os.chmod(target, 0o000)
    given = locked if what == "file" else data
    expected = (f"error: {target}: cannot read this file: Permission denied" if what != "folder"
                else f"error: {target}: cannot read this folder: Permission denied")
    env = dict(os.environ, HOME=shared_folder, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for tool, argv in (("validate_data", ["--kind", "sft"]), ("convert_data", ["--output_file", os.path.join(shared_folder, "o.jsonl")]),
                       ("data_stats", [])):
        result = subprocess.run(prefix + [sys.executable, os.path.join(REPO, "tools", f"{tool}.py"), "--input", given, *argv],
                                cwd=shared_folder, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (tool, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        if tool == "validate_data" and what != "folder":
            # validate reports every problem, this one among them, then its summary
            assert f"{locked}: cannot read this file: Permission denied (the rest of this file cannot be read)" in result.stdout
        else:
            assert last_line(result.stderr) == expected, (tool, result.stderr[-2000:])


def test_suffixes_in_any_case_are_data_and_other_files_are_listed(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write(data / "UPPER.JSONL", jsonl(GOOD, GOOD))
    write(data / "Mixed.Json", json.dumps([GOOD]))
    write(data / "notes.TXT", "plain text\n")
    for name in ("README.md", "data.csv", "a.parquet", "b.tsv", "c.yaml", "d.xml", "e.docx"):
        write(data / name, "x\n")
    status, _, stderr = run_tool("data_stats", ["--input", data, "--skip_invalid", "True"], capsys)
    assert status == 0, stderr[-2000:]
    assert (f"{data}: skipped 7 file(s) that are not .jsonl/.json/.txt: README.md, a.parquet, b.tsv, c.yaml, d.xml "
            "and 2 more") in stderr
    from medgpt.data import file_records, find_data_files

    files = find_data_files(str(data))
    assert [os.path.basename(name) for name in files] == ["Mixed.Json", "UPPER.JSONL", "notes.TXT"]
    assert [value for _, value in file_records(files[2])] == [{"text": "plain text"}]  # read as text, not JSON
    assert [line for line, _ in file_records(files[1])] == [1, 2]


# ---- a full disk ----


def test_a_full_disk_while_writing_results_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import medgpt.outputs

    data = write(tmp_path / "sft.jsonl", jsonl(GOOD, GOOD))
    out = tmp_path / "results" / "converted.jsonl"
    real_open = open

    class FullDisk:
        """A file whose writes fail as on a full disk (the error names no file, as write(2) does not)."""

        def __init__(self, path, *args, **kwargs):
            self.stream = real_open(path, *args, **kwargs)

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

    monkeypatch.setattr(medgpt.outputs, "open", FullDisk, raising=False)
    status, _, stderr = run_tool("convert_data", ["--input", data, "--output_file", out], capsys)
    assert status == 1
    assert last_line(stderr) == f"error: {out}: no space left on device"
    assert "Traceback" not in stderr
    assert os.listdir(tmp_path / "results") == []  # neither the result nor its temporary file


def test_a_full_disk_while_saving_a_checkpoint_removes_that_checkpoint_only(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import torch

    data, out = write(tmp_path / "sft.jsonl", jsonl(*[GOOD] * 8)), tmp_path / "out"
    real_save, real_usage = torch.save, shutil.disk_usage

    def save(obj, path, *args, **kwargs):
        if str(path).endswith(os.path.join("checkpoint-2", "optimizer.pt")):
            with open(path, "wb") as handle:  # torch's writer leaves what it wrote, then says only this
                handle.write(b"PK\x03\x04 partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_save(obj, path, *args, **kwargs)

    def usage(path):
        return real_usage(path)._replace(free=0)  # and the disk is full

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", usage)
    status, stderr = run_main("supervised_finetuning.py", sft_flags(
        tiny_model_dir, data, out, 3, "--save_strategy", "steps", "--save_steps", "1"), capsys)
    assert status == 1, stderr[-3000:]
    assert last_line(stderr) == f"error: {out}/checkpoint-2: no space left on device"
    assert f"removed the incomplete {out}/checkpoint-2" in stderr
    assert checkpoints(out) == ["checkpoint-1"]
    from medgpt.outputs import checkpoint_problem

    assert checkpoint_problem(out / "checkpoint-1") is None  # still there to resume from
    assert not [name for name in os.listdir(out) if name.endswith(".safetensors") or name == "config.json"]


def test_a_full_disk_is_told_apart_from_other_errors(tmp_path, capsys):
    from medgpt.errors import exit_on_input_error, is_disk_full

    class SafetensorError(Exception):
        pass

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    short_write = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert not is_disk_full(short_write)  # without a folder to look at, a short write is not taken for a full disk
    assert not is_disk_full(short_write, str(tmp_path))  # this disk has room
    assert not is_disk_full(OSError(errno.EIO, "Input/output error"))
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors")
    assert is_disk_full(wrapped)

    assert exit_of_a_main_raising(wrapped, capsys) == (1, "error: /data/out/model.safetensors: no space left on device")

    @exit_on_input_error
    def other():
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError):  # not a full disk: the traceback a bug report needs
        other()
