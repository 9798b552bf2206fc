"""Continued pretraining (PT) of a causal LM on plain text, with LoRA, QLoRA or full weights.

    python pretraining.py --model_name_or_path MODEL --train_file_dir data/pretrain \
        --block_size 512 --use_peft True --output_dir outputs/pt

Text comes from .txt files (one document per line) and .jsonl/.json records with a "text" field.
Documents are joined with the tokenizer's end-of-text token between them and cut into --block_size blocks.
"""

from medgpt.allocator import relaunch_with_tcmalloc

relaunch_with_tcmalloc(__name__)  # first, before anything allocates (see medgpt/allocator.py)

from dataclasses import dataclass, field

from transformers import TrainingArguments
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from medgpt.arguments import DataArguments, LoraArguments, ModelArguments, at_least, parse_args, setup_logging
from medgpt.data import load_splits
from medgpt.encoding import encode_text_blocks
from medgpt.errors import exit_on_input_error
from medgpt.modeling import load_tokenizer, prepare_model
from medgpt.training import FusedLossTrainer, train_on_rows


@dataclass
class PretrainingArguments:
    block_size: int = field(default=512, metadata={"help": "Tokens per training block."})

    def __post_init__(self):
        at_least(self, "block_size", 2)


@exit_on_input_error
def main(argv=None):
    model_args, lora_args, data_args, pt_args, training_args = parse_args(
        (ModelArguments, LoraArguments, DataArguments, PretrainingArguments, TrainingArguments), argv
    )
    setup_logging(training_args)

    tokenizer = load_tokenizer(model_args)
    train_records, eval_records, train_report, eval_report = load_splits(data_args, "text", training_args.seed)
    train_blocks = encode_text_blocks(train_records, tokenizer, pt_args.block_size, train_report)
    eval_blocks = encode_text_blocks(eval_records, tokenizer, pt_args.block_size, eval_report) if eval_records else []

    model = prepare_model(model_args, lora_args, training_args)
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    train_on_rows(FusedLossTrainer, model, tokenizer, training_args, train_blocks, eval_blocks, data_collator=collator)


if __name__ == "__main__":
    main()
