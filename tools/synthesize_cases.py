"""Patient cases for SFT, synthesised from a knowledge graph of diseases, optionally rephrased by a model.

    python tools/synthesize_cases.py --knowledge_graph data/knowledge_graph/rare_diseases.json \
        --output_file outputs/data/cases.jsonl --cases_per_disease 10 --seed 42
    python tools/synthesize_cases.py ... --rephrase True --model_name_or_path outputs/sft-merged   # or --api_base

Each case samples a patient (age in the disease's onset range, sex by its share of women), three of its
symptoms, one or two signs, every key test and one or two others, and is answered by an assessment built
from the graph: the diagnosis with the key results, the differential, the first treatments and who should
confirm it. The same seed gives the same cases. With --rephrase True a model rewrites each presentation;
a rewrite that loses a number or much of the text is not used (the case keeps its own wording, counted).
The knowledge graph's format is described in data/README.md.
"""

import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the medgpt package beside tools/

from medgpt.arguments import parse_args, require, setup_logging  # noqa: E402
from medgpt.cases import REPHRASE_PROMPTS, case_record, keeps_findings, load_knowledge_graph, synthesize_cases  # noqa: E402
from medgpt.errors import InputError, exit_on_input_error  # noqa: E402
from medgpt.dataset_tools import check_jsonl_output  # noqa: E402
from medgpt.outputs import write_jsonl  # noqa: E402
from medgpt.text_generation import WriterModel, WriterModelArguments  # noqa: E402

logger = logging.getLogger("synthesize_cases")


# A disease's few symptoms, signs and tests allow some hundreds of distinct cases; far more only repeats them.
MAX_CASES_PER_DISEASE = 1000


@dataclass
class CaseArguments:
    knowledge_graph: str = field(default="data/knowledge_graph/rare_diseases.json", metadata={
        "help": "The diseases: a JSON file as described in data/README.md."})
    output_file: str | None = field(default=None, metadata={"help": "Where the cases go (JSONL)."})
    cases_per_disease: int = field(default=10, metadata={"help": "Cases of each disease in each language."})
    language: str = field(default="both", metadata={"help": "Language of the cases.", "choices": ["both", "en", "zh"]})
    seed: int = field(default=42, metadata={"help": "The same seed gives the same cases."})
    format: str = field(default="sharegpt", metadata={"help": "Output format.", "choices": ["sharegpt", "openai", "alpaca"]})
    rephrase: bool = field(default=False, metadata={
        "help": "Have a model (--model_name_or_path or --api_base) reword each presentation."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output_file."})

    def __post_init__(self):
        if not self.output_file:
            raise InputError("--output_file is required")
        require(1 <= self.cases_per_disease <= MAX_CASES_PER_DISEASE, "cases_per_disease",
                f"must be from 1 to {MAX_CASES_PER_DISEASE}", self.cases_per_disease)


def rephrase_cases(cases, writer: WriterModel, round_size: int) -> Counter:
    """Reword each presentation with the model, keeping a case's own wording where a rewrite loses findings."""
    from tqdm.auto import tqdm

    outcome = Counter()
    for start in tqdm(range(0, len(cases), round_size), desc="rephrasing", unit="round"):
        batch = cases[start:start + round_size]
        prompts = [[{"role": "user", "content": REPHRASE_PROMPTS[case.language].format(presentation=case.presentation)}]
                   for case in batch]
        for case, rewrite in zip(batch, writer.write(prompts), strict=True):
            if keeps_findings(case.presentation, rewrite):
                case.presentation = rewrite.strip()
                outcome["rephrased"] += 1
            else:
                outcome["rewrite lost a finding or most of the text: kept the case's own wording"] += 1
    return outcome


@exit_on_input_error
def main(argv=None):
    args, model_args = parse_args((CaseArguments, WriterModelArguments), argv)
    setup_logging()
    if args.rephrase and not model_args.configured:
        raise InputError("--rephrase True needs a model: --model_name_or_path or --api_base and --model")
    check_jsonl_output(args.output_file, args.overwrite, [args.knowledge_graph])
    diseases = load_knowledge_graph(args.knowledge_graph)
    languages = ["en", "zh"] if args.language == "both" else [args.language]
    cases = synthesize_cases(diseases, args.cases_per_disease, languages, args.seed)
    logger.info("%d diseases, %d cases (%d per disease and language, seed %d)", len(diseases), len(cases),
                args.cases_per_disease, args.seed)
    if args.rephrase:
        writer = WriterModel(model_args)
        try:
            outcome = rephrase_cases(cases, writer, model_args.batch_size)
        finally:
            writer.close()
        for what, count in outcome.most_common():
            logger.info("%d x %s", count, what)
    write_jsonl(args.output_file, [case_record(case, args.format) for case in cases])
    logger.info("wrote %s", os.path.abspath(args.output_file))


if __name__ == "__main__":
    main()
