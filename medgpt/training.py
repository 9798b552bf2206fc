"""What every stage does around its trainer: train, report, save."""

import contextlib
import functools
import logging
import os
import shutil

import torch
from peft import PeftModel
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl.trainer.utils import add_fused_lm_head

from medgpt.cpu_logprobs import use_frozen_head_logprobs
from medgpt.errors import close_progress_bars, disk_full_error, is_disk_full
from medgpt.modeling import save_model_and_tokenizer
from medgpt.outputs import remove_incomplete_checkpoint, staging_path, start_run

logger = logging.getLogger(__name__)

# TRL's fused LM head (SFT, DPO, GRPO, and PT through FusedLossTrainer) never holds the whole (batch,
# length, vocabulary) logits. On CPU its log-probabilities come from medgpt.cpu_logprobs where the head is
# frozen; elsewhere TRL folds tiles of TOKEN_CHUNK_SIZE tokens x _CHUNKED_LOGPROB_CHUNK_SIZE vocabulary
# entries, sized for GPUs (4096 x 32768), where a tile is one kernel. On CPU each tile is several eager
# tensors of that size: smaller ones took SFT on the default model from 3.41 to 2.63 GiB peak.
CPU_FUSED_HEAD_TILE = (1024, 8192)


def prepare_fused_head(device_type: str) -> None:
    """The CPU's way through TRL's fused LM head: our log-probabilities for frozen heads, CPU-sized tiles."""
    if device_type != "cpu":
        return
    import trl.kernels.chunked_logprob as chunked_logprob
    import trl.trainer.utils as trl_utils

    chunked_logprob.TOKEN_CHUNK_SIZE, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = CPU_FUSED_HEAD_TILE
    use_frozen_head_logprobs()


class FusedLossTrainer(Trainer):
    """transformers' Trainer whose causal-LM loss comes from TRL's fused LM head: the same loss and
    gradients as the model's own cross-entropy, without the full logits (400 MB per copy for 4 x 512
    tokens of a 49k vocabulary, and the plain loss keeps several copies)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        add_fused_lm_head(self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Label smoothing and custom losses need the logits: those keep the plain forward.
        if self.label_smoother is None and self.compute_loss_func is None:
            inputs = {**inputs, "fused_lm_head": True}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def pair_lengths(dataset) -> list[int] | None:
    """Tokens in each row of a preference dataset, the longer side of the pair with its prompt; None for
    other layouts. The preference stages' rows have no input_ids, which length grouping reads by default."""
    columns = set(dataset.column_names)
    if {"prompt_ids", "chosen_ids", "rejected_ids"} <= columns:  # DPO: prompt and answers apart
        return [len(prompt) + max(len(chosen), len(rejected)) for prompt, chosen, rejected
                in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])]
    for chosen_column, rejected_column in (("chosen_ids", "rejected_ids"), ("chosen_input_ids", "rejected_input_ids")):
        if {chosen_column, rejected_column} <= columns:  # RM, ORPO: whole sequences
            return [max(len(chosen), len(rejected))
                    for chosen, rejected in zip(dataset[chosen_column], dataset[rejected_column])]
    return None


class GroupPairsByLength:
    """Mixin for the preference trainers: --train_sampling_strategy group_by_length batches pairs of
    similar length together, so a batch pads little (both sides of a pair run in one padded forward)."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        lengths = pair_lengths(dataset) if self.args.train_sampling_strategy == "group_by_length" else None
        if lengths is None:
            return super()._get_train_sampler(train_dataset)
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths=lengths)

    def _get_eval_sampler(self, eval_dataset):
        lengths = pair_lengths(eval_dataset) if self.args.train_sampling_strategy == "group_by_length" else None
        if lengths is None:
            return super()._get_eval_sampler(eval_dataset)
        return LengthGroupedSampler(self.args.eval_batch_size, lengths=lengths,
                                    generator=torch.Generator().manual_seed(self.args.seed))


def fused_per_token_fields() -> list[str]:
    """The per-token fields of TRL's FusedCausalLMOutput (zero where the label is -100): read from the
    class, so that a field TRL adds is carried through forward_pair_sides_apart rather than lost."""
    import dataclasses

    from trl.trainer.utils import FusedCausalLMOutput

    return [field.name for field in dataclasses.fields(FusedCausalLMOutput) if field.name not in ("loss", "aux_loss")]


def forward_pair_sides_apart(model) -> None:
    """Make a fused-head forward over a preference batch ([chosen rows; rejected rows], right-padded) run
    each side as its own forward, cut to that side's longest row. TRL pads both sides to the longest row
    of either, and chosen answers are often several times the rejected ones' length: half the rejected
    rows' positions were padding on the shipped data. The outputs are those of the joint forward (to
    rounding); only padding is skipped. Batches this cannot cut safely (other inputs, left padding) and
    models that add a router loss take the joint forward. Applying it twice changes nothing."""
    joint_forward = model.forward
    if getattr(joint_forward, "pair_sides_apart", False):
        return
    text_config = model.config.get_text_config()
    router_loss = getattr(text_config, "output_router_logits", False)  # added per forward: keep one
    per_token_fields = fused_per_token_fields()

    @functools.wraps(joint_forward)
    def forward(*args, **all_kwargs):
        input_ids, attention_mask, labels = (all_kwargs.get(name) for name in ("input_ids", "attention_mask", "labels"))
        kwargs = {name: value for name, value in all_kwargs.items()
                  if name not in ("fused_lm_head", "input_ids", "attention_mask", "labels")}
        cuttable = (all_kwargs.get("fused_lm_head", False) and not router_loss and not args and input_ids is not None
                    and attention_mask is not None and labels is not None and input_ids.size(0) % 2 == 0
                    and input_ids.size(0) > 0
                    and all(value is None or name == "use_cache" for name, value in kwargs.items()))
        if not cuttable:  # e.g. generation, a plain forward, inputs given by position
            return joint_forward(*args, **all_kwargs)
        half, positions = input_ids.size(0) // 2, input_ids.size(1)
        sides = []
        for rows in (slice(0, half), slice(half, None)):
            length = max(int(attention_mask[rows].sum(dim=1).max()), 2)
            if attention_mask[rows, length:].any():  # not right-padded: cutting would drop real tokens
                return joint_forward(fused_lm_head=True, input_ids=input_ids, attention_mask=attention_mask,
                                     labels=labels, **kwargs)
            sides.append((rows, length))
        outputs = [joint_forward(fused_lm_head=True, input_ids=input_ids[rows, :length],
                                 attention_mask=attention_mask[rows, :length], labels=labels[rows, :length], **kwargs)
                   for rows, length in sides]
        joined = {}
        for field in per_token_fields:
            parts = [getattr(output, field) for output in outputs]
            if any(part is None for part in parts):
                joined[field] = None
                continue
            # Positions beyond a side's cut were padding: their per-token fields are zero (False).
            joined[field] = torch.cat([torch.cat([part, part.new_zeros(part.size(0), positions - 1 - part.size(1))], dim=1)
                                       for part in parts])
        joined["loss"] = -joined["log_probs"].sum() / joined["label_mask"].sum().clamp(min=1)
        return type(outputs[0])(**joined)

    forward.pair_sides_apart = True
    model.forward = forward


@contextlib.contextmanager
def disk_full_in(output_dir: str):
    """A write in the block that finds the disk full is reported as one naming output_dir (the libraries'
    errors name no file), and the half-written model in the staging folder is removed: the model is
    written whole there before anything is moved into output_dir."""
    try:
        yield
    except Exception as error:
        if not is_disk_full(error, output_dir):
            raise
        shutil.rmtree(staging_path(output_dir), ignore_errors=True)
        raise disk_full_error(output_dir) from error


def finish_training(trainer, tokenizer, training_args, evaluate: bool = False) -> dict:
    """Train (resuming if asked), save the model with its tokenizer, log metrics and where it all went."""
    logger.info("training on %d process(es), %s", training_args.world_size, training_args.device)
    start_run(training_args.output_dir, training_args.resume_from_checkpoint,
              getattr(training_args, "overwrite_output_dir", False), trainer.is_world_process_zero())
    try:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except Exception as error:
        if not is_disk_full(error, training_args.output_dir):
            raise
        # The trainer writes checkpoints in place: the one it was writing is incomplete and can never be
        # resumed, so it goes (freeing its space); the earlier ones stay for --resume_from_checkpoint last.
        close_progress_bars()
        checkpoint = os.path.join(training_args.output_dir, f"checkpoint-{trainer.state.global_step}")
        removed = trainer.is_world_process_zero() and remove_incomplete_checkpoint(checkpoint)
        if removed:
            logger.error("removed the incomplete %s", checkpoint)
        raise disk_full_error(checkpoint if removed else training_args.output_dir) from error
    with disk_full_in(training_args.output_dir):
        trainer.save_state()  # trainer_state.json: steps, losses, tokens seen
    metrics = dict(result.metrics)
    tokens = trainer.state.num_input_tokens_seen
    if tokens:
        metrics["train_tokens"] = tokens
        metrics["train_tokens_per_second"] = round(tokens / max(metrics.get("train_runtime", 0), 1e-9), 1)
    if training_args.device.type == "cuda":
        # What decides which model fits: the most GPU memory tensors took at once (this process's GPU).
        metrics["train_peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if evaluate:
        metrics.update(trainer.evaluate())
    trainer.log_metrics("train", metrics)
    with disk_full_in(training_args.output_dir):
        trainer.save_metrics("all", metrics)
        save_model_and_tokenizer(trainer, tokenizer, training_args.output_dir)
    if trainer.is_world_process_zero():
        logger.info("outputs in %s (TensorBoard logs under %s)", os.path.abspath(training_args.output_dir),
                    os.path.join(training_args.output_dir, "runs"))
    return metrics


def train_on_rows(trainer_class, model, tokenizer, training_args, train_rows: list[dict], eval_rows: list[dict], **trainer_kwargs) -> dict:
    """Build a (TRL or transformers) trainer over prepared rows, train it and save: every stage's ending."""
    from datasets import Dataset

    prepare_fused_head(training_args.device.type)
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        **trainer_kwargs,
    )
    return finish_training(trainer, tokenizer, training_args, evaluate=bool(eval_rows))


def tokenizer_and_preference_rows(model_args, data_args, preference_args, training_args):
    """The start of every preference stage (RM, DPO, ORPO): the tokenizer carrying the chosen template,
    and the training and validation pairs rendered with it and tokenized."""
    from medgpt.chat import ChatFormat
    from medgpt.encoding import load_preference_rows
    from medgpt.modeling import load_tokenizer

    tokenizer = load_tokenizer(model_args)
    chat_format = ChatFormat.for_model(model_args.template_name, tokenizer)
    chat_format.install()
    train_rows, eval_rows = load_preference_rows(data_args, preference_args, chat_format, tokenizer, training_args.seed)
    return tokenizer, train_rows, eval_rows
