"""ORPO (odds-ratio preference optimization): SFT loss on the chosen answer plus an odds-ratio term that
pushes it above the rejected one, in one stage and without a reference model.

    python orpo_training.py --model_name_or_path outputs/sft-merged --train_file_dir data/reward \
        --template_name chatml --use_peft True --orpo_beta 0.1 --output_dir outputs/orpo

Uses TRL's ORPOTrainer (trl.experimental.orpo), fed with pairs rendered by our template, with its forward
through the fused LM head (no full-vocabulary logits) and each side of a pair padded only to its own side.
"""

from medgpt.allocator import relaunch_with_tcmalloc

relaunch_with_tcmalloc(__name__)  # first, before anything allocates (see medgpt/allocator.py)

import os
from dataclasses import dataclass, field

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from peft import PeftModel  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from medgpt.arguments import DataArguments, LoraArguments, ModelArguments, PreferenceArguments, parse_args, setup_logging  # noqa: E402
from medgpt.encoding import IGNORE_INDEX  # noqa: E402
from medgpt.errors import InputError, exit_on_input_error  # noqa: E402
from medgpt.modeling import prepare_model  # noqa: E402
from medgpt.training import (GroupPairsByLength, forward_pair_sides_apart, tokenizer_and_preference_rows,  # noqa: E402
                             train_on_rows)


@dataclass
class ORPOArguments:
    orpo_beta: float = field(default=0.1, metadata={"help": "Weight of the odds-ratio term (lambda in the ORPO paper)."})


class PretokenizedORPOTrainer(GroupPairsByLength, ORPOTrainer):
    """ORPOTrainer over pairs already tokenized by our template: builds its row layout from the ids. Its
    forward takes per-token log-probabilities from the fused LM head instead of the (2 x batch, length,
    vocabulary) logits, which TRL's ORPO holds, with several copies, for its two terms."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_head = not self.is_encoder_decoder
        if self.fused_head:
            base = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
            add_fused_lm_head(base, outputs=("log_probs", "mean_logits"))
            # Sharded training gathers the weights once per forward: there one joint forward costs less.
            if not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
                forward_pair_sides_apart(base)

    def concatenated_forward(self, model, batch: dict) -> tuple:
        """TRL's outputs, the same values: the answers' mean log-probabilities of both sides, each side's mean
        logit (over its real tokens here; TRL also averages padding), and the NLL term, which TRL's ORPO
        takes over the chosen rows' prompt and answer alike."""
        if not self.fused_head:
            return super().concatenated_forward(model, batch)
        joined = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=self.padding_value,
                                          device=self.accelerator.device)
        chosen_rows = batch["chosen_labels"].shape[0]
        input_ids, attention_mask = joined["concatenated_input_ids"], joined["concatenated_attention_mask"]
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, fused_lm_head=True,
                        labels=input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX))
        log_probs, scored = outputs.log_probs, outputs.label_mask
        answer = joined["concatenated_labels"][:, 1:] != IGNORE_INDEX
        answer_logps = (log_probs * answer).sum(-1) / answer.sum(-1)
        nll = -log_probs[:chosen_rows].sum() / scored[:chosen_rows].sum().clamp(min=1)
        mean_logits = outputs.mean_logits
        result = (answer_logps[:chosen_rows], answer_logps[chosen_rows:], mean_logits[:chosen_rows][scored[:chosen_rows]],
                  mean_logits[chosen_rows:][scored[chosen_rows:]], nll)
        if not self.aux_loss_enabled:
            return result
        # The fused head adds the router loss where the text config asks for it; ORPO reads the model's config.
        return result + (outputs.aux_loss if outputs.aux_loss is not None else nll.new_zeros(()),)

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
    training_args.remove_unused_columns = False  # TRL's ORPO collator needs every column (and says so otherwise)
    training_args.max_length = preference_args.max_length
    train_on_rows(PretokenizedORPOTrainer, model, tokenizer, training_args, train_rows, eval_rows)


if __name__ == "__main__":
    main()
