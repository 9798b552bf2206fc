"""Reward modeling (RM): a scalar score head trained so that chosen answers outscore rejected ones.

    python reward_modeling.py --model_name_or_path outputs/sft-merged --train_file_dir data/reward \
        --template_name chatml --use_peft True --output_dir outputs/rm

Pairs come as MedicalGPT's `conversations` + `chosen`/`rejected`, `question` + `response_chosen`/
`response_rejected`, or `prompt` + `chosen`/`rejected`. The model is AutoModelForSequenceClassification
with one label; with LoRA the score head is trained in full beside the adapter. Evaluation reports the
pairwise accuracy and mean margin (chosen score - rejected score).
"""

from medgpt.allocator import relaunch_with_tcmalloc

relaunch_with_tcmalloc(__name__)  # first, before anything allocates (see medgpt/allocator.py)

from transformers import AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer

from medgpt.arguments import DataArguments, LoraArguments, ModelArguments, PreferenceArguments, parse_args, setup_logging
from medgpt.errors import exit_on_input_error
from medgpt.modeling import prepare_model
from medgpt.training import GroupPairsByLength, tokenizer_and_preference_rows, train_on_rows


class PairRewardTrainer(GroupPairsByLength, RewardTrainer):
    """RewardTrainer with length-grouped pairs."""


def full_sequences(rows: list[dict]) -> list[dict]:
    """The reward model reads prompt + response as one sequence and scores its last token."""
    return [
        {"chosen_ids": row["prompt_ids"] + row["chosen_ids"], "rejected_ids": row["prompt_ids"] + row["rejected_ids"]}
        for row in rows
    ]


@exit_on_input_error
def main(argv=None):
    model_args, lora_args, data_args, preference_args, training_args = parse_args(
        (ModelArguments, LoraArguments, DataArguments, PreferenceArguments, RewardConfig), argv
    )
    setup_logging(training_args)

    tokenizer, train_rows, eval_rows = tokenizer_and_preference_rows(model_args, data_args, preference_args, training_args)

    model = prepare_model(
        model_args, lora_args, training_args, AutoModelForSequenceClassification, task_type="SEQ_CLS", num_labels=1
    )
    # The score is read at the last non-padding token, found through the config's pad token id.
    model.config.pad_token_id = tokenizer.pad_token_id
    training_args.max_length = preference_args.max_length
    train_on_rows(PairRewardTrainer, model, tokenizer, training_args, full_sequences(train_rows), full_sequences(eval_rows))


if __name__ == "__main__":
    main()
