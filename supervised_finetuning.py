"""Supervised fine-tuning (SFT) of a causal LM on conversations, with LoRA, QLoRA or full weights.

    python supervised_finetuning.py --model_name_or_path MODEL --train_file_dir data/finetune \
        --template_name chatml --use_peft True --output_dir outputs/sft
    python supervised_finetuning.py configs/sft.yaml --max_steps 10      # config file + overrides
    torchrun --nproc_per_node 2 supervised_finetuning.py ...             # several processes / GPUs

Loss is on assistant turns only unless --train_on_inputs True. The template used here is written into
the saved tokenizer as its chat_template, so inference renders exactly what training saw.
"""

from medgpt.allocator import relaunch_with_tcmalloc

relaunch_with_tcmalloc(__name__)  # first, before anything allocates (see medgpt/allocator.py)

from dataclasses import dataclass, field

from trl import SFTConfig, SFTTrainer

from medgpt.arguments import DataArguments, LoraArguments, ModelArguments, at_least, parse_args, setup_logging
from medgpt.chat import ChatFormat
from medgpt.data import load_splits, log_reports
from medgpt.encoding import encode_conversations
from medgpt.errors import InputError, exit_on_input_error
from medgpt.modeling import load_tokenizer, prepare_model
from medgpt.training import train_on_rows


@dataclass
class SFTArguments:
    model_max_length: int = field(
        default=1024,
        metadata={"help": "Longest sample in tokens. Longer ones lose their oldest turns, then their answer's tail."},
    )
    truncate_long_prompts: bool = field(
        default=True,
        metadata={"help": "A prompt that leaves no room for its answer keeps its end (the question's last tokens, the "
                  "assistant header, the system turn if it fits) and counts as truncated; False: such a record is an "
                  "error (or a counted rejection with --skip_invalid_records)."},
    )
    train_on_inputs: bool = field(default=False, metadata={"help": "Also compute the loss on prompts."})
    neft_alpha: float | None = field(
        default=None, metadata={"help": "NEFTune embedding noise (e.g. 5); the same as --neftune_noise_alpha. Off by default."}
    )

    def __post_init__(self):
        at_least(self, "model_max_length", 2)
        at_least(self, "neft_alpha", 0)


@exit_on_input_error
def main(argv=None):
    model_args, lora_args, data_args, sft_args, training_args = parse_args(
        (ModelArguments, LoraArguments, DataArguments, SFTArguments, SFTConfig), argv
    )
    setup_logging(training_args)

    tokenizer = load_tokenizer(model_args)
    chat_format = ChatFormat.for_model(model_args.template_name, tokenizer)
    chat_format.install()

    train_records, eval_records, train_report, eval_report = load_splits(data_args, "conversation", training_args.seed)
    encode = dict(
        chat_format=chat_format,
        tokenizer=tokenizer,
        max_length=sft_args.model_max_length,
        train_on_inputs=sft_args.train_on_inputs,
        skip_invalid=data_args.skip_invalid_records,
        truncate_long_prompts=sft_args.truncate_long_prompts,
    )
    train_rows = encode_conversations(train_records, report=train_report, **encode)
    eval_rows = encode_conversations(eval_records, report=eval_report, **encode) if eval_records else []
    log_reports(train_report, eval_report, eval_rows)

    # Samples are already tokenized and cut to model_max_length; the trainer only batches (or packs) them.
    training_args.max_length = sft_args.model_max_length
    if sft_args.neft_alpha is not None:
        if training_args.neftune_noise_alpha not in (None, sft_args.neft_alpha):
            raise InputError("--neft_alpha and --neftune_noise_alpha are the same option: give one of them")
        training_args.neftune_noise_alpha = sft_args.neft_alpha
    model = prepare_model(model_args, lora_args, training_args)
    train_on_rows(SFTTrainer, model, tokenizer, training_args, train_rows, eval_rows)


if __name__ == "__main__":
    main()
