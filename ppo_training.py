"""PPO: the policy (an SFT model with a LoRA adapter, or full weights) answers prompts, a reward model
scores the answers, and clipped PPO updates with a value head and a per-token KL penalty to the
reference (the SFT model) improve it.

    python ppo_training.py --model_name_or_path outputs/sft-merged --reward_model_path outputs/rm \
        --train_file_dir data/grpo --template_name chatml --use_peft True --output_dir outputs/ppo

Prompts: any conversation or question record (a trailing answer is ignored). Rewards: `--reward_funcs
model` (default, needs --reward_model_path) or any of GRPO's reward functions. Logs reward, KL, entropy,
value loss, clip fraction and approximate KL per iteration (TensorBoard under OUTPUT_DIR/runs).
"""

import json
import os

import torch

from medgpt.arguments import DataArguments, LoraArguments, ModelArguments, parse_args, setup_logging
from medgpt.chat import ChatFormat
from medgpt.data import load_question_splits
from medgpt.errors import exit_on_input_error
from medgpt.modeling import load_tokenizer, prepare_model
from medgpt.ppo import PPOArguments, PPOTrainerLite
from medgpt.rewards import RewardArguments, build_reward_functions


@exit_on_input_error
def main(argv=None):
    model_args, lora_args, data_args, reward_args, ppo_args = parse_args(
        (ModelArguments, LoraArguments, DataArguments, RewardArguments, PPOArguments), argv
    )
    setup_logging()
    torch.manual_seed(ppo_args.seed)

    tokenizer = load_tokenizer(model_args, padding_side="left")
    chat_format = ChatFormat.for_model(model_args.template_name, tokenizer)
    chat_format.install()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reward_functions, weights = build_reward_functions(reward_args, chat_format, device)
    prompts, _ = load_question_splits(data_args, ppo_args.seed, "accuracy" in reward_args.reward_funcs.split(","))

    policy = prepare_model(model_args, lora_args, ppo_args)
    if not (model_args.load_in_4bit or model_args.load_in_8bit):  # quantized weights are placed when loaded
        policy = policy.to(device)
    trainer = PPOTrainerLite(ppo_args, policy, tokenizer, chat_format, prompts, reward_functions, weights)
    history = trainer.train()
    trainer.save(ppo_args.output_dir)
    with open(os.path.join(ppo_args.output_dir, "ppo_log.jsonl"), "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in history)


if __name__ == "__main__":
    main()
