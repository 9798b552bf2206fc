"""Convert conversation data between ShareGPT, OpenAI messages and Alpaca; each record's own format is
detected, so one folder may mix them.

    python tools/convert_data.py --input data/finetune --output_file outputs/sft_openai.jsonl --to openai
    python tools/convert_data.py --input my_alpaca.json --output_file my_sharegpt.jsonl --to sharegpt
    python tools/convert_data.py --input glaive.jsonl --output_file glaive_alpaca.jsonl --to alpaca --strict True

Every converted record trains exactly as the original does (the converted record is read back and compared):
the system prompt (ShareGPT system turn or `system_prompt`/`system` key, OpenAI system message, Alpaca
`system`), every turn (Alpaca `history`), tool definitions and calls (ShareGPT function_call/observation
turns + `tools`, OpenAI assistant `tool_calls` + tool messages + `tools`). Other keys (ids, source, ...)
are carried over unchanged. A record the target cannot hold (tool calls in Alpaca) is left out, counted and
logged with its path:line, or with --strict True is an error.
"""

import logging
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the medgpt package beside tools/

from medgpt.arguments import parse_args, setup_logging  # noqa: E402
from medgpt.dataset_tools import (  # noqa: E402
    RecordFilesArguments, FORMATS, Tally, check_jsonl_output, convert_records, input_files, read_records, require_records,
)
from medgpt.errors import exit_on_input_error  # noqa: E402
from medgpt.outputs import write_jsonl  # noqa: E402

logger = logging.getLogger(__name__)


@dataclass
class ConvertArguments(RecordFilesArguments):
    output_file: str | None = field(default=None, metadata={"help": "The converted records (.jsonl)."})
    to: str = field(default="sharegpt", metadata={"help": "Target format.", "choices": list(FORMATS)})
    strict: bool = field(default=False, metadata={
        "help": "A record the target format cannot hold is an error instead of a counted, logged omission."})


@exit_on_input_error
def main(argv=None):
    (args,) = parse_args((ConvertArguments,), argv)
    setup_logging()
    files = input_files(args.input)
    check_jsonl_output(args.output_file, args.overwrite, files, inputs=args.input)

    tally = Tally(f"convert to {args.to}")
    records = read_records(files, tally, args.skip_invalid)
    converted = convert_records(records, args.to, tally, args.skip_invalid, args.strict)
    require_records(converted, tally, args.input[0])
    write_jsonl(args.output_file, [record.data for record in converted])
    tally.log()
    logger.info("wrote %d records to %s", len(converted), args.output_file)
    return tally


if __name__ == "__main__":
    main()
