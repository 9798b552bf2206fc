"""Remove exact and near-duplicate records, keeping the first of each group.

    python tools/dedup_data.py --input data/finetune --output_file outputs/sft_dedup.jsonl
    python tools/dedup_data.py --input merged.jsonl --output_file dedup.jsonl --threshold 0.7 \
        --removed_file removed.jsonl                          # and what was dropped, with what it duplicates

Exact duplicates: the same text once Unicode-normalised, case folded and with runs of whitespace as one
space. Near duplicates: an estimated Jaccard similarity of at least --threshold between the records'
sets of character --ngram-grams (MinHash with --num_perm permutations and a fixed seed, found with LSH);
character n-grams need no word segmentation, so Chinese is compared as English is. The system prompt is
left out of the comparison, so a prompt shared by a whole dataset does not make its records alike.
Records are written as they were read.
"""

import logging
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the medgpt package beside tools/

from medgpt.arguments import parse_args, setup_logging  # noqa: E402
from medgpt.dataset_tools import (  # noqa: E402
    RecordFilesArguments, Tally, check_jsonl_output, input_files, read_records, require_records, viewed_records,
)
from medgpt.errors import InputError, exit_on_input_error  # noqa: E402
from medgpt.near_duplicates import SimilarityArguments, find_duplicates, fingerprints, removed_entry  # noqa: E402
from medgpt.outputs import write_jsonl_files  # noqa: E402

logger = logging.getLogger(__name__)


@dataclass
class DedupArguments(RecordFilesArguments):
    output_file: str | None = field(default=None, metadata={"help": "The records kept (.jsonl)."})
    removed_file: str | None = field(default=None, metadata={
        "help": "Also write the records removed (.jsonl), each with where it was and the path:line (and id) of "
                "the record it duplicates."})


@exit_on_input_error
def main(argv=None):
    args, similarity = parse_args((DedupArguments, SimilarityArguments), argv)
    setup_logging()
    files = input_files(args.input)
    check_jsonl_output(args.output_file, args.overwrite, files, inputs=args.input)
    if args.removed_file:
        if os.path.realpath(args.removed_file) == os.path.realpath(args.output_file):
            raise InputError("--removed_file and --output_file are the same file", args.removed_file)
        check_jsonl_output(args.removed_file, args.overwrite, files, "--removed_file", inputs=args.input)

    tally = Tally("dedup")
    records, views = viewed_records(read_records(files, tally, args.skip_invalid), tally, args.skip_invalid)
    require_records(records, tally, args.input[0])
    prints = fingerprints(views, similarity.ngram, similarity.num_perm)
    duplicates = find_duplicates(prints, similarity.threshold, similarity.num_perm)
    removed = []
    for duplicate in duplicates:
        record, kept = records[duplicate.index], records[duplicate.of]
        tally.drop(f"{duplicate.match} duplicate", record.where)
        removed.append(removed_entry(record, kept, duplicate))
    dropped = {duplicate.index for duplicate in duplicates}
    kept = [record.data for index, record in enumerate(records) if index not in dropped]
    tally.kept = len(kept)
    write_jsonl_files({args.output_file: kept, **({args.removed_file: removed} if args.removed_file else {})})
    tally.log()
    logger.info("wrote %d records to %s%s", len(kept), args.output_file,
                f" and {len(removed)} removed ones to {args.removed_file}" if args.removed_file else "")
    return tally


if __name__ == "__main__":
    main()
