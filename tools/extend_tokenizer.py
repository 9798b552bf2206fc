"""Extend a model's tokenizer with the vocabulary of a medical corpus, and its embeddings to match.

    python tools/extend_tokenizer.py --model_name_or_path models/SmolLM2-135M-Instruct \
        --corpus data/pretrain data/finetune --num_new_tokens 2000 --output_dir outputs/extended-model
    python tools/extend_tokenizer.py --model_name_or_path models/base --corpus notes.txt \
        --num_new_tokens 500 --min_frequency 5 --output_dir outputs/extended --overwrite True

The corpus is files or folders of plain text lines, {"text": ...} JSON lines and conversation files (every
message's text); records that cannot be read are skipped and counted. A BPE vocabulary is learned on it with
the base tokenizer's own normalizer and pre-tokenizer; the learned pieces the base tokenizer needs two or
more tokens for, ranked by corpus frequency x tokens saved, are appended to the BPE (vocabulary and merges,
ids after the existing ones). Each new embedding row (and output-head row, if the head is not tied) starts
as the mean of the rows of the pieces the token replaces. --output_dir gets the model, the tokenizer with
its chat template, the generation config and extension_report.json (the tokens added, with frequency and
pieces, and tokens per 1,000 characters of the corpus before and after).

Train the new rows with the stage scripts, e.g.
    python pretraining.py --model_name_or_path outputs/extended-model --train_file_dir data/pretrain \
        --use_peft True --modules_to_save embed_tokens,lm_head --output_dir outputs/pt-extended
Only byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM2 and their kind) are supported.
"""

import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the medgpt package beside tools/

from transformers import AutoModelForCausalLM  # noqa: E402

from medgpt import domain_tokenizer  # noqa: E402
from medgpt.arguments import at_least, parse_args, require, setup_logging  # noqa: E402
from medgpt.data import DataReport  # noqa: E402
from medgpt.errors import InputError, exit_on_input_error  # noqa: E402
from medgpt.modeling import check_model_path, hub_kwargs  # noqa: E402
from medgpt.outputs import check_apart_from_inputs, check_not_replacing  # noqa: E402

logger = logging.getLogger("extend_tokenizer")


@dataclass
class ExtendTokenizerArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "The base model folder (or a cached hub id)."})
    corpus: list[str] = field(default_factory=list, metadata={
        "help": "Files or folders of domain text: .txt lines, {\"text\"} JSON lines, conversation files."})
    output_dir: str | None = field(default=None, metadata={"help": "Where the extended model and its report go."})
    num_new_tokens: int = field(default=2000, metadata={
        "help": "New vocabulary entries to add at most (intermediate steps towards long tokens included)."})
    vocab_size: int = field(default=16000, metadata={
        "help": "Size of the BPE vocabulary learned on the corpus, among which the new tokens are chosen."})
    min_frequency: int = field(default=2, metadata={"help": "A learned merge must occur this many times in the corpus."})
    max_token_bytes: int = field(default=24, metadata={
        "help": "Longest learned token in UTF-8 bytes (a Chinese character is 3, a leading space 1); 0: no limit."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a model already in --output_dir."})

    def __post_init__(self):
        if not self.model_name_or_path:
            raise InputError("--model_name_or_path is required")
        if not self.corpus:
            raise InputError("--corpus is required: one or more files or folders of text")
        at_least(self, "num_new_tokens", 1)
        require(self.vocab_size > 256, "vocab_size", "must be above 256 (the byte alphabet)", self.vocab_size)
        at_least(self, "min_frequency", 1)
        require(self.max_token_bytes == 0 or self.max_token_bytes >= 2, "max_token_bytes", "must be 0 or at least 2",
                self.max_token_bytes)


@exit_on_input_error
def main(argv=None):
    (args,) = parse_args((ExtendTokenizerArguments,), argv)
    setup_logging()
    model_path = check_model_path(args.model_name_or_path)
    check_not_replacing(args.output_dir, [("--model_name_or_path", model_path)])
    domain_tokenizer.check_new_model_folder(args.output_dir, args.overwrite)
    for path in args.corpus:
        if not os.path.exists(path):
            raise InputError("no such file or folder (--corpus)", path)
    check_apart_from_inputs(args.output_dir, [("--corpus", path) for path in args.corpus])
    tokenizer, spec, base = domain_tokenizer.load_base_tokenizer(model_path)

    data_report = DataReport("corpus")
    texts = domain_tokenizer.read_corpus(args.corpus, data_report)
    data_report.log()

    learned = domain_tokenizer.learn_domain_bpe(base, texts, args.vocab_size, args.min_frequency, args.max_token_bytes)
    frequency = domain_tokenizer.piece_frequencies(base, learned, texts)
    extension = domain_tokenizer.choose_new_tokens(base, spec, frequency, args.num_new_tokens)
    if not extension.tokens:
        raise InputError("no new tokens: every piece learned from the corpus is already a token of the base "
                         "model (give more text, or lower --min_frequency)", ", ".join(args.corpus))
    extended_spec, extended = domain_tokenizer.build_extended_tokenizer(base, spec, extension, texts)
    before = domain_tokenizer.tokens_per_thousand_characters(base, texts)
    after = domain_tokenizer.tokens_per_thousand_characters(extended, texts)
    uses = domain_tokenizer.count_tokens(extended, texts)

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto", **hub_kwargs(model_path))
    # Ids, not entries: a vocabulary with unused ids needs rows up to its largest id.
    new_size = max(extended.get_vocab(with_added_tokens=True).values()) + 1
    domain_tokenizer.initialise_new_embeddings(model, extension, new_size)
    settings = {name: getattr(args, name) for name in ("model_name_or_path", "corpus", "num_new_tokens", "vocab_size",
                                                       "min_frequency", "max_token_bytes")}
    report = domain_tokenizer.extension_report(len(tokenizer), new_size, extension, before, after, uses, data_report, len(texts), settings)
    domain_tokenizer.save_extended_model(model, tokenizer, extended_spec, report, args.output_dir, texts[:200])

    unused = sum(1 for token in extension.tokens if not uses[token.token])
    top = Counter({token.text: token.frequency * (len(token.pieces) - 1) for token in extension.tokens if not token.intermediate})
    logger.info("added %d tokens (%d of them only steps towards longer ones), vocabulary %d -> %d; %d never stand "
                "alone in the encoded corpus (they are steps inside longer tokens)",
                len(extension.tokens), report["intermediate"], len(tokenizer), new_size, unused)
    logger.info("top new tokens: %s", ", ".join(text for text, _ in top.most_common(20)))
    logger.info("tokens per 1,000 characters of the corpus: %.1f -> %.1f (%.1f%% fewer)", before, after,
                100 * (before - after) / before if before else 0.0)
    logger.info("extended model saved to %s (report: %s)", os.path.abspath(args.output_dir),
                os.path.join(args.output_dir, domain_tokenizer.REPORT_NAME))


if __name__ == "__main__":
    main()
