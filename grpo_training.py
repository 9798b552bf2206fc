"""GRPO (group relative policy optimization): sample several answers per question, score them with reward
functions, and push the policy toward the answers that beat their group's mean.

    python grpo_training.py --model_name_or_path outputs/sft-merged --train_file_dir data/grpo \
        --template_name chatml --use_peft True --reward_funcs accuracy,format --reward_weights 1.0 0.5 \
        --num_generations 4 --output_dir outputs/grpo

Questions come as `question` + `answer` (MedicalGPT's GRPO format), or `messages`/`conversations` ending
with a user turn plus `answer`. Rewards: accuracy (normalized exact / contains / token F1 against the
answer), format (<think>/<answer> tags), length, model (a reward model folder), or module:function.
"""

from medgpt.allocator import relaunch_with_tcmalloc

relaunch_with_tcmalloc(__name__)  # first, before anything allocates (see medgpt/allocator.py)

import importlib.util

import torch
from trl import GRPOConfig, GRPOTrainer

from medgpt.arguments import DataArguments, LoraArguments, ModelArguments, parse_args, setup_logging
from medgpt.chat import ChatFormat
from medgpt.data import load_question_splits
from medgpt.errors import InputError, exit_on_input_error
from medgpt.modeling import load_tokenizer, prepare_model
from medgpt.rewards import RewardArguments, build_reward_functions
from medgpt.training import train_on_rows


@exit_on_input_error
def main(argv=None):
    model_args, lora_args, data_args, reward_args, training_args = parse_args(
        (ModelArguments, LoraArguments, DataArguments, RewardArguments, GRPOConfig), argv
    )
    setup_logging(training_args)
    if training_args.use_vllm and importlib.util.find_spec("vllm") is None:
        raise InputError("--use_vllm needs vllm importable here (a CUDA machine, with a vllm build matching torch)")

    tokenizer = load_tokenizer(model_args, padding_side="left")
    chat_format = ChatFormat.for_model(model_args.template_name, tokenizer)
    chat_format.install()  # the trainer renders the prompts with the tokenizer's chat_template: ours

    reward_functions, weights = build_reward_functions(reward_args, chat_format, "cuda" if torch.cuda.is_available() else None)
    needs_answer = "accuracy" in reward_args.reward_funcs.split(",")
    train, evaluation = load_question_splits(data_args, training_args.seed, needs_answer)
    training_args.reward_weights = weights

    model = prepare_model(model_args, lora_args, training_args)
    train_on_rows(GRPOTrainer, model, tokenizer, training_args, train, evaluation, reward_funcs=reward_functions)


if __name__ == "__main__":
    main()
