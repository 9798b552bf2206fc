"""What is in a dataset: formats, turns, system prompts, tools, lengths and languages.

    python tools/data_stats.py --input data/finetune
    python tools/data_stats.py --input data/ --tokenizer models/SmolLM2-135M-Instruct --output_file stats.json

Lengths count the text of every message of a record (system prompt, turns, tool calls and results,
preference answers), without a template's markers; tokens with --tokenizer's tokenizer. Turns: the
messages of a conversation other than the system prompt. Languages: zh, en, mixed or other, from the
share of CJK characters against Latin letters in the turns (a CJK character weighs as three letters, so
Chinese with a few English drug names stays zh; other: no letters, or mostly other scripts).
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the medgpt package beside tools/

from medgpt.arguments import parse_args, setup_logging  # noqa: E402
from medgpt.dataset_tools import (  # noqa: E402
    RecordFilesArguments, Tally, check_not_an_input, dataset_stats, input_files, load_tokenizer, read_records, stats_table, viewed_records,
)
from medgpt.errors import exit_on_input_error  # noqa: E402
from medgpt.outputs import atomic_write_text, check_new_output_file  # noqa: E402

logger = logging.getLogger(__name__)


@dataclass
class StatsArguments(RecordFilesArguments):
    tokenizer: str | None = field(default=None, metadata={"help": "A model or tokenizer folder: also count tokens."})
    output_file: str | None = field(default=None, metadata={"help": "Also write the statistics as JSON here."})


@exit_on_input_error
def main(argv=None) -> dict:
    (args,) = parse_args((StatsArguments,), argv)
    setup_logging()
    files = input_files(args.input)
    if args.output_file:
        check_new_output_file(args.output_file, args.overwrite)
        check_not_an_input(args.output_file, files, inputs=args.input)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None

    tally = Tally("stats")
    records, views = viewed_records(read_records(files, tally, args.skip_invalid), tally, args.skip_invalid)
    tally.kept = len(records)
    stats = {"files": files, **dataset_stats(views, tokenizer)}
    if tally.dropped:
        stats["invalid"] = dict(tally.dropped)
    print(stats_table(stats), flush=True)
    if args.output_file:
        atomic_write_text(args.output_file, json.dumps(stats, ensure_ascii=False, indent=2) + "\n")
        logger.info("wrote %s", args.output_file)
    if tally.dropped:
        tally.log()
    return stats


if __name__ == "__main__":
    main()
