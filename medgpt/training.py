"""What every stage does around its trainer: train, report, save."""

import logging
import os

from medgpt.modeling import save_model_and_tokenizer

logger = logging.getLogger(__name__)


def finish_training(trainer, tokenizer, training_args, evaluate: bool = False) -> dict:
    """Train (resuming if asked), save the model with its tokenizer, log metrics and where it all went."""
    logger.info("training on %d process(es), %s", training_args.world_size, training_args.device)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_state()  # trainer_state.json: steps, losses, tokens seen
    metrics = dict(result.metrics)
    tokens = trainer.state.num_input_tokens_seen
    if tokens:
        metrics["train_tokens"] = tokens
        metrics["train_tokens_per_second"] = round(tokens / max(metrics.get("train_runtime", 0), 1e-9), 1)
    if evaluate:
        metrics.update(trainer.evaluate())
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("all", metrics)
    save_model_and_tokenizer(trainer, tokenizer, training_args.output_dir)
    if trainer.is_world_process_zero():
        logger.info("outputs in %s (TensorBoard logs under %s)", os.path.abspath(training_args.output_dir),
                    os.path.join(training_args.output_dir, "runs"))
    return metrics


def train_on_rows(trainer_class, model, tokenizer, training_args, train_rows: list[dict], eval_rows: list[dict], **trainer_kwargs) -> dict:
    """Build a (TRL or transformers) trainer over prepared rows, train it and save: every stage's ending."""
    from datasets import Dataset

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
