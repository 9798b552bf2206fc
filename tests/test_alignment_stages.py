"""The alignment stage scripts end to end: each runs with LoRA and with full weights on the project's data
and on MedicalGPT-format tool-call pairs (tests/data); each moves its objective on a tiny model; bad input; torchrun."""

import json
import os
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, TEST_DATA, TORCHRUN, TOY_REWARD, ppo_log, run_main, run_script, tiny_training_flags
from medgpt.chat import ChatFormat
from medgpt.data import DataReport, load_records
from medgpt.encoding import encode_preferences

PAIR_LENGTHS = ["--max_length", "256", "--max_prompt_length", "128"]


def results(output_dir) -> dict:
    with open(os.path.join(output_dir, "all_results.json"), encoding="utf-8") as handle:
        return json.load(handle)


def log_history(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as handle:
        return json.load(handle)["log_history"]


def assert_saved_model(output_dir, lora: bool):
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    assert os.path.isfile(os.path.join(output_dir, weights))
    with open(os.path.join(output_dir, "chat_template.jinja"), encoding="utf-8") as handle:
        assert "<|im_start|>" in handle.read()


def mode_flags(lora: bool) -> list[str]:
    return ["--use_peft", "True"] if lora else []


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    """A reward model (LoRA adapter with its score head) trained for a few steps: PPO's and GRPO's scorer."""
    out = tmp_path_factory.mktemp("rm")
    result = run_script(
        "reward_modeling.py", "--model_name_or_path", tiny_model_dir, "--template_name", "chatml",
        "--train_file_dir", os.path.join(REPO, "data", "reward"), "--use_peft", "True", *PAIR_LENGTHS,
        *tiny_training_flags(out, steps=2),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return str(out)


# ---- every stage runs, LoRA and full ----

# Preference pairs: the LoRA runs take MedicalGPT's tool-call format (tools, calls and results in the prompt).
PREFERENCE_DATA = {True: os.path.join(TEST_DATA, "reward"), False: os.path.join(REPO, "data", "reward")}
QUESTIONS = os.path.join(REPO, "data", "grpo")


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_reward_modeling_runs_and_reports_pairwise_accuracy(tiny_model_dir, tmp_path, lora):
    result = run_script(
        "reward_modeling.py", "--model_name_or_path", tiny_model_dir, "--template_name", "chatml",
        "--train_file_dir", PREFERENCE_DATA[lora], "--validation_split_percentage", "5", *PAIR_LENGTHS,
        *mode_flags(lora), *tiny_training_flags(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = results(tmp_path)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and "eval_margin" in metrics
    assert "truncated" in result.stderr  # the data report
    assert_saved_model(tmp_path, lora)
    if lora:  # the score head is trained and saved beside the adapter
        from safetensors.torch import load_file

        assert any("score" in name for name in load_file(os.path.join(tmp_path, "adapter_model.safetensors")))


@pytest.mark.parametrize("script", ["dpo_training.py", "orpo_training.py"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_dpo_and_orpo_run(tiny_model_dir, tmp_path, script, lora):
    result = run_script(
        script, "--model_name_or_path", tiny_model_dir, "--template_name", "chatml",
        "--train_file_dir", PREFERENCE_DATA[lora], "--max_train_samples", "8", *PAIR_LENGTHS,
        *mode_flags(lora), *tiny_training_flags(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [entry["step"] for entry in log_history(tmp_path) if "loss" in entry] == [1, 2]
    assert_saved_model(tmp_path, lora)


def test_dpo_with_precomputed_reference_starts_from_zero_rewards(tiny_model_dir, tmp_path):
    """--precompute_ref_log_probs computes the reference before training, through the forwards that run
    chosen and rejected answers apart: with a fresh adapter the first step's rewards are zero."""
    result = run_script(
        "dpo_training.py", "--model_name_or_path", tiny_model_dir, "--template_name", "chatml",
        "--train_file_dir", PREFERENCE_DATA[True], "--max_train_samples", "8", *PAIR_LENGTHS,
        "--precompute_ref_log_probs", "True", *mode_flags(True), *tiny_training_flags(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first = next(entry for entry in log_history(tmp_path) if "loss" in entry)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert first["loss"] == pytest.approx(0.6931, abs=1e-4)  # -log sigmoid(0)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_grpo_runs_with_built_in_rewards_and_the_reward_model(tiny_model_dir, reward_model_dir, tmp_path, lora):
    result = run_script(
        "grpo_training.py", "--model_name_or_path", tiny_model_dir, "--template_name", "chatml",
        "--train_file_dir", QUESTIONS, "--reward_funcs", "accuracy,format,length,model",
        "--reward_weights", "1.0", "0.5", "0.1", "0.2", "--reward_model_path", reward_model_dir,
        "--num_generations", "2", "--max_completion_length", "8", *mode_flags(lora), *tiny_training_flags(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [entry for entry in log_history(tmp_path) if "reward" in entry]
    assert len(logged) == 2
    assert {"rewards/accuracy_reward/mean", "rewards/format_reward/mean", "rewards/reward_model/mean"} <= set(logged[0])
    assert_saved_model(tmp_path, lora)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_ppo_runs_against_the_reward_model_and_logs_its_diagnostics(tiny_model_dir, reward_model_dir, tmp_path, lora):
    result = run_script(
        "ppo_training.py", "--model_name_or_path", tiny_model_dir, "--template_name", "chatml",
        "--train_file_dir", QUESTIONS, "--reward_funcs", "model", "--reward_model_path", reward_model_dir,
        "--output_dir", tmp_path, "--max_steps", "2", "--rollout_batch_size", "4", "--per_device_train_batch_size", "2",
        "--ppo_epochs", "2", "--max_new_tokens", "8", "--learning_rate", "1e-3", "--report_to", "none",
        *mode_flags(lora),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = ppo_log(tmp_path)
    assert [entry["step"] for entry in log] == [1, 2]
    for key in ("reward", "kl", "entropy", "value_loss", "policy_loss", "clipfrac", "approx_kl"):
        assert all(torch.isfinite(torch.tensor(entry[key])) for entry in log), key
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollout comes from the reference itself
    assert os.path.isfile(tmp_path / "value_head.safetensors")
    assert_saved_model(tmp_path, lora)


def test_ppo_with_a_4bit_base_qlora(tiny_model_dir, tmp_path):
    result = run_script(
        "ppo_training.py", "--model_name_or_path", tiny_model_dir, "--template_name", "chatml",
        "--train_file_dir", QUESTIONS, "--reward_funcs", TOY_REWARD, "--use_peft", "True", "--qlora", "True",
        "--output_dir", tmp_path, "--max_steps", "3", "--rollout_batch_size", "4", "--per_device_train_batch_size", "2",
        "--ppo_epochs", "1", "--max_new_tokens", "8", "--learning_rate", "1e-2", "--report_to", "none",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = ppo_log(tmp_path)
    assert log[-1]["kl"] != 0.0  # the adapter moved away from the reference
    assert_saved_model(tmp_path, lora=True)


def test_ppo_continuing_an_adapter_keeps_that_adapter_as_its_reference(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    sft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    sft.save_pretrained(tmp_path / "sft")
    result = run_script(
        "ppo_training.py", "--model_name_or_path", tiny_model_dir, "--peft_path", tmp_path / "sft", "--use_peft", "True",
        "--template_name", "chatml", "--train_file_dir", QUESTIONS, "--reward_funcs", TOY_REWARD,
        "--output_dir", tmp_path / "ppo", "--max_steps", "2", "--rollout_batch_size", "4", "--per_device_train_batch_size", "2",
        "--ppo_epochs", "1", "--max_new_tokens", "8", "--report_to", "none",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # the first rollout's KL is zero only if the reference is the SFT adapter, not the bare base model
    assert ppo_log(tmp_path / "ppo")[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    from safetensors.torch import load_file

    assert not any(".ref." in name for name in load_file(tmp_path / "ppo" / "adapter_model.safetensors"))


# ---- each objective moves ----


def test_reward_model_ranks_its_training_pairs(tiny_model_dir, tmp_path):
    pairs = os.path.join(REPO, "data", "reward")
    result = run_script(
        "reward_modeling.py", "--model_name_or_path", tiny_model_dir, "--template_name", "chatml",
        "--train_file_dir", pairs, "--validation_file_dir", pairs, "--max_train_samples", "16",
        "--max_eval_samples", "16", "--max_length", "192", "--max_prompt_length", "96",
        *tiny_training_flags(tmp_path, steps=40), "--per_device_train_batch_size", "8",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert results(tmp_path)["eval_accuracy"] > 0.9


def preference_log_probs(model_dir, base_dir, pairs_dir, count):
    """Per pair: (sum, mean) log-probabilities of chosen and rejected responses under a model."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    chat_format = ChatFormat.for_model("chatml", tokenizer)
    records = load_records(pairs_dir, "preference", DataReport("pairs"), skip_invalid=False)[:count]
    rows = encode_preferences(records, chat_format, tokenizer, 192, 96, DataReport("pairs"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    scores = []
    with torch.no_grad():
        for row in rows:
            pair = {}
            for key in ("chosen", "rejected"):
                ids = torch.tensor([row["prompt_ids"] + row[f"{key}_ids"]])
                logits = model(ids).logits[0, len(row["prompt_ids"]) - 1 : -1]
                token_logps = torch.log_softmax(logits, -1).gather(1, ids[0, len(row["prompt_ids"]):, None])
                pair[key] = (token_logps.sum().item(), token_logps.mean().item())
            scores.append(pair)
    return scores


@pytest.mark.parametrize("script", ["dpo_training.py", "orpo_training.py"])
def test_preference_optimization_separates_chosen_from_rejected(small_vocab_model_dir, tmp_path, script):
    pairs = os.path.join(REPO, "data", "reward")
    result = run_script(
        script, "--model_name_or_path", small_vocab_model_dir, "--template_name", "chatml", "--train_file_dir", pairs,
        "--max_train_samples", "16", "--max_length", "192", "--max_prompt_length", "96",
        *tiny_training_flags(tmp_path, steps=30), "--per_device_train_batch_size", "8",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    before = preference_log_probs(small_vocab_model_dir, small_vocab_model_dir, pairs, 16)
    after = preference_log_probs(tmp_path, small_vocab_model_dir, pairs, 16)
    if script == "dpo_training.py":
        # DPO's implicit reward margin: how much more the chosen answer gained than the rejected one
        gains = [(a["chosen"][0] - b["chosen"][0]) - (a["rejected"][0] - b["rejected"][0]) for a, b in zip(after, before)]
        assert sum(gain > 0 for gain in gains) >= 14
    else:
        # ORPO compares length-normalized log-probabilities (odds) of the two answers directly
        margins_before = [b["chosen"][1] - b["rejected"][1] for b in before]
        margins_after = [a["chosen"][1] - a["rejected"][1] for a in after]
        assert sum(margins_after) > sum(margins_before)
        assert sum(margin > 0 for margin in margins_after) >= 14


def test_grpo_raises_the_mean_reward(small_vocab_model_dir, tmp_path):
    result = run_script(
        "grpo_training.py", "--model_name_or_path", small_vocab_model_dir, "--template_name", "chatml",
        "--train_file_dir", os.path.join(REPO, "data", "grpo"), "--reward_funcs", TOY_REWARD,
        "--use_peft", "True", "--lora_rank", "16", "--lora_dropout", "0", "--num_generations", "8",
        "--max_completion_length", "12", *tiny_training_flags(tmp_path, steps=30),
        "--per_device_train_batch_size", "16", "--learning_rate", "5e-2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rewards = [entry["reward"] for entry in log_history(tmp_path) if "reward" in entry]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.1, rewards


def test_ppo_raises_the_mean_reward_with_a_bounded_kl(small_vocab_model_dir, tmp_path):
    result = run_script(
        "ppo_training.py", "--model_name_or_path", small_vocab_model_dir, "--template_name", "chatml",
        "--train_file_dir", os.path.join(REPO, "data", "grpo"), "--reward_funcs", TOY_REWARD, "--reward_weights", "10",
        "--use_peft", "True", "--lora_rank", "16", "--lora_dropout", "0", "--learning_rate", "3e-3",
        "--kl_coef", "0.05", "--output_dir", tmp_path, "--max_steps", "40", "--rollout_batch_size", "16",
        "--per_device_train_batch_size", "8", "--ppo_epochs", "4", "--max_new_tokens", "12", "--report_to", "none",
        "--lr_scheduler_type", "constant",  # a decaying rate would slow the climb this test measures
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = ppo_log(tmp_path)
    rewards = [entry["reward"] for entry in log]
    assert sum(rewards[-8:]) / 8 > sum(rewards[:8]) / 8 + 0.2, rewards
    kls = [entry["kl"] for entry in log]
    assert max(kls) < 40, kls  # the penalty keeps the policy near its reference


# ---- bad input ----


@pytest.mark.parametrize("record, message", [
    ({"question": "Q?", "response_chosen": "good"}, "preference record has no 'response_rejected'"),
    ({"conversations": [{"from": "human", "value": "Q?"}], "chosen": "", "rejected": "bad"}, "chosen is empty"),
])
def test_bad_preference_records_stop_with_file_and_line(tiny_model_dir, tmp_path, record, message, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "fine?", "chosen": "yes", "rejected": "no"}) + "\n" + json.dumps(record) + "\n")
    for script in ("reward_modeling.py", "dpo_training.py", "orpo_training.py"):
        status, stderr = run_main(script, ["--model_name_or_path", tiny_model_dir, "--template_name", "chatml",
                                           "--train_file_dir", data, *tiny_training_flags(tmp_path / "out")], capsys)
        assert status == 2, stderr[-2000:]
        assert stderr.strip().splitlines()[-1] == f"error: {data}:2: {message}"
    assert not os.path.exists(tmp_path / "out")


def test_grpo_question_without_answer_stops_when_accuracy_is_used(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "questions.jsonl"
    data.write_text(json.dumps({"question": "Q1?", "answer": "A"}) + "\n" + json.dumps({"question": "Q2?"}) + "\n")
    for script in ("grpo_training.py", "ppo_training.py"):
        status, stderr = run_main(script, ["--model_name_or_path", tiny_model_dir, "--template_name", "chatml",
                                           "--train_file_dir", data, "--reward_funcs", "accuracy",
                                           "--output_dir", tmp_path / "out"], capsys)
        assert status == 2, stderr[-2000:]
        assert stderr.strip().splitlines()[-1] == (
            f"error: {data}:2: question has no 'answer', which the accuracy reward needs"
        )


def test_unknown_flags_are_errors_in_every_stage(tiny_model_dir, capsys):
    for script in ("reward_modeling.py", "dpo_training.py", "orpo_training.py", "grpo_training.py", "ppo_training.py"):
        status, stderr = run_main(script, ["--model_name_or_path", tiny_model_dir, "--no_such_flag", "1"], capsys)
        assert status == 2
        assert "unrecognized arguments: --no_such_flag" in stderr


# ---- several processes ----


@pytest.mark.parametrize("script", ["reward_modeling.py", "dpo_training.py"])
def test_torchrun_two_processes(tiny_model_dir, tmp_path, script):
    result = run_script(
        script, "--model_name_or_path", tiny_model_dir, "--template_name", "chatml",
        "--train_file_dir", os.path.join(REPO, "data", "reward"), "--max_train_samples", "16", "--use_peft", "True",
        *PAIR_LENGTHS, *tiny_training_flags(tmp_path), launcher=TORCHRUN,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training on 2 process(es)" in result.stderr
    assert [entry["step"] for entry in log_history(tmp_path) if "loss" in entry] == [1, 2]
    assert_saved_model(tmp_path, lora=True)


# ---- the shell recipes, chained ----


def run_pipeline(tiny_model_dir, out, stages):
    import subprocess

    env = dict(os.environ, MODEL=tiny_model_dir, OUT=str(out), STAGES=stages, PYTHON=sys.executable, PT_STEPS="2",
               SFT_STEPS="2", ALIGN_STEPS="2", MAX_COMPLETION="8", MAX_NEW_TOKENS="8", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               MAX_LENGTH="256", BLOCK_SIZE="64", BATCH_SIZE="2", NUM_GENERATIONS="2",  # the stage recipes read these too
               EVAL_QUESTIONS="4")
    return subprocess.run(["bash", os.path.join(REPO, "scripts", "run_pipeline.sh")],
                          env=env, capture_output=True, text=True, timeout=900)


def test_pipeline_chains_every_stage(tiny_model_dir, tmp_path):
    result = run_pipeline(tiny_model_dir, tmp_path, "pt sft rm ppo dpo orpo grpo")
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    for stage in ("sft", "ppo", "dpo", "orpo", "grpo"):
        assert os.path.isfile(tmp_path / f"{stage}-merged" / "model.safetensors"), stage
    assert os.path.isfile(tmp_path / "rm" / "adapter_model.safetensors")
    # each stage started from the model merged before it
    assert f"== dpo (from {tmp_path}/ppo-merged)" in result.stdout
    assert f"== grpo (from {tmp_path}/orpo-merged)" in result.stdout
    with open(tmp_path / "answers.jsonl", encoding="utf-8") as handle:
        assert len(handle.readlines()) == 12
    assert f"final model: {tmp_path}/grpo-merged" in result.stdout


def test_pipeline_refuses_ppo_without_a_reward_model_and_unknown_stages(tiny_model_dir, tmp_path):
    for stages, message in [("ppo", "ppo without an rm stage"), ("sft kto", "unknown stage 'kto'")]:
        result = run_pipeline(tiny_model_dir, tmp_path, stages)
        assert result.returncode == 2 and message in result.stderr
        assert "== " not in result.stdout  # refused before any stage ran
