"""Merge several datasets into one file: each source sampled by its weight, all in one format, each
record marked with where it came from, shuffled with a seed.

    python tools/merge_data.py --input data/finetune/medical_sft_zh.jsonl my_alpaca.json more_data/ \
        --weights 1 0.5 2 --output_file outputs/merged.jsonl --to sharegpt --seed 42
    python tools/merge_data.py --input reward_a.jsonl reward_b.jsonl --to unchanged --output_file pairs.jsonl

Weights: 1 keeps every record once, 0.5 a random half, 2 every record twice, 2.5 twice plus a random half,
0 none. Each record gets a `source` key, "path:line" of where it was read (a `source` it already has is
kept). --to unchanged writes records as they are (pretraining text, preference pairs, questions), checked
with the training rules of their kind; the conversation formats convert as convert_data.py does.
"""

import logging
import os
import random
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the medgpt package beside tools/

from medgpt.arguments import parse_args, require, setup_logging  # noqa: E402
from medgpt.data import find_data_files  # noqa: E402
from medgpt.dataset_tools import (  # noqa: E402
    RecordFilesArguments, FORMATS, Tally, check_jsonl_output, convert_records, read_records, require_records, viewed_records, weighted_sample,
)
from medgpt.errors import exit_on_input_error  # noqa: E402
from medgpt.outputs import write_jsonl  # noqa: E402

logger = logging.getLogger(__name__)


MAX_WEIGHT = 100  # a source repeated more often than this is a typo, and would fill the memory


@dataclass
class MergeArguments(RecordFilesArguments):
    input: list[str] = field(default_factory=list, metadata={"help": "Sources: data files or folders, one source each."})
    weights: list[float] = field(default_factory=list, metadata={
        "help": "One sampling weight per source (default: 1 each): 0.5 a random half, 2 twice, 2.5 twice and a half."})
    output_file: str | None = field(default=None, metadata={"help": "The merged records (.jsonl)."})
    to: str = field(default="sharegpt", metadata={
        "help": "Format of every record; unchanged: as read (any kind of data).", "choices": [*FORMATS, "unchanged"]})
    seed: int = field(default=42, metadata={"help": "Seed of the weighted sampling and the shuffle."})
    strict: bool = field(default=False, metadata={
        "help": "A record the target format cannot hold is an error instead of a counted, logged omission."})

    def __post_init__(self):
        super().__post_init__()
        if not self.weights:
            self.weights = [1.0] * len(self.input)
        require(len(self.weights) == len(self.input), "weights", f"needs one weight per --input source "
                f"({len(self.input)})", self.weights)
        for weight in self.weights:
            require(0 <= weight <= MAX_WEIGHT, "weights", f"must be from 0 to {MAX_WEIGHT}", weight)


@exit_on_input_error
def main(argv=None):
    (args,) = parse_args((MergeArguments,), argv)
    setup_logging()
    sources = [find_data_files(path) for path in args.input]
    check_jsonl_output(args.output_file, args.overwrite, [name for files in sources for name in files],
                       inputs=args.input)

    rng = random.Random(args.seed)
    merged, tallies = [], []
    for path, files, weight in zip(args.input, sources, args.weights):
        tally = Tally(path)
        records = read_records(files, tally, args.skip_invalid)
        if args.to == "unchanged":
            records, _ = viewed_records(records, tally, args.skip_invalid)  # each checked by the rules of its kind
            tally.kept = len(records)
        else:
            records = convert_records(records, args.to, tally, args.skip_invalid, args.strict)
        sampled = weighted_sample(records, weight, rng)
        merged += [record.data if "source" in record.data else {**record.data, "source": record.where} for record in sampled]
        tally.log()
        logger.info("  weight %g: %d records written", weight, len(sampled))
        tallies.append((tally, len(sampled)))
    require_records(merged, None, args.input[0])  # each source was reported above
    rng.shuffle(merged)
    write_jsonl(args.output_file, merged)
    logger.info("wrote %d records from %d sources to %s", len(merged), len(args.input), args.output_file)
    return tallies


if __name__ == "__main__":
    main()
