"""Bad or unusual input, as a new user would give it, one row a case: the script, its arguments, the exit
status and a fragment of the last line it prints. Adding a case is adding a row.

The rows call each script's `main` in this process (the seconds of importing torch and transformers are
paid once, not per row); what a user sees from the real command line (one line, exit status 2, no
traceback) is checked on subprocesses in test_data.py and below.

Placeholders in the arguments: {tiny} the tiny model folder, {adapter} a LoRA adapter for it, {tmp} the
test's folder, {out} an output folder that must not appear when the run fails, and {NAME} any file made
by `make_inputs` (e.g. {sft}, {bad_utf8}, {config_float_steps})."""

import http.server
import json
import os
import threading

import pytest

from conftest import REPO, exit_of_a_main_raising, run_main, run_script

GOOD = {"conversations": [{"from": "human", "value": "What is a fever?"}, {"from": "gpt", "value": "A raised body temperature."}]}
PAIR = {"conversations": [{"from": "human", "value": "Can I take ibuprofen?"}], "chosen": "With food, yes.", "rejected": "Take double."}
TOOLS = [{"name": "bmi", "description": "Body-mass index", "parameters": {"type": "object", "properties": {}}}]
TOOL_USE = {"tools": TOOLS, "conversations": [
    {"from": "human", "value": "BMI for 70 kg, 1.75 m?"}, {"from": "function_call", "value": '{"name": "bmi", "arguments": {"kg": 70}}'},
    {"from": "observation", "value": '{"bmi": 22.9}'}, {"from": "gpt", "value": "22.9"}]}


def jsonl(*records) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def make_inputs(tmp_path, tiny) -> dict:
    """Every input file the cases use, written into the test's folder."""
    texts = {
        "sft": jsonl(GOOD, GOOD, GOOD, GOOD),
        "sft40": jsonl(*[GOOD] * 40),
        "bad_utf8": jsonl(GOOD).encode() + b'{"conversations": [{"from": "human", "value": "caf\xe9"}, {"from": "gpt", "value": "A"}]}\n' + jsonl(GOOD, GOOD).encode(),
        "unusable_validation": jsonl({"conversations": []}, {"text": "no conversation"}),
        "array_missing_comma.json": '[\n  {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},\n'
                                    '  {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}\n'
                                    '  {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}\n]\n',
        "same_pair": jsonl(dict(PAIR, rejected=PAIR["chosen"]), PAIR),
        "pairs": jsonl(PAIR, PAIR),
        "tool_use": jsonl(GOOD, TOOL_USE, GOOD),
        "tool_pairs": jsonl(PAIR, dict(PAIR, tools=TOOLS)),
        "tool_questions": jsonl({"question": "What is a fever?"}, {"question": "BMI for 70 kg?", "tools": TOOLS}),
        "questions": jsonl({"question": "What is a fever?", "answer": "raised temperature"}),
        "config_float_steps.yaml": f"model_name_or_path: {tiny}\ntemplate_name: chatml\nmax_steps: 1.5\n",
        "config_broken.yaml": f"model_name_or_path: {tiny}\ntemplate_name: chatml\nreport_to: [none\nmax_steps: 2\n",
        "config_no_quotes.yaml": f"model_name_or_path: {tiny}\nsave_strategy: no\n",
        "config_list_steps.yaml": f"model_name_or_path: {tiny}\nmax_steps: [1, 2]\n",
        "config_bool_steps.yaml": f"model_name_or_path: {tiny}\nmax_steps: yes\n",
        "config_resume_true.yaml": f"model_name_or_path: {tiny}\ntemplate_name: chatml\nresume_from_checkpoint: true\noutput_dir: {tmp_path / 'out'}\n",
        "pretty_object.json": '{\n  "conversations": [\n    {"from": "human", "value": "Q"},\n    {"from": "gpt" "value": "A"}\n  ]\n}\n',
        "existing_file.txt": "a file, not a folder\n",
    }
    paths = {}
    for name, content in texts.items():
        path = tmp_path / (name if "." in name else name + ".jsonl")
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        paths[name.split(".")[0]] = str(path)
    for name in ("empty_folder", "config_only_folder"):
        (tmp_path / name).mkdir()
        paths[name] = str(tmp_path / name)
    (tmp_path / "config_only_folder" / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    return paths


SFT = ["supervised_finetuning.py", "--model_name_or_path", "{tiny}", "--template_name", "chatml", "--train_file_dir", "{sft}",
       "--max_steps", "1", "--report_to", "none", "--save_strategy", "no", "--output_dir", "{out}"]
PT = ["pretraining.py", "--model_name_or_path", "{tiny}", "--train_file_dir", "{sft}", "--output_dir", "{out}"]
DPO = ["dpo_training.py", "--model_name_or_path", "{tiny}", "--template_name", "chatml", "--train_file_dir", "{pairs}",
       "--max_steps", "1", "--report_to", "none", "--save_strategy", "no", "--output_dir", "{out}"]
PPO_DEFAULT_REWARD = ["ppo_training.py", "--model_name_or_path", "{tiny}", "--template_name", "chatml",
                      "--train_file_dir", "{questions}", "--output_dir", "{out}"]
PPO = PPO_DEFAULT_REWARD + ["--reward_funcs", "format"]
INFER = ["inference.py", "--base_model", "{tiny}", "--template_name", "chatml", "--data_file", "{questions}"]
MERGE = ["merge_peft_adapter.py", "--base_model", "{tiny}", "--lora_model", "{adapter}"]


def with_flag(command: list[str], flag: str, value: str) -> list[str]:
    """The command with one flag's value replaced (or the flag added)."""
    if flag in command:
        index = command.index(flag)
        return command[: index + 1] + [value] + command[index + 2 :]
    return command + [flag, value]


# (case id, command, exit status, fragment of the last stderr line, or of stderr for status 0)
CASES = [
    # output locations, checked before any work
    ("merge-into-a-file", MERGE + ["--output_dir", "{existing_file}"], 2, "{existing_file}: --output_dir is an existing file, not a folder"),
    ("merge-below-a-file", MERGE + ["--output_dir", "{existing_file}/merged"], 2, "--output_dir cannot be created: {existing_file} is a file"),
    ("sft-output-dir-is-a-file", with_flag(SFT, "--output_dir", "{existing_file}"), 2, "--output_dir is an existing file"),
    ("inference-output-is-a-folder", INFER + ["--output_file", "{tmp}"], 2, "{tmp}: --output_file is a folder, not a file"),
    ("inference-output-below-a-file", INFER + ["--output_file", "{existing_file}/answers.jsonl"], 2, "cannot be created: {existing_file} is a file"),
    # model and adapter folders
    ("model-folder-is-empty", with_flag(SFT, "--model_name_or_path", "{empty_folder}"), 2, "{empty_folder}: no config.json here: not a model folder"),
    ("model-folder-without-weights", with_flag(SFT, "--model_name_or_path", "{config_only_folder}"), 2, "no model weights (.safetensors or .bin files) in this folder"),
    ("adapter-given-as-the-model", with_flag(SFT, "--model_name_or_path", "{adapter}"), 2, "this is a LoRA adapter folder, not a model"),
    ("peft-path-is-not-an-adapter", SFT + ["--use_peft", "True", "--peft_path", "{tiny}"], 2, "not a LoRA adapter folder (--peft_path) (it holds a full model"),
    ("inference-lora-model-missing", INFER + ["--lora_model", "{tmp}/nope"], 2, "{tmp}/nope: adapter folder not found (--lora_model)"),
    ("merge-base-model-missing", ["merge_peft_adapter.py", "--base_model", "{tmp}/nope", "--lora_model", "{adapter}", "--output_dir", "{out}"], 2,
     "{tmp}/nope: model folder not found"),
    # option values, from flags and from config files alike
    ("lora-rank-0", SFT + ["--use_peft", "True", "--lora_rank", "0"], 2, "error: --lora_rank must be at least 1, got 0"),
    ("lora-dropout-1", SFT + ["--use_peft", "True", "--lora_dropout", "1"], 2, "--lora_dropout must be in [0, 1), got 1.0"),
    ("block-size-0", PT + ["--block_size", "0"], 2, "error: --block_size must be at least 2, got 0"),
    ("model-max-length-0", SFT + ["--model_max_length", "0"], 2, "--model_max_length must be at least 2, got 0"),
    ("batch-size-0", with_flag(SFT, "--max_steps", "1") + ["--per_device_train_batch_size", "0"], 2, "--per_device_train_batch_size must be at least 1, got 0"),
    ("ppo-batch-size-0", PPO + ["--per_device_train_batch_size", "0"], 2, "--per_device_train_batch_size must be at least 1, got 0"),
    ("ppo-rollout-size-0", PPO + ["--rollout_batch_size", "0"], 2, "--rollout_batch_size must be at least 1, got 0"),
    ("max-steps-0", with_flag(SFT, "--max_steps", "0"), 2, "--max_steps must be a positive number of steps or -1, got 0"),
    ("max-prompt-length-not-below-max-length", DPO + ["--max_length", "64", "--max_prompt_length", "64"], 2, "--max_prompt_length must be smaller than --max_length (64)"),
    ("validation-split-100", SFT + ["--validation_split_percentage", "100"], 2, "--validation_split_percentage must be in [0, 100), got 100.0"),
    ("inference-batch-size-0", INFER + ["--batch_size", "0"], 2, "--batch_size must be at least 1, got 0"),
    ("inference-top-p-0", INFER + ["--top_p", "0"], 2, "--top_p must be in (0, 1], got 0.0"),
    ("yaml-list-for-an-int", ["supervised_finetuning.py", "{config_list_steps}"], 2, "{config_list_steps}:2: max_steps: expected int, got [1, 2]"),
    ("yaml-boolean-for-an-int", ["supervised_finetuning.py", "{config_bool_steps}"], 2, "{config_bool_steps}:2: max_steps: expected int, got True"),
    ("yaml-resume-true-without-checkpoints", ["supervised_finetuning.py", "{config_resume_true}", "--train_file_dir", "{sft}"], 2,
     "{out}: no checkpoint-N folder to resume from (--resume_from_checkpoint)"),
    ("yaml-float-for-an-int", ["supervised_finetuning.py", "{config_float_steps}"], 2, "{config_float_steps}:3: max_steps: expected int, got 1.5"),
    ("yaml-syntax-error", ["supervised_finetuning.py", "{config_broken}"], 2, "{config_broken}:4: cannot parse config"),
    ("yaml-unquoted-no", ["supervised_finetuning.py", "{config_no_quotes}"], 2, "{config_no_quotes}:2: save_strategy: False is not one of no, steps, epoch"),
    ("neft-alpha-given-twice", SFT + ["--neft_alpha", "5", "--neftune_noise_alpha", "3"], 2, "--neft_alpha and --neftune_noise_alpha are the same option"),
    ("unknown-flag", SFT + ["--lora_r", "8"], 2, "unrecognized arguments: --lora_r 8"),
    ("resume-from-a-missing-checkpoint", SFT + ["--resume_from_checkpoint", "{tmp}/checkpoint-9"], 2, "{tmp}/checkpoint-9: checkpoint folder not found"),
    ("ppo-resume-from-a-model-folder", PPO + ["--resume_from_checkpoint", "{tiny}"], 2, "{tiny}: not a checkpoint folder (--resume_from_checkpoint)"),
    ("ppo-has-no-validation", PPO + ["--validation_file_dir", "{questions}"], 2, "ppo_training.py does not evaluate"),
    # results never replace what a run reads
    ("output-dir-is-the-model", with_flag(SFT, "--output_dir", "{tiny}"), 2, "{tiny}: --output_dir is the --model_name_or_path folder"),
    ("merge-into-the-adapter-merged", MERGE + ["--output_dir", "{adapter}", "--overwrite", "True"], 2, "--output_dir is the --lora_model folder"),
    ("inference-answers-over-the-questions", INFER + ["--output_file", "{questions}"], 2, "--output_file is the --data_file"),
    ("inference-output-file-when-interactive", ["inference.py", "--base_model", "{tiny}", "--interactive", "True", "--output_file", "{tmp}/a.jsonl"], 2,
     "--output_file goes with --data_file, not --interactive"),
    # data files
    ("pretty-printed-json-with-a-syntax-error", with_flag(SFT, "--train_file_dir", "{pretty_object}"), 2, "{pretty_object}:4: malformed JSON: Expecting ',' delimiter"),
    ("invalid-utf8", with_flag(SFT, "--train_file_dir", "{bad_utf8}"), 2, "{bad_utf8}:2: not valid UTF-8 text"),
    ("invalid-utf8-skipped", with_flag(SFT, "--train_file_dir", "{bad_utf8}") + ["--skip_invalid_records", "True"], 0,
     "train: read 4 records, kept 3, truncated 0, rejected 1\n"),
    ("json-array-missing-comma", with_flag(SFT, "--train_file_dir", "{array_missing_comma}"), 2, "{array_missing_comma}:3: malformed JSON: ',' or ']' missing"),
    ("validation-all-rejected", SFT + ["--validation_file_dir", "{unusable_validation}", "--skip_invalid_records", "True"], 2,
     "{unusable_validation}: no usable validation records: every one was rejected"),
    ("sample-cap-is-reported", with_flag(SFT, "--train_file_dir", "{sft40}") + ["--max_train_samples", "5"], 0,
     "train: read 40 records, kept 5, truncated 0, rejected 0, left out 35 (over --max_train_samples)"),
    ("chosen-equals-rejected", with_flag(DPO, "--train_file_dir", "{same_pair}"), 2,
     "{same_pair}:1: chosen and rejected are the same answer"),
    ("ppo-default-reward-needs-the-reward-model", PPO_DEFAULT_REWARD, 2, "--reward_funcs model needs --reward_model_path"),
    # tool use with a template that has no tool format: refused with the record's line, before any work
    ("sft-tools-with-a-template-without-tools", with_flag(with_flag(SFT, "--train_file_dir", "{tool_use}"), "--template_name", "llama3"), 2,
     "{tool_use}:2: template 'llama3': template llama3 has no tool-call format"),
    ("sft-tools-skipped-and-counted", with_flag(with_flag(SFT, "--train_file_dir", "{tool_use}"), "--template_name", "gemma")
     + ["--skip_invalid_records", "True"], 0, "train: read 3 records, kept 2, truncated 0, rejected 1"),
    ("dpo-tools-with-a-template-without-tools", with_flag(with_flag(DPO, "--train_file_dir", "{tool_pairs}"), "--template_name", "phi3"), 2,
     "{tool_pairs}:2: template 'phi3': template phi3 has no tool-call format"),
    # serving
    ("api-model-folder-missing", ["openai_api.py", "--base_model", "{tmp}/nope", "--port", "0"], 2, "{tmp}/nope: model folder not found"),
    ("api-lora-modules-without-a-path", ["openai_api.py", "--base_model", "{tiny}", "--lora_modules", "doctor"], 2,
     "--lora_modules takes name=path, got 'doctor'"),
    ("api-adapter-of-another-model", ["openai_api.py", "--base_model", "{tiny}", "--port", "0", "--lora_modules", "x={foreign_adapter}"], 2,
     "{foreign_adapter}: the adapter (--lora_modules) does not fit the base model"),
    ("inference-adapter-of-another-model", with_flag(INFER, "--lora_model", "{foreign_adapter}"), 2,
     "the adapter (--lora_model) does not fit the base model"),
    ("inference-tools-refused-before-the-model-loads", with_flag(with_flag(INFER, "--data_file", "{tool_questions}"), "--template_name", "gemma"), 2,
     "{tool_questions}:2: template 'gemma': template gemma has no tool-call format"),
]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    path = tmp_path_factory.mktemp("adapter")
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def foreign_adapter_dir(tmp_path_factory):
    """A LoRA adapter trained on another model (32 wide, not 64): its weights do not fit the tiny model."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    path = tmp_path_factory.mktemp("foreign_adapter")
    get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("command, status, message", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input(command, status, message, tiny_model_dir, adapter_dir, foreign_adapter_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(REPO)
    values = dict(make_inputs(tmp_path, tiny_model_dir), tiny=tiny_model_dir, adapter=adapter_dir, tmp=str(tmp_path),
                  out=str(tmp_path / "out"), foreign_adapter=foreign_adapter_dir)
    before = {name: os.path.getmtime(tmp_path / name) for name in os.listdir(tmp_path)}
    script, *argv = [argument.format(**values) for argument in command]
    returncode, stderr = run_main(script, argv, capsys)
    expected = message.format(**values)
    assert returncode == status, stderr[-3000:]
    if status == 0:
        assert expected in stderr
        return
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, last
    assert not os.path.exists(tmp_path / "out"), "a failed run left an output folder"
    assert {name: os.path.getmtime(tmp_path / name) for name in before} == before, "a failed run changed an input"


class RecordingHandler(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802
        RecordingHandler.requests.append(self.path)
        self.send_response(404)
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("script, flag, missing", [
    ("supervised_finetuning.py", "--model_name_or_path", "models/no-such-model"),
    ("supervised_finetuning.py", "--model_name_or_path", "org/name"),
    ("inference.py", "--base_model", "outputs/sft-merged-missing"),
])
def test_a_missing_model_folder_fails_at_once_without_asking_the_hub(script, flag, missing, tmp_path):
    """Downloads are off unless HF_HUB_OFFLINE=0: the hub endpoint (a recording server on loopback) must
    see no request, whatever shape the missing path has, and the command line shows one line."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RecordingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    RecordingHandler.requests = []
    try:
        env = {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HUB_OFFLINE": ""}
        if script == "inference.py":
            extra = ["--interactive", "True"]
        else:
            extra = ["--train_file_dir", os.path.join(REPO, "data", "finetune"), "--output_dir", str(tmp_path / "out")]
        result = run_script(script, flag, missing, *extra, env=env, timeout=60)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith(f"error: {missing}: model folder not found"), result.stderr[-500:]
        assert RecordingHandler.requests == []
    finally:
        server.shutdown()


def test_ctrl_c_ends_a_program_with_one_line_and_status_130(capsys):
    assert exit_of_a_main_raising(KeyboardInterrupt(), capsys) == (130, "interrupted")
