"""PPO configured like the other stages: TrainingArguments flags, checkpoints, exact resume, torchrun.
(Its bad options and default reward are rows of test_bad_input.py.)"""

import json
import os

import torch
from safetensors.torch import load_file

from conftest import REPO, TORCHRUN, TOY_REWARD, ppo_log, run_script
from medgpt.ppo import forward_answers, rollout_prompt_indices

QUESTIONS = os.path.join(REPO, "data", "grpo")


def ppo_flags(model_dir, output_dir, *extra) -> list[str]:
    return [
        "--model_name_or_path", model_dir, "--template_name", "chatml", "--train_file_dir", QUESTIONS,
        "--reward_funcs", TOY_REWARD, "--use_peft", "True", "--output_dir", output_dir,
        "--rollout_batch_size", "4", "--ppo_epochs", "2", "--max_new_tokens", "8", "--report_to", "none", *extra,
    ]


def read_json(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def test_answer_log_probabilities_need_only_the_answers_logits(tiny_model_dir):
    """forward_answers sends only the positions before answer tokens through the LM head: the same
    log-probabilities and logits as slicing the whole sequence's logits, left-padded prompts included."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    sequences = torch.randint(1, 200, (3, 14), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(sequences)
    attention_mask[0, :3] = 0  # left-padded prompts of 9 positions, answers of 5
    attention_mask[2, 12:] = 0  # an answer that ended early
    logprobs, _, logits = forward_answers(model, sequences, attention_mask, 9, temperature=0.7)

    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    every = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids).logits
    expected_logits = every[:, 8:-1].float() / 0.7
    expected = torch.log_softmax(expected_logits, -1).gather(2, sequences[:, 9:].unsqueeze(-1)).squeeze(-1)
    assert logits.shape == (3, 5, model.config.vocab_size)
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(logprobs, expected)

    # A forward without logits_to_keep (older remote-code models) is called without it, to the same result.
    plain_forward = model.forward
    model.forward = lambda input_ids, attention_mask, position_ids, output_hidden_states, use_cache: plain_forward(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache)
    torch.testing.assert_close(forward_answers(model, sequences, attention_mask, 9, temperature=0.7)[0], expected)


def test_rollout_prompts_are_a_function_of_the_step():
    # one epoch of 10 prompts at 2 x 2 per iteration: 2 iterations, 8 distinct prompts, the processes disjoint
    epoch = [rollout_prompt_indices(10, step, 42, 2, rank, 2) for step in (1, 2) for rank in (0, 1)]
    seen = [i for batch in epoch for i in batch]
    assert len(seen) == len(set(seen)) == 8
    assert rollout_prompt_indices(10, 2, 42, 2, 1, 2) == epoch[3]  # recomputed, not drawn from a running state
    assert rollout_prompt_indices(10, 3, 42, 2, 0, 2) != epoch[0]  # the next epoch is reshuffled
    assert rollout_prompt_indices(10, 1, 43, 2, 0, 2) != epoch[0]  # and the order depends on the seed
    assert sorted(rollout_prompt_indices(3, 1, 42, 4)) == [0, 0, 1, 2]  # fewer prompts than a batch: repeated


def test_checkpoints_and_a_resumed_run_ends_where_an_uninterrupted_one_ends(tiny_model_dir, tmp_path):
    # A constant learning rate: with a decaying schedule the 2-step first half (--max_steps 2) would
    # follow another schedule than the 4-step run, and the weights would differ, as they should.
    common = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-2",
              "--lr_scheduler_type", "constant", "--save_strategy", "steps", "--save_steps", "2"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    result = run_script("ppo_training.py", *ppo_flags(tiny_model_dir, straight, *common, "--max_steps", "4"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 optimizer step(s) per iteration" in result.stderr  # 2 epochs x (4 answers / (2 x 2))
    for step in (2, 4):
        checkpoint = straight / f"checkpoint-{step}"
        for name in ("adapter_model.safetensors", "value_head.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
            assert os.path.isfile(checkpoint / name), (step, name)
        state = read_json(checkpoint / "trainer_state.json")
        assert state["global_step"] == step
        assert [entry["step"] for entry in state["log_history"]] == list(range(1, step + 1))
    assert not os.path.exists(straight / "checkpoint-1")
    final_state = read_json(straight / "trainer_state.json")
    assert final_state["global_step"] == 4 and final_state["log_history"] == ppo_log(straight)
    assert {entry["learning_rate"] for entry in final_state["log_history"]} == {1e-2}

    result = run_script("ppo_training.py", *ppo_flags(tiny_model_dir, stopped, *common, "--max_steps", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_script("ppo_training.py", *ppo_flags(
        tiny_model_dir, stopped, *common, "--max_steps", "4", "--resume_from_checkpoint", stopped / "checkpoint-2",
    ))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr and "iterations 3-4" in result.stderr
    # Tolerance: 1e-6 absolute (measured: 0, bit-identical on CPU). Any divergence would be far larger:
    # one differently sampled token changes the whole update.
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        expected, resumed = load_file(straight / name), load_file(stopped / name)
        assert expected.keys() == resumed.keys()
        for key in expected:
            torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=1e-6, msg=f"{name}: {key}")
    # the history of steps 1-2 comes from the checkpoint, 3-4 from the resumed run: the same numbers
    untimed = lambda log: [{k: v for k, v in entry.items() if k != "seconds"} for entry in log]  # noqa: E731
    assert untimed(ppo_log(stopped)) == untimed(ppo_log(straight))
    # the weights did move: equality above is not that of two untrained adapters
    adapter = load_file(straight / "adapter_model.safetensors")
    assert all(value.abs().sum() > 0 for key, value in adapter.items() if "lora_B" in key)


def test_torchrun_two_processes_share_the_prompts_and_average_the_gradients(tiny_model_dir, tmp_path):
    out = tmp_path / "ddp"
    result = run_script("ppo_training.py", *ppo_flags(
        tiny_model_dir, out, "--max_steps", "2", "--per_device_train_batch_size", "2", "--ppo_epochs", "1",
        "--learning_rate", "1e-3", "--save_strategy", "steps", "--save_steps", "2",
    ), launcher=TORCHRUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training on 2 process(es)" in result.stderr
    assert "of 8 prompts (4 per process x 2 process(es))" in result.stderr
    assert result.stderr.count("policy, value head and tokenizer saved to") == 1
    log = ppo_log(out)
    assert [entry["step"] for entry in log] == [1, 2]
    assert log[0]["learning_rate"] > log[1]["learning_rate"] == 0.0  # the default linear decay, to 0 at the end
    assert read_json(out / "trainer_state.json")["world_size"] == 2
    assert os.path.isfile(out / "adapter_model.safetensors") and os.path.isfile(out / "value_head.safetensors")
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(out / "checkpoint-2"))
    assert not [name for name in os.listdir(out) if name.endswith(".partial")]  # no staging folder left


