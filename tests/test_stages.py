"""The stage scripts end to end on a tiny model: PT, SFT (LoRA, full, QLoRA, continued adapter, resume,
torchrun), merge and batch inference."""

import json
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, TEST_DATA, TORCHRUN, run_script, tiny_training_flags

SFT_SAMPLES = os.path.join(REPO, "data", "finetune", "medical_sft_zh.jsonl")
TOOL_CALLS = os.path.join(TEST_DATA, "sft", "toolcall_zh.jsonl")
# Where bitsandbytes reports its CPU kernels as on a CPU with AVX-512 BF16 (see its sitecustomize.py).
AVX512_BF16 = os.path.join(REPO, "tests", "avx512_bf16")


def trainer_state(output_dir):
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as handle:
        return json.load(handle)


def losses(output_dir):
    return [entry["loss"] for entry in trainer_state(output_dir)["log_history"] if "loss" in entry]


def test_sft_lora_on_a_folder_of_medicalgpt_format_files(tiny_model_dir, tmp_path):
    """A folder as MedicalGPT's sft data has it: medical conversations and glaive-format tool calls."""
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    for path in (SFT_SAMPLES, TOOL_CALLS):
        shutil.copy(path, data)
    out = tmp_path / "sft"
    result = run_script(
        "supervised_finetuning.py", "--model_name_or_path", tiny_model_dir,
        "--train_file_dir", str(data), "--output_dir", str(out),
        "--use_peft", "True", "--template_name", "chatml", "--max_steps", "2",
        # One sample a step: the tiny model's 49k-token vocabulary makes logits over 8 x 1024 tokens slow on CPU.
        "--per_device_train_batch_size", "1",
        env={"PYTHONPATH": os.pathsep.join(filter(None, [AVX512_BF16, os.environ.get("PYTHONPATH")]))},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train: read 126 records, kept 126" in result.stderr
    # Libraries' notices that ask nothing of the user stay out of the log: bitsandbytes' optional CPU kernel
    # and transformers' renamed gradient-checkpointing methods, which peft and TRL still call.
    assert "kernels-community" not in result.stderr and "FutureWarning" not in result.stderr, result.stderr[-3000:]
    assert trainer_state(out)["global_step"] == 2
    assert all(0 < loss < 20 for loss in losses(out))
    assert os.path.isfile(out / "adapter_model.safetensors")
    # The saved tokenizer carries the template training used.
    from template import get_template

    saved = AutoTokenizer.from_pretrained(out)
    assert saved.chat_template == get_template("chatml").to_jinja()
    # ... in plain Jinja2, which every serving engine can read, rendering exactly the training text
    import jinja2

    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "发烧怎么办？"},
                    {"role": "assistant", "content": "多喝水，体温超过39度请就医。"}]
    special = {"bos_token": saved.bos_token or "", "eos_token": saved.eos_token or ""}
    plain = jinja2.Environment().from_string(saved.chat_template)
    for prompt in (False, True):
        messages = conversation[:-1] if prompt else conversation
        assert plain.render(messages=messages, add_generation_prompt=prompt, **special) == get_template("chatml").render(
            messages, prompt, **special)
    assert os.listdir(out / "runs"), "TensorBoard logs"


def test_sft_on_tool_calls_saves_a_template_that_renders_the_training_text(tiny_model_dir, tmp_path):
    import shutil

    from medgpt.data import DataReport, load_records
    from template import get_template

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(TOOL_CALLS, data)
    out = tmp_path / "sft_tools"
    result = run_script(
        "supervised_finetuning.py", "--model_name_or_path", tiny_model_dir, "--train_file_dir", str(data),
        "--use_peft", "True", "--template_name", "qwen", *tiny_training_flags(out),
        "--per_device_train_batch_size", "1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train: read 12 records, kept 12" in result.stderr
    assert all(0 < loss < 20 for loss in losses(out))
    # The saved template renders tool definitions, calls and results exactly as training did.
    saved = AutoTokenizer.from_pretrained(out)
    qwen = get_template("qwen")
    special = {"bos_token": saved.bos_token or "", "eos_token": saved.eos_token or ""}
    records = load_records(str(data), "conversation", DataReport("train"), skip_invalid=False)
    record = next(r for r in records if r["tools"] and any(m.get("tool_calls") for m in r["messages"]))
    training_text = "".join(p + a for p, a in qwen.split(record["messages"], tools=record["tools"], **special))
    assert saved.apply_chat_template(record["messages"], tools=record["tools"], tokenize=False) == training_text
    assert "<tool_call>\n{\"name\": \"calculate_bmi\"" in training_text


def test_sft_full_weights_from_a_config_file_with_cli_override(tiny_model_dir, tmp_path):
    out = tmp_path / "full"
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model_dir}\ntrain_file_dir: {SFT_SAMPLES}\n"
        f"template_name: chatml\nmax_steps: 50\nmax_train_samples: 40\nmodel_max_length: 512\n"
        f"per_device_train_batch_size: 4\nlearning_rate: 0.003\nlogging_steps: 1\nreport_to: none\n"
        f"save_strategy: 'no'\noutput_dir: {out}\n",
        encoding="utf-8",
    )
    result = run_script("supervised_finetuning.py", str(config), "--max_steps", "6")
    assert result.returncode == 0, result.stderr[-3000:]
    assert trainer_state(out)["global_step"] == 6  # the CLI won over the file
    assert os.path.isfile(out / "model.safetensors") and not os.path.exists(out / "adapter_config.json")
    history = losses(out)
    assert history[-1] < history[0], history  # full fine-tuning learns


def test_pretraining_blocks_tokens_and_continuing_its_adapter_in_sft(tiny_model_dir, tmp_path):
    pt_out, sft_out = tmp_path / "pt", tmp_path / "sft"
    result = run_script(
        "pretraining.py", "--model_name_or_path", tiny_model_dir,
        "--train_file_dir", os.path.join(REPO, "data", "pretrain"), "--block_size", "64",
        "--use_peft", "True", "--lora_rank", "4", *tiny_training_flags(pt_out, steps=3),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    documents = 0
    for name in os.listdir(os.path.join(REPO, "data", "pretrain")):  # plain text and {"text"} records, one a line
        with open(os.path.join(REPO, "data", "pretrain", name), encoding="utf-8") as handle:
            documents += sum(1 for line in handle if line.strip())
    assert f"train: {documents} documents" in result.stderr
    assert trainer_state(pt_out)["num_input_tokens_seen"] == 3 * 2 * 64  # full blocks, no padding
    assert os.path.isfile(pt_out / "adapter_model.safetensors")

    result = run_script(
        "supervised_finetuning.py", "--model_name_or_path", tiny_model_dir, "--template_name", "chatml",
        "--train_file_dir", TOOL_CALLS,
        "--use_peft", "True", "--peft_path", str(pt_out), *tiny_training_flags(sft_out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"continuing LoRA adapter from {pt_out}" in result.stderr
    with open(sft_out / "adapter_config.json", encoding="utf-8") as handle:
        assert json.load(handle)["r"] == 4  # the PT adapter's shape, not a fresh default one
    before, after = load_file(pt_out / "adapter_model.safetensors"), load_file(sft_out / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_qlora_4bit_training_runs_and_full_training_of_4bit_is_refused(tiny_model_dir, tmp_path):
    data = SFT_SAMPLES
    common = ["--model_name_or_path", tiny_model_dir, "--template_name", "chatml", "--train_file_dir", data,
              "--max_train_samples", "8", "--model_max_length", "512"]
    result = run_script("supervised_finetuning.py", *common, "--qlora", "True", "--use_peft", "True",
                        *tiny_training_flags(tmp_path / "qlora"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(0 < loss < 20 for loss in losses(tmp_path / "qlora"))
    result = run_script("supervised_finetuning.py", *common, "--load_in_4bit", "True", *tiny_training_flags(tmp_path / "x"))
    assert result.returncode == 2
    assert "quantized weights cannot be trained in full" in result.stderr


def test_resume_from_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "resume"
    common = ["--model_name_or_path", tiny_model_dir, "--template_name", "chatml", "--use_peft", "True",
              "--train_file_dir", SFT_SAMPLES,
              "--max_train_samples", "16", "--model_max_length", "512", "--per_device_train_batch_size", "2",
              "--report_to", "none", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1",
              "--output_dir", str(out)]
    assert run_script("supervised_finetuning.py", *common, "--max_steps", "2").returncode == 0
    assert os.path.isdir(out / "checkpoint-2")
    result = run_script("supervised_finetuning.py", *common, "--max_steps", "4", "--resume_from_checkpoint", str(out / "checkpoint-2"))
    assert result.returncode == 0, result.stderr[-3000:]
    state = trainer_state(out)
    assert state["global_step"] == 4
    # The history restored from checkpoint-2 holds steps 1-2; the resumed run adds 3-4 without redoing any.
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4]


def test_torchrun_two_processes(tiny_model_dir, tmp_path):
    out = tmp_path / "ddp"
    result = run_script(
        "supervised_finetuning.py", "--model_name_or_path", tiny_model_dir, "--template_name", "chatml",
        "--train_file_dir", SFT_SAMPLES, "--use_peft", "True",
        "--max_train_samples", "16", "--model_max_length", "512", *tiny_training_flags(out),
        launcher=TORCHRUN,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training on 2 process(es)" in result.stderr
    assert trainer_state(out)["global_step"] == 2
    assert os.path.isfile(out / "adapter_model.safetensors")


def test_merged_model_matches_base_plus_adapter(tiny_model_dir, random_adapter, tmp_path):
    from peft import PeftModel

    out = tmp_path / "merged"
    result = run_script("merge_peft_adapter.py", "--base_model", tiny_model_dir, "--lora_model", random_adapter,
                        "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(out / "model.safetensors") and os.path.isfile(out / "tokenizer_config.json")
    ids = torch.randint(10, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        plain = base(ids).logits
        expected = PeftModel.from_pretrained(base, random_adapter)(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    assert not torch.allclose(plain, expected, atol=1e-3)  # the adapter does change the outputs
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)

    # A second merge into the same folder is refused unless asked for, and nothing is overwritten.
    stamp = os.path.getmtime(out / "model.safetensors")
    result = run_script("merge_peft_adapter.py", "--base_model", tiny_model_dir, "--lora_model", random_adapter,
                        "--output_dir", str(out))
    assert result.returncode == 2
    assert "output folder is not empty" in result.stderr
    assert os.path.getmtime(out / "model.safetensors") == stamp


def test_merge_over_an_adapter_folder_replaces_the_adapter_and_keeps_other_files(tiny_model_dir, random_adapter, tmp_path):
    """Merging into a folder that holds an older adapter: adapter files left beside the merged weights would
    be loaded instead of them."""
    import shutil

    from peft import PeftModel
    from safetensors.torch import save_file

    out = tmp_path / "sft"
    shutil.copytree(random_adapter, out)
    old = {name: 3 * tensor for name, tensor in load_file(out / "adapter_model.safetensors").items()}
    save_file(old, out / "adapter_model.safetensors")  # an older, different adapter
    (out / "notes.txt").write_text("my notes", encoding="utf-8")
    result = run_script("merge_peft_adapter.py", "--base_model", tiny_model_dir, "--lora_model", random_adapter,
                        "--output_dir", str(out), "--overwrite", "True")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not any(name.startswith("adapter_") for name in os.listdir(out)), os.listdir(out)
    assert (out / "notes.txt").read_text(encoding="utf-8") == "my notes"
    assert not [name for name in os.listdir(out) if name.startswith(".")], "the staging folder is left behind"
    ids = torch.randint(10, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), random_adapter)(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)


def test_sft_on_real_records_longer_than_the_limit_trains_and_counts_them(tiny_model_dir, tmp_path):
    """The first 40 Chinese sample records at a 128-token limit: many are longer."""
    data = tmp_path / "first40.jsonl"
    with open(SFT_SAMPLES, encoding="utf-8") as handle:
        data.write_text("".join(next(handle) for _ in range(40)), encoding="utf-8")
    result = run_script(
        "supervised_finetuning.py", "--model_name_or_path", tiny_model_dir, "--template_name", "chatml",
        "--train_file_dir", str(data), "--model_max_length", "128", "--use_peft", "True", *tiny_training_flags(tmp_path / "out"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stderr.splitlines() if "train: read 40 records" in line)
    kept, truncated = (int(line.split(word)[1].split(",")[0]) for word in ("kept ", "truncated "))
    assert kept == 40 and truncated > 0, line
    assert all(0 < loss < 20 for loss in losses(tmp_path / "out"))


def test_batch_inference_keeps_order_and_matches_one_at_a_time(tiny_model_dir, random_adapter, tmp_path):
    from medgpt.generation import ChatModel, GenerationArguments, InferenceModelArguments

    questions = ["What causes anemia?", "高血压怎么办？", "Is fever dangerous?", "What is insulin?", "咳嗽两周了"]
    query_file = tmp_path / "queries.jsonl"
    query_file.write_text("".join(json.dumps({"question": q}, ensure_ascii=False) + "\n" for q in questions), encoding="utf-8")
    answers_file = tmp_path / "answers.jsonl"
    result = run_script(
        "inference.py", "--base_model", tiny_model_dir, "--lora_model", random_adapter, "--template_name", "chatml",
        "--data_file", str(query_file), "--output_file", str(answers_file), "--batch_size", "2",
        "--max_new_tokens", "6", "--temperature", "0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in answers_file.read_text(encoding="utf-8").splitlines()]
    assert [row["input"] for row in rows] == questions

    model = ChatModel(InferenceModelArguments(base_model=tiny_model_dir, lora_model=random_adapter, template_name="chatml"))
    greedy = GenerationArguments(max_new_tokens=6, temperature=0)
    alone = [model.answer_batch([[{"role": "user", "content": q}]], greedy, batch_size=1)[0] for q in questions]
    assert [row["output"] for row in rows] == alone
    assert len(set(alone)) > 1  # the answers differ, so a shuffled order would be caught



def test_interactive_chat_streams_answers_and_clears_history(tiny_model_dir, tmp_path):
    command = [sys.executable, os.path.join(os.path.dirname(os.path.dirname(__file__)), "inference.py"),
               "--base_model", tiny_model_dir, "--template_name", "chatml", "--interactive", "True",
               "--max_new_tokens", "4", "--temperature", "0"]
    import subprocess

    result = subprocess.run(command, input="hello\nclear\nwhat is fever?\nexit\nnever read\n", capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("Assistant: ") == 2  # two questions answered; 'exit' stopped before the last line
    assert "(conversation cleared)" in result.stdout
