"""Question-answer pairs for SFT, written by a model from source texts (PubMed abstracts, notes), each
pair grounded in and naming its source.

    python tools/generate_qa.py --input outputs/data/corpus.jsonl --output_file outputs/data/qa.jsonl \
        --model_name_or_path models/SmolLM2-135M-Instruct
    python tools/generate_qa.py --input corpus.jsonl --output_file qa.jsonl --language zh \
        --api_base http://127.0.0.1:8000/v1 --model medgpt --concurrency 8      # any OpenAI-compatible endpoint

Sources: JSONL records with "text" (and "pmid" or "id", naming the pairs' source), or text files with one source a line.
Pairs that fail the checks are dropped and counted by reason: empty or too short, a question that refers
to "the text", an answer whose words are mostly not in the source (--min_support), a repeated question.
The output is resumable: run the same command again after an interruption and it carries on where it
stopped (a state file beside the output, <output>.state, records the settings and the finished sources); --overwrite True
starts again. A failing endpoint is retried with backoff (--retries), then reported; what was written stays.
"""

import logging
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the medgpt package beside tools/

from medgpt.arguments import at_least, parse_args, require, setup_logging  # noqa: E402
from medgpt.dataset_tools import Tally, check_jsonl_path, input_files  # noqa: E402
from medgpt.errors import InputError, exit_on_input_error  # noqa: E402
from medgpt.qa_generation import PairChecks, ResumableOutput, generate_pairs, read_sources  # noqa: E402
from medgpt.text_generation import WriterModel, WriterModelArguments  # noqa: E402

logger = logging.getLogger("generate_qa")


@dataclass
class QAArguments:
    input: list[str] = field(default_factory=list, metadata={"help": "Source files or folders."})
    output_file: str | None = field(default=None, metadata={"help": "Where the pairs go (JSONL)."})
    format: str = field(default="sharegpt", metadata={"help": "Output format.", "choices": ["sharegpt", "openai", "alpaca"]})
    language: str = field(default="auto", metadata={
        "help": "Language of the pairs; auto: each source's own.", "choices": ["auto", "en", "zh"]})
    pairs_per_source: int = field(default=3, metadata={"help": "Pairs asked for per source."})
    min_source_words: int = field(default=15, metadata={
        "help": "Sources with fewer content words (Chinese: character pairs) are left out, counted."})
    min_support: float = field(default=0.6, metadata={
        "help": "Share of an answer's content words (Chinese: character pairs) that must occur in its source."})
    overwrite: bool = field(default=False, metadata={"help": "Start again instead of resuming --output_file."})

    def __post_init__(self):
        if not self.input:
            raise InputError("--input is required: source files or folders")
        if not self.output_file:
            raise InputError("--output_file is required")
        at_least(self, "pairs_per_source", 1)
        at_least(self, "min_source_words", 1)
        require(0 <= self.min_support <= 1, "min_support", "must be in [0, 1]", self.min_support)


@exit_on_input_error
def main(argv=None):
    args, model_args = parse_args((QAArguments, WriterModelArguments), argv)
    setup_logging()
    if not model_args.configured:
        raise InputError("no model to write the pairs: give --model_name_or_path (a local model folder) or "
                         "--api_base and --model (an OpenAI-compatible endpoint)")
    check_jsonl_path(args.output_file, input_files(args.input), inputs=args.input)
    report = Tally("sources", unit="sources")
    sources = read_sources(args.input, args.min_source_words, report)
    report.kept = len(sources)
    report.log()
    if not sources:
        raise InputError("no usable sources", args.input[0])
    checks = PairChecks(min_support=args.min_support)
    settings = {"input": [os.path.abspath(path) for path in args.input], "writer": model_args.describe(),
                "format": args.format, "language": args.language, "pairs_per_source": args.pairs_per_source,
                "min_support": args.min_support, "min_source_words": args.min_source_words,
                "temperature": model_args.temperature, "max_new_tokens": model_args.max_new_tokens,
                "repetition_penalty": model_args.repetition_penalty, "template_name": model_args.template_name}
    output = ResumableOutput(args.output_file, settings, args.overwrite)  # checked before the model loads
    writer = WriterModel(model_args)
    try:
        output.open({source.id for source in sources})
        dropped = generate_pairs(sources, writer, output, args.language, args.pairs_per_source, checks,
                                 args.format, model_args.batch_size)
    finally:
        writer.close()
    if not output.records:
        logger.warning("no pair passed the checks: the output is empty (see the reasons below; a stronger model, "
                       "or a lower --min_support, may keep some)")
    lines = [f"pairs: {len(output.records)} kept from {len(output.finished)} sources, {sum(dropped.values())} dropped"]
    lines += [f"  dropped {count} x {reason}" for reason, count in dropped.most_common()]
    logger.info("\n".join(lines))
    logger.info("wrote %s", os.path.abspath(args.output_file))


if __name__ == "__main__":
    main()
