"""Direct preference optimization (DPO) on preference pairs, with LoRA, QLoRA or full weights.

    python dpo_training.py --model_name_or_path outputs/sft-merged --train_file_dir data/reward \
        --template_name chatml --use_peft True --beta 0.1 --output_dir outputs/dpo

The reference model is the starting point. With LoRA it shares the base weights: the trainer keeps a
frozen copy of the starting adapter (adapter-sized, not a second model; for a new adapter this equals
switching the adapter off). Full fine-tuning loads a second copy of the model as the reference.
Every TrainingArguments / DPOConfig flag is
accepted (e.g. --loss_type sigmoid ipo, --label_smoothing); unknown flags are errors.
"""

from medgpt.allocator import relaunch_with_tcmalloc

relaunch_with_tcmalloc(__name__)  # first, before anything allocates (see medgpt/allocator.py)

from peft import PeftModel
from trl import DPOConfig, DPOTrainer

from medgpt.arguments import DataArguments, LoraArguments, ModelArguments, PreferenceArguments, parse_args, setup_logging
from medgpt.errors import exit_on_input_error
from medgpt.modeling import prepare_model
from medgpt.training import GroupPairsByLength, forward_pair_sides_apart, tokenizer_and_preference_rows, train_on_rows


class PretokenizedDPOTrainer(GroupPairsByLength, DPOTrainer):
    """DPOTrainer fed with pairs already rendered by our template and tokenized (prompt_ids, chosen_ids,
    rejected_ids), so DPO sees exactly the text SFT and inference see. Chosen and rejected answers run
    as two forwards, each padded only to its own side's longest row."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._forward_sides_apart()

    def _forward_sides_apart(self):
        # Sharded training (DeepSpeed ZeRO, FSDP) gathers the weights once per forward: two forwards
        # would gather them twice, which costs more than the padding saves.
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return
        forward_pair_sides_apart(self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model)
        if self.ref_model is not None:
            forward_pair_sides_apart(self.ref_model)

    def _precompute_ref_logps(self, *args, **kwargs):
        # --precompute_ref_log_probs runs inside DPOTrainer.__init__: the reference then comes from the
        # same forwards as the policy later.
        self._forward_sides_apart()
        return super()._precompute_ref_logps(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)


@exit_on_input_error
def main(argv=None):
    model_args, lora_args, data_args, preference_args, training_args = parse_args(
        (ModelArguments, LoraArguments, DataArguments, PreferenceArguments, DPOConfig), argv
    )
    setup_logging(training_args)

    tokenizer, train_rows, eval_rows = tokenizer_and_preference_rows(model_args, data_args, preference_args, training_args)

    model = prepare_model(model_args, lora_args, training_args)
    training_args.max_length = preference_args.max_length
    train_on_rows(PretokenizedDPOTrainer, model, tokenizer, training_args, train_rows, eval_rows)


if __name__ == "__main__":
    main()
