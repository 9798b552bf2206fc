"""Check training data with the training scripts' own rules before a run: every problem at once, as
`path:line: message`, then a summary. Exit status 0 when every record is valid, 2 otherwise.

    python tools/validate_data.py --input data/finetune                       # kind guessed from the first record
    python tools/validate_data.py --input data/reward --kind preference
    python tools/validate_data.py --input data/grpo --kind grpo --require_answer False
    python tools/validate_data.py --input data/finetune --tokenizer models/SmolLM2-135M-Instruct \
        --template_name chatml --max_length 512                               # and what 512 tokens would cut

Kinds: sft (supervised_finetuning.py), pt (pretraining.py), preference (reward_modeling.py, dpo_training.py,
orpo_training.py), grpo (grpo_training.py, ppo_training.py). With --tokenizer, sft and preference records
are encoded as training encodes them: records training would truncate are listed as notes, records it
would refuse (a prompt that leaves no room for its answer, a conversation the template cannot render)
are problems.
"""

import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the medgpt package beside tools/

from medgpt.arguments import at_least, parse_args, setup_logging  # noqa: E402
from medgpt.dataset_tools import KINDS, LengthCheck, first_kind, input_files, validate_files, validation_summary  # noqa: E402
from medgpt.errors import InputError, exit_on_input_error  # noqa: E402


@dataclass
class ValidateArguments:
    input: list[str] = field(default_factory=list, metadata={"help": "Data files or folders (.jsonl/.json/.txt)."})
    kind: str = field(default="auto", metadata={
        "help": "What the data is for; auto: guessed from the first record.", "choices": ["auto", *KINDS]})
    require_answer: bool = field(default=True, metadata={
        "help": "grpo: every question needs an 'answer' (the accuracy reward, on by default, reads it)."})
    max_errors: int = field(default=50, metadata={"help": "Problems printed one by one; the rest are counted."})
    tokenizer: str | None = field(default=None, metadata={
        "help": "sft / preference: a model or tokenizer folder; also report what --max_length would cut."})
    template_name: str = field(default="auto", metadata={
        "help": "With --tokenizer: the template from template.py, or auto for the tokenizer's chat_template."})
    max_length: int = field(default=1024, metadata={
        "help": "With --tokenizer: SFT's --model_max_length or the preference stages' --max_length."})
    max_prompt_length: int = field(default=512, metadata={"help": "With --tokenizer, preference data: --max_prompt_length."})
    truncate_long_prompts: bool = field(default=True, metadata={
        "help": "With --tokenizer, sft: as SFT's --truncate_long_prompts (False: over-long prompts are problems)."})

    def __post_init__(self):
        if not self.input:
            raise InputError("--input is required")
        at_least(self, "max_errors", 0)
        at_least(self, "max_length", 2)
        at_least(self, "max_prompt_length", 1)


@exit_on_input_error
def main(argv=None) -> int:
    (args,) = parse_args((ValidateArguments,), argv)
    setup_logging()
    files = input_files(args.input)
    kind = first_kind(files) if args.kind == "auto" else args.kind
    length_check = None
    if args.tokenizer:
        if kind not in ("sft", "preference"):
            raise InputError(f"--tokenizer checks lengths of sft and preference data, not {kind} data "
                             "(pretraining packs text into blocks and cuts nothing)")
        length_check = LengthCheck(args.tokenizer, args.template_name, args.max_length, args.max_prompt_length,
                                   args.truncate_long_prompts)
    result = validate_files(files, kind, args.require_answer, length_check)
    print(validation_summary(result, args.max_errors), flush=True)
    return 0 if result.invalid == 0 and result.read > 0 else 2


if __name__ == "__main__":
    sys.exit(main())
