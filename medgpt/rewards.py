"""Reward functions for GRPO and PPO, chosen by name: `--reward_funcs accuracy,format`.

Every function has TRL's signature `f(prompts, completions, **columns) -> list[float]`: `completions` are
strings or message lists, `columns` the dataset's other columns (e.g. `answer`). A user's own function is
named `module:function` or `path/to/file.py:function`.
"""

import importlib
import importlib.util
import os
import re
import unicodedata
from dataclasses import dataclass, field

import torch

from medgpt.errors import InputError


@dataclass
class RewardArguments:
    reward_funcs: str = field(
        default="accuracy,format",
        metadata={
            "help": "Comma list of rewards: accuracy, format, length, model (the --reward_model_path model), "
            "or module:function / file.py:function for your own."
        },
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward function (space separated); default all 1.0."}
    )
    reward_model_path: str | None = field(
        default=None, metadata={"help": "Reward model folder (the reward modeling stage's output, merged or adapter)."}
    )
    length_limit: int = field(default=512, metadata={"help": "Characters an answer may use before the length reward goes below 0."})


def completion_text(completion) -> str:
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
        return completion[-1]["content"] if completion else ""
    return completion


ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# English words and numbers (keeping 37.5, 30:2, 1/2 whole) and single CJK characters.
TOKEN = re.compile(r"[a-z0-9]+(?:[.:/][a-z0-9]+)*|[\u3400-\u9fff]")


def answer_tokens(text: str) -> list[str]:
    return TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def extracted_answer(text: str) -> str:
    """The text inside the last <answer>...</answer>, or the whole completion."""
    found = ANSWER_TAG.findall(text)
    return found[-1] if found else text


def answer_score(completion: str, reference: str) -> float:
    """1.0 when the normalized answer equals the reference or contains it as a whole phrase, else the
    token F1 (words for English, characters for Chinese), so partly right answers get partial credit."""
    predicted, expected = answer_tokens(extracted_answer(completion)), answer_tokens(reference)
    if not expected or not predicted:
        return 0.0
    width = len(expected)
    if any(predicted[i : i + width] == expected for i in range(len(predicted) - width + 1)):
        return 1.0
    remaining = list(expected)
    common = 0
    for token in predicted:
        if token in remaining:
            remaining.remove(token)
            common += 1
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def accuracy_reward(prompts, completions, answer=None, **columns) -> list[float]:
    if answer is None:
        raise InputError("the accuracy reward needs an 'answer' for every question")
    return [answer_score(completion_text(c), reference) for c, reference in zip(completions, answer)]


FULL_FORMAT = re.compile(r"\s*<think>.+?</think>\s*<answer>.+?</answer>\s*", re.DOTALL)


def format_reward(prompts, completions, **columns) -> list[float]:
    """1.0 for <think>...</think> then <answer>...</answer> (any number of lines), 0.5 for an answer
    tag alone, else 0."""
    scores = []
    for completion in completions:
        text = completion_text(completion)
        scores.append(1.0 if FULL_FORMAT.fullmatch(text) else 0.5 if ANSWER_TAG.search(text) else 0.0)
    return scores


def make_length_reward(limit: int):
    def length_reward(prompts, completions, **columns) -> list[float]:
        """0 up to `limit` characters, falling linearly to -1 at twice the limit."""
        return [-min(1.0, max(0, len(completion_text(c)) - limit) / limit) for c in completions]

    return length_reward


class RewardModelScorer:
    """Scores prompt + completion with a sequence-classification reward model (the RM stage's output)."""

    def __init__(self, path: str, chat_format, device=None, dtype=torch.float32):
        from transformers import AutoModelForSequenceClassification

        from medgpt.modeling import (adapter_base_model, check_model_path, hub_kwargs, is_adapter_folder, load_adapter,
                                     open_tokenizer)

        if not os.path.isdir(path):
            raise InputError("reward model folder not found (--reward_model_path)", path)
        if is_adapter_folder(path):
            base = adapter_base_model(path)
            if not base:
                raise InputError("the reward adapter does not name its base model in adapter_config.json", path)
            check_model_path(base, "the reward adapter's base model")
        else:
            base = check_model_path(path, "--reward_model_path")
        self.tokenizer = open_tokenizer(path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=dtype, **hub_kwargs(base))
        if is_adapter_folder(path):
            model = load_adapter(model, path, "--reward_model_path").merge_and_unload()
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.eval().requires_grad_(False).to(device or "cpu")
        self.chat_format = chat_format
        self.__name__ = "reward_model"

    @torch.no_grad()
    def __call__(self, prompts, completions, **columns) -> list[float]:
        texts = []
        for prompt, completion in zip(prompts, completions):
            messages = prompt + [{"role": "assistant", "content": completion_text(completion)}]
            texts.append(self.chat_format.render(messages))
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        batch = batch.to(self.model.device)
        return self.model(**batch).logits[:, 0].float().tolist()


def load_user_function(spec: str):
    """`package.module:function` or `path/to/file.py:function`."""
    target, _, name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            if not os.path.isfile(target):
                raise InputError("reward function file not found", target)
            module_spec = importlib.util.spec_from_file_location(os.path.basename(target)[:-3], target)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as error:
        raise InputError(f"cannot import reward function '{spec}': {error}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise InputError(f"'{spec}' does not name a function")
    return function


BUILT_IN = ("accuracy", "format", "length", "model")


def build_reward_functions(reward_args: RewardArguments, chat_format, device=None) -> tuple[list, list[float]]:
    """The reward functions and their weights, as `--reward_funcs` and `--reward_weights` ask."""
    names = [name.strip() for name in reward_args.reward_funcs.split(",") if name.strip()]
    if not names:
        raise InputError("--reward_funcs names no reward function")
    functions = []
    for name in names:
        if name == "accuracy":
            functions.append(accuracy_reward)
        elif name == "format":
            functions.append(format_reward)
        elif name == "length":
            functions.append(make_length_reward(reward_args.length_limit))
        elif name == "model":
            if not reward_args.reward_model_path:
                raise InputError("--reward_funcs model needs --reward_model_path")
            functions.append(RewardModelScorer(reward_args.reward_model_path, chat_format, device))
        elif ":" in name:
            functions.append(load_user_function(name))
        else:
            raise InputError(f"unknown reward function '{name}': use one of {', '.join(BUILT_IN)} or module:function")
    weights = reward_args.reward_weights or [1.0] * len(functions)
    if len(weights) != len(functions):
        raise InputError(f"--reward_weights has {len(weights)} values for {len(functions)} reward functions")
    return functions, list(weights)


def combined_rewards(functions, weights, prompts, completions, columns: dict) -> tuple[torch.Tensor, dict]:
    """Weighted sum of every reward function, and each one's mean for the logs."""
    total = torch.zeros(len(completions))
    means = {}
    for function, weight in zip(functions, weights):
        scores = torch.tensor(function(prompts=prompts, completions=completions, **columns), dtype=torch.float32)
        total += weight * scores
        means[getattr(function, "__name__", "reward")] = scores.mean().item()
    return total, means
