"""PPO: the policy (an SFT model with a LoRA adapter, or full weights) answers prompts, a reward model
scores the answers, and clipped PPO updates with a value head and a per-token KL penalty to the
reference (the SFT model) improve it.

    python ppo_training.py --model_name_or_path outputs/sft-merged --reward_model_path outputs/rm \
        --train_file_dir data/grpo --template_name chatml --use_peft True --output_dir outputs/ppo
    torchrun --nproc_per_node 2 ppo_training.py ...   # each process answers its own prompts

Prompts: any conversation or question record (a trailing answer is ignored). Rewards: `--reward_funcs
model` (default, needs --reward_model_path) or any of GRPO's reward functions. Takes the TrainingArguments
flags (--per_device_train_batch_size, --gradient_accumulation_steps, --lr_scheduler_type, --warmup_steps,
--save_steps, --resume_from_checkpoint, ...); a step is one iteration. Logs reward, KL, entropy, value
loss, clip fraction and approximate KL (ppo_log.jsonl, trainer_state.json, TensorBoard under OUTPUT_DIR/runs).
"""

from medgpt.allocator import relaunch_with_tcmalloc

relaunch_with_tcmalloc(__name__)  # first, before anything allocates (see medgpt/allocator.py)

import torch

from medgpt.arguments import DataArguments, LoraArguments, ModelArguments, parse_args, setup_logging
from medgpt.chat import ChatFormat
from medgpt.data import load_question_splits
from medgpt.errors import InputError, exit_on_input_error
from medgpt.modeling import load_tokenizer, prepare_model
from medgpt.outputs import start_run
from medgpt.ppo import PPOArguments, PPORewardArguments, PPOTrainerLite
from medgpt.rewards import build_reward_functions
from medgpt.training import disk_full_in


@exit_on_input_error
def main(argv=None):
    model_args, lora_args, data_args, reward_args, ppo_args = parse_args(
        (ModelArguments, LoraArguments, DataArguments, PPORewardArguments, PPOArguments), argv
    )
    setup_logging(ppo_args)
    torch.manual_seed(ppo_args.seed)  # the same fresh adapter (and value head) in every process and run

    if data_args.validation_file_dir or data_args.validation_split_percentage:
        raise InputError("ppo_training.py does not evaluate: drop --validation_file_dir / --validation_split_percentage")
    tokenizer = load_tokenizer(model_args, padding_side="left")
    chat_format = ChatFormat.for_model(model_args.template_name, tokenizer)
    chat_format.install()
    reward_functions, weights = build_reward_functions(reward_args, chat_format, ppo_args.device)
    prompts, _ = load_question_splits(data_args, ppo_args.seed, "accuracy" in reward_args.reward_funcs.split(","))

    policy = prepare_model(model_args, lora_args, ppo_args)
    if not (model_args.load_in_4bit or model_args.load_in_8bit):  # quantized weights are placed when loaded
        policy = policy.to(ppo_args.device)
    trainer = PPOTrainerLite(ppo_args, policy, tokenizer, chat_format, prompts, reward_functions, weights)
    start_run(ppo_args.output_dir, ppo_args.resume_from_checkpoint, ppo_args.overwrite_output_dir, ppo_args.process_index == 0)
    with disk_full_in(ppo_args.output_dir):
        trainer.train(resume_from_checkpoint=ppo_args.resume_from_checkpoint)
        trainer.save_model()


if __name__ == "__main__":
    main()
