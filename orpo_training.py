"""ORPO (odds-ratio preference optimization): SFT loss on the chosen answer plus an odds-ratio term that
pushes it above the rejected one, in one stage and without a reference model.

    python orpo_training.py --model_name_or_path outputs/sft-merged --train_file_dir data/reward \
        --template_name chatml --use_peft True --orpo_beta 0.1 --output_dir outputs/orpo

Uses TRL's ORPOTrainer (trl.experimental.orpo), fed with pairs rendered by our template.
"""

from medgpt.allocator import relaunch_with_tcmalloc

relaunch_with_tcmalloc(__name__)  # first, before anything allocates (see medgpt/allocator.py)

import os
from dataclasses import dataclass, field

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

from medgpt.arguments import DataArguments, LoraArguments, ModelArguments, PreferenceArguments, parse_args, setup_logging  # noqa: E402
from medgpt.encoding import IGNORE_INDEX  # noqa: E402
from medgpt.errors import InputError, exit_on_input_error  # noqa: E402
from medgpt.modeling import prepare_model  # noqa: E402
from medgpt.training import GroupPairsByLength, tokenizer_and_preference_rows, train_on_rows  # noqa: E402


@dataclass
class ORPOArguments:
    orpo_beta: float = field(default=0.1, metadata={"help": "Weight of the odds-ratio term (lambda in the ORPO paper)."})


class PretokenizedORPOTrainer(GroupPairsByLength, ORPOTrainer):
    """ORPOTrainer over pairs already tokenized by our template: builds its row layout from the ids."""

    def tokenize_row(self, feature, model=None) -> dict:
        prompt = feature["prompt_ids"]
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for key in ("chosen", "rejected"):
            answer = feature[f"{key}_ids"]
            row[f"{key}_input_ids"] = prompt + answer
            row[f"{key}_attention_mask"] = [1] * (len(prompt) + len(answer))
            row[f"{key}_labels"] = [IGNORE_INDEX] * len(prompt) + answer
        return row


@exit_on_input_error
def main(argv=None):
    model_args, lora_args, data_args, preference_args, orpo_args, training_args = parse_args(
        (ModelArguments, LoraArguments, DataArguments, PreferenceArguments, ORPOArguments, ORPOConfig), argv
    )
    setup_logging(training_args)

    tokenizer, train_rows, eval_rows = tokenizer_and_preference_rows(model_args, data_args, preference_args, training_args)

    model = prepare_model(model_args, lora_args, training_args)
    if training_args.beta not in (orpo_args.orpo_beta, ORPOConfig.beta):
        raise InputError("set the odds-ratio weight with --orpo_beta (--beta is the same setting)")
    training_args.beta = orpo_args.orpo_beta
    training_args.max_length = preference_args.max_length
    train_on_rows(PretokenizedORPOTrainer, model, tokenizer, training_args, train_rows, eval_rows)


if __name__ == "__main__":
    main()
