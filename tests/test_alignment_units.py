"""Preference records and their encoding, reward functions, and PPO's maths against hand-computed values."""

import math
import os

import pytest
import torch
from transformers import AutoTokenizer

from conftest import FIXTURES, REPO, TEST_DATA, needs_medicalgpt_files
from medgpt.chat import ChatFormat
from medgpt.data import DataReport, RecordError, load_records, question_record, record_to_preference
from medgpt.encoding import encode_preference, encode_preferences
from medgpt.errors import InputError
from medgpt.ppo import answer_mask, gae_advantages, masked_whiten, ppo_losses, token_rewards
from medgpt.rewards import (
    RewardArguments, accuracy_reward, answer_score, build_reward_functions, format_reward, load_user_function,
    make_length_reward,
)

# ---- preference records ----


def test_medicalgpt_conversations_with_chosen_and_rejected():
    record = {
        "system": "You are a doctor.",
        "conversations": [{"from": "human", "value": "Fever?"}, {"from": "gpt", "value": "How high?"}, {"from": "human", "value": "39 C"}],
        "chosen": "Drink fluids and see a doctor.", "rejected": "Ignore it.",
    }
    pair = record_to_preference(record)
    assert [m["role"] for m in pair["prompt"]] == ["system", "user", "assistant", "user"]
    assert pair["prompt"][0]["content"] == "You are a doctor."
    assert (pair["chosen"], pair["rejected"]) == ("Drink fluids and see a doctor.", "Ignore it.")


def test_question_with_response_chosen_and_rejected():
    pair = record_to_preference({"question": "Q?", "response_chosen": "good", "response_rejected": "bad", "system": "S"})
    assert pair == {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}], "chosen": "good", "rejected": "bad",
                    "tools": None}


def test_prompt_as_text_or_messages_and_responses_as_message_lists():
    text = record_to_preference({"prompt": "Q?", "chosen": "good", "rejected": "bad"})
    assert text["prompt"] == [{"role": "user", "content": "Q?"}]
    messages = record_to_preference({
        "prompt": [{"role": "user", "content": "Q?"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    })
    assert (messages["prompt"], messages["chosen"], messages["rejected"]) == (text["prompt"], "good", "bad")


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Q?", "chosen": "good"}, "no 'rejected'"),
    ({"prompt": "Q?", "chosen": "  ", "rejected": "bad"}, "chosen is empty"),
    ({"question": "Q?", "response_chosen": "good", "response_rejected": ""}, "response_rejected is empty"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], "chosen": "c", "rejected": "r"}, "where a 'user/tool' turn belongs"),
    ({"chosen": "c", "rejected": "r"}, "no known format"),
])
def test_bad_preference_records(record, message):
    with pytest.raises(RecordError, match=message):
        record_to_preference(record)


def test_preference_pairs_with_tool_calls_load():
    """MedicalGPT's tool-call pairs: tools as a JSON string, calls and results as function_call/observation turns."""
    report = DataReport("train")
    pairs = load_records(os.path.join(TEST_DATA, "reward"), "preference", report, skip_invalid=False)
    assert report.read == len(pairs) == 8
    after_results = [pair for pair in pairs if pair["prompt"][-1]["role"] == "tool"]
    assert len(after_results) == 3 and after_results[0]["tools"][0]["function"]["name"] == "calculate_bmi"
    assert after_results[0]["prompt"][-2]["tool_calls"][0]["function"] == {
        "name": "calculate_bmi", "arguments": {"weight_kg": 50, "height_m": 1.6}}
    assert pairs[0]["chosen"].startswith("Action: calculate_bmi\n")  # a call written as text stays the text
    assert pairs[6]["prompt"][0] == {"role": "system", "content": "你是一名谨慎的医疗助手。"}
    assert [message["role"] for message in pairs[7]["prompt"]] == ["user", "assistant", "user"]


@needs_medicalgpt_files
def test_the_real_medicalgpt_preference_and_grpo_files_load_unchanged():
    report = DataReport("train")
    pairs = load_records(os.path.join(FIXTURES, "reward"), "preference", report, skip_invalid=False)
    assert report.read == len(pairs) > 500
    tool_turns = [pair for pair in pairs if pair["prompt"][-1]["role"] == "tool"]
    assert tool_turns and tool_turns[0]["tools"][0]["function"]["name"] == "get_weather"  # tools ride beside the messages
    assert tool_turns[0]["prompt"][-2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "北京"}}
    questions = load_records(os.path.join(FIXTURES, "grpo"), "question", DataReport("grpo"), skip_invalid=False,
                             converter=lambda record: question_record(record, needs_answer=True))
    assert questions[0]["prompt"] == [{"role": "user", "content": "肛门病变可能是什么疾病的症状?"}]
    assert questions[0]["answer"] == "食管克罗恩病"


def test_a_question_without_an_answer_is_refused_only_when_accuracy_needs_it():
    assert question_record({"question": "Q?"}, needs_answer=False)["answer"] is None
    with pytest.raises(RecordError, match="no 'answer'"):
        question_record({"question": "Q?"}, needs_answer=True)


# ---- encoding pairs ----


@pytest.fixture(scope="module")
def chatml(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return ChatFormat.for_model("chatml", tokenizer), tokenizer


def test_pairs_are_split_like_sft_with_the_end_of_turn_in_each_response(chatml):
    chat_format, tokenizer = chatml
    pair = {"prompt": [{"role": "user", "content": "Is 39 C a fever?"}], "chosen": "Yes.", "rejected": "No."}
    prompt_ids, chosen_ids, rejected_ids, truncated = encode_preference(pair, chat_format, tokenizer, 64, 32)
    assert not truncated
    assert tokenizer.decode(prompt_ids) == "<|im_start|>user\nIs 39 C a fever?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(chosen_ids) == "Yes.<|im_end|>\n"
    assert tokenizer.decode(rejected_ids) == "No.<|im_end|>\n"


def test_long_pairs_keep_the_prompt_end_and_lose_response_tails_and_are_counted(chatml):
    chat_format, tokenizer = chatml
    long_question = "word " * 100 + "final question?"
    pairs = [
        {"prompt": [{"role": "user", "content": long_question}], "chosen": "yes " * 50, "rejected": "no"},
        {"prompt": [{"role": "user", "content": "short?"}], "chosen": "ok", "rejected": "no"},
    ]
    report = DataReport("train")
    rows = encode_preferences(pairs, chat_format, tokenizer, max_length=48, max_prompt_length=24, report=report)
    assert (report.kept, report.truncated) == (2, 1)
    first = rows[0]
    assert len(first["prompt_ids"]) == 24
    assert tokenizer.decode(first["prompt_ids"]).endswith("final question?<|im_end|>\n<|im_start|>assistant\n")
    assert len(first["prompt_ids"]) + len(first["chosen_ids"]) == 48
    assert tokenizer.decode(first["rejected_ids"]) == "no<|im_end|>\n"
    with pytest.raises(InputError, match="max_prompt_length must be smaller"):
        encode_preferences(pairs, chat_format, tokenizer, max_length=24, max_prompt_length=24, report=report)


# ---- rewards ----


@pytest.mark.parametrize("completion, reference, expected", [
    ("37.3", "37.3", 1.0),
    ("The threshold is 37.3 °C.", "37.3", 1.0),
    ("<think>adults</think><answer>30:2</answer>", "30:2", 1.0),
    ("37", "37.3", 0.0),
    ("Two doses", "2", 0.0),
    ("食管克罗恩病", "食管克罗恩病", 1.0),
    ("可能是克罗恩病", "食管克罗恩病", 2 * (4 / 7) * (4 / 6) / (4 / 7 + 4 / 6)),  # 4 shared characters
    ("iron deficiency", "iron deficiency anemia", 2 * 1.0 * (2 / 3) / (1.0 + 2 / 3)),
    ("", "anything", 0.0),
])
def test_answer_score(completion, reference, expected):
    assert answer_score(completion, reference) == pytest.approx(expected)


def test_accuracy_reward_reads_conversational_completions_and_needs_answers():
    completions = [[{"role": "assistant", "content": "<answer>2</answer>"}], "3"]
    assert accuracy_reward(prompts=[None, None], completions=completions, answer=["2", "2"]) == [1.0, 0.0]
    with pytest.raises(InputError, match="needs an 'answer'"):
        accuracy_reward(prompts=[None], completions=["2"])


def test_format_and_length_rewards():
    completions = ["<think>\nfever\nmeans\n</think>\n<answer>\nrest\n</answer>", "<answer>rest</answer>", "rest", "<think></think><answer>x</answer>"]
    assert format_reward(prompts=None, completions=completions) == [1.0, 0.5, 0.0, 0.5]
    length = make_length_reward(10)
    assert length(prompts=None, completions=["a" * 10, "a" * 15, "a" * 40]) == [0.0, -0.5, -1.0]


def test_user_reward_functions_by_file_or_module_and_bad_names(chatml):
    chat_format, _ = chatml
    function = load_user_function(os.path.join(REPO, "tests", "toy_rewards.py") + ":space_share")
    assert function(prompts=[None], completions=["a b"]) == [pytest.approx(1 / 3)]
    assert load_user_function("medgpt.rewards:format_reward") is format_reward
    functions, weights = build_reward_functions(RewardArguments("accuracy,length", [2.0, 0.5]), chat_format)
    assert [f.__name__ for f in functions] == ["accuracy_reward", "length_reward"] and weights == [2.0, 0.5]
    for args, message in [
        (RewardArguments("accuracy,nonsense"), "unknown reward function 'nonsense'"),
        (RewardArguments("accuracy,format", [1.0]), "has 1 values for 2"),
        (RewardArguments("model"), "needs --reward_model_path"),
        (RewardArguments("medgpt.rewards:missing"), "does not name a function"),
        (RewardArguments("no_such_module:f"), "cannot import"),
    ]:
        with pytest.raises(InputError, match=message):
            build_reward_functions(args, chat_format)


# ---- PPO maths ----


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.4]])
    advantages, returns = gae_advantages(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.9)
    # t=2: 1 - 0.4 = 0.6; t=1: (0.4 - 0.2) + 0.9 * 0.6 = 0.74; t=0: (0.2 - 0.5) + 0.9 * 0.74 = 0.366
    assert advantages[0].tolist() == pytest.approx([0.366, 0.74, 0.6])
    assert returns[0].tolist() == pytest.approx([0.866, 0.94, 1.0])


def test_gae_treats_positions_after_the_answer_as_terminal():
    rewards = torch.tensor([[0.0, 1.0, 5.0]])  # the 5.0 and the 9.0 lie past the answer's end
    values = torch.tensor([[0.5, 0.2, 9.0]])
    advantages, returns = gae_advantages(rewards, values, torch.tensor([[1.0, 1.0, 0.0]]), gamma=1.0, lam=0.9)
    # t=1: 1 + 0 - 0.2 = 0.8; t=0: (0.2 - 0.5) + 0.9 * 0.8 = 0.42
    assert advantages[0].tolist() == pytest.approx([0.42, 0.8, 0.0])
    assert returns[0].tolist() == pytest.approx([0.92, 1.0, 0.0])


def test_token_rewards_put_the_score_on_the_last_answer_token_and_penalize_kl():
    rewards, kl = token_rewards(
        torch.tensor([2.0]), torch.tensor([[-1.0, -1.0, -1.0]]), torch.tensor([[-1.5, -1.0, -2.0]]),
        torch.tensor([[1.0, 1.0, 0.0]]), kl_coef=0.1,
    )
    assert kl[0].tolist() == pytest.approx([0.5, 0.0, 0.0])
    assert rewards[0].tolist() == pytest.approx([-0.05, 2.0, 0.0])


def test_clipped_policy_and_value_losses_by_hand():
    mask = torch.ones(1, 2)
    policy_loss, value_loss, stats = ppo_losses(
        logprobs=torch.log(torch.tensor([[1.5, 0.5]])), old_logprobs=torch.zeros(1, 2),
        advantages=torch.ones(1, 2), values=torch.tensor([[1.0, 0.0]]), old_values=torch.tensor([[0.5, 0.5]]),
        returns=torch.tensor([[2.0, 0.0]]), mask=mask, cliprange=0.2, cliprange_value=0.2,
    )
    # ratios 1.5 and 0.5: max(-1.5, -1.2) = -1.2 (clipped), max(-0.5, -0.8) = -0.5 (not clipped)
    assert policy_loss.item() == pytest.approx(-0.85)
    assert stats["clipfrac"] == pytest.approx(0.5)
    assert stats["approx_kl"] == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2)
    # values clipped to 0.7 and 0.3: max(1, 1.69) and max(0, 0.09), halved and averaged
    assert value_loss.item() == pytest.approx(0.5 * (1.69 + 0.09) / 2)


def test_answer_mask_stops_after_the_first_stop_token_and_whitening_ignores_padding():
    responses = torch.tensor([[5, 7, 2, 9], [2, 2, 3, 4], [5, 6, 7, 8]])
    assert answer_mask(responses, [2]).tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    values = torch.tensor([[1.0, 3.0, 100.0]])
    whitened = masked_whiten(values, torch.tensor([[1.0, 1.0, 0.0]]))
    assert whitened[0].tolist() == pytest.approx([-1.0, 1.0, 0.0], abs=1e-4)
