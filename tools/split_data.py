"""Split data into training and validation files, keeping each group of near duplicates on one side,
so that validation never scores a rewording of a training record.

    python tools/split_data.py --input data/finetune --train_file outputs/train.jsonl \
        --validation_file outputs/validation.jsonl --validation_ratio 0.1 --seed 42
    python tools/split_data.py --input merged.jsonl --train_file train.jsonl --validation_file valid.jsonl \
        --validation_size 500 --threshold 0.7

Groups: records joined by any chain of exact or near duplicates (as dedup_data.py finds them: MinHash + LSH
over character n-grams). Whole groups go to validation, in an order shuffled with --seed, while they fit:
validation ends at most one group's size short of the size asked. Both files keep the input's order;
records are written as they were read.
"""

import logging
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the medgpt package beside tools/

from medgpt.arguments import at_least, parse_args, require, setup_logging  # noqa: E402
from medgpt.dataset_tools import (  # noqa: E402
    RecordFilesArguments, Tally, check_jsonl_output, input_files, read_records, viewed_records,
)
from medgpt.errors import InputError, exit_on_input_error  # noqa: E402
from medgpt.near_duplicates import SimilarityArguments, choose_validation, duplicate_groups, fingerprints  # noqa: E402
from medgpt.outputs import write_jsonl_files  # noqa: E402

logger = logging.getLogger(__name__)


@dataclass
class SplitArguments(RecordFilesArguments):
    train_file: str | None = field(default=None, metadata={"help": "Where the training records go (.jsonl)."})
    validation_file: str | None = field(default=None, metadata={"help": "Where the validation records go (.jsonl)."})
    validation_ratio: float = field(default=0.1, metadata={"help": "Share of the records for validation, in (0, 1)."})
    validation_size: int | None = field(default=None, metadata={"help": "A number of validation records instead of a ratio."})
    seed: int = field(default=42, metadata={"help": "Seed of the choice of validation groups."})

    def __post_init__(self):
        super().__post_init__()
        require(0 < self.validation_ratio < 1, "validation_ratio", "must be in (0, 1)", self.validation_ratio)
        at_least(self, "validation_size", 1)


@exit_on_input_error
def main(argv=None):
    args, similarity = parse_args((SplitArguments, SimilarityArguments), argv)
    setup_logging()
    files = input_files(args.input)
    if args.train_file and args.validation_file and os.path.realpath(args.train_file) == os.path.realpath(args.validation_file):
        raise InputError("--train_file and --validation_file are the same file", args.train_file)
    check_jsonl_output(args.train_file, args.overwrite, files, "--train_file", inputs=args.input)
    check_jsonl_output(args.validation_file, args.overwrite, files, "--validation_file", inputs=args.input)

    tally = Tally("split")
    records, views = viewed_records(read_records(files, tally, args.skip_invalid), tally, args.skip_invalid)
    target = args.validation_size if args.validation_size is not None else max(1, round(len(records) * args.validation_ratio))
    if target >= len(records):
        raise InputError(f"{len(records)} usable records cannot give {target} to validation and keep some for training",
                         args.input[0])
    groups = duplicate_groups(fingerprints(views, similarity.ngram, similarity.num_perm), similarity.threshold,
                              similarity.num_perm)
    chosen = choose_validation(groups, target, args.seed)
    if not chosen:
        raise InputError(f"every group of near duplicates is larger than the {target} validation records asked for: "
                         "ask for more (--validation_ratio, --validation_size)", args.input[0])
    train = [record.data for index, record in enumerate(records) if index not in chosen]
    validation = [record.data for index, record in enumerate(records) if index in chosen]
    tally.kept = len(records)
    write_jsonl_files({args.train_file: train, args.validation_file: validation})
    tally.log()
    shared = [group for group in groups if len(group) > 1]
    logger.info("%d groups of near duplicates (%d records, the largest %d) kept whole", len(shared),
                sum(map(len, shared)), max(map(len, groups), default=0))
    logger.info("wrote %d training records to %s and %d validation records (%d asked) to %s", len(train),
                args.train_file, len(validation), target, args.validation_file)
    return train, validation


if __name__ == "__main__":
    main()
