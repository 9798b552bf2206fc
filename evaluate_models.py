"""Did training help? Evaluate several models in one run on held-out data and compare them.

    python evaluate_models.py --models base=models/SmolLM2-135M-Instruct final=outputs/pipeline/dpo-merged \
        --mc_file data/eval/multiple_choice.jsonl --open_file data/eval/open_questions.jsonl \
        --output_dir outputs/eval
    python evaluate_models.py --models sft=models/base+outputs/sft ...          # a base model + LoRA adapter
    python evaluate_models.py --models mine=outputs/merged \
        --api_base http://127.0.0.1:8000/v1 --api_models reference=gpt-4o-mini --mc_file ...   # and an endpoint

Metrics: multiple-choice accuracy (each option's log-likelihood after the question, raw and per character;
endpoints: the letters of a generated answer), open-question BLEU-4 / ROUGE / token F1 against references,
perplexity of held-out text and of the answers of held-out conversations, reward-model pairwise accuracy,
and time to first token / decoding speed. Writes results.json (every score and every question's result),
results.md (models as columns) and comparison.png to --output_dir.
"""

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from medgpt.arguments import at_least, parse_args, require, setup_logging
from medgpt.errors import InputError, exit_on_input_error

logger = logging.getLogger(__name__)


@dataclass
class EvaluationArguments:
    models: list[str] = field(default_factory=list, metadata={
        "help": "Local models: [LABEL=]FOLDER, or [LABEL=]BASE+ADAPTER for a LoRA adapter on its base."})
    api_base: str | None = field(default=None, metadata={
        "help": "An OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (openai_api.py, vLLM, a hosted API)."})
    api_key: str | None = field(default=None, metadata={"help": "The endpoint's key; default: $OPENAI_API_KEY."})
    api_models: list[str] = field(default_factory=list, metadata={"help": "Endpoint models: [LABEL=]NAME ..."})
    mc_file: str | None = field(default=None, metadata={"help": "Multiple-choice questions (file or folder)."})
    mc_format: str = field(default="auto", metadata={
        "help": "Format of --mc_file.", "choices": ["auto", "native", "medqa", "medmcqa", "pubmedqa", "cmexam",
                                                    "ceval", "cmmlu"]})
    mc_method: str = field(default="auto", metadata={
        "help": "loglik: score each option's log-likelihood; generate: read the letters of a generated answer; "
                "both; auto: loglik for local models (endpoints always generate).",
        "choices": ["auto", "loglik", "generate", "both"]})
    open_file: str | None = field(default=None, metadata={"help": "Open questions with reference answers."})
    ppl_text_file: str | None = field(default=None, metadata={"help": "Held-out text for perplexity (pretraining style)."})
    ppl_conversation_file: str | None = field(default=None, metadata={
        "help": "Held-out conversations: perplexity of their answers, masked as SFT masks them."})
    preference_file: str | None = field(default=None, metadata={
        "help": "Held-out preference pairs: pairwise accuracy of reward models."})
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where results.json, results.md and comparison.png go."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace results already in --output_dir."})
    template_name: str = field(default="auto", metadata={
        "help": "auto: each model's saved chat_template; or a name from template.py for every local model."})
    default_template: str | None = field(default=None, metadata={
        "help": "With --template_name auto: the template for models that have no chat_template of their own "
                "(a base model next to the fine-tuned one)."})
    torch_dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16."})
    max_length: int = field(default=1024, metadata={"help": "Token limit of perplexity blocks and conversations."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest answer to an open question."})
    mc_max_new_tokens: int = field(default=32, metadata={"help": "Longest generated multiple-choice answer."})
    repetition_penalty: float = field(default=1.0, metadata={
        "help": "For local models' generated answers (greedy decoding); endpoints are not sent it."})
    batch_size: int = field(default=8, metadata={"help": "Rows scored or answers generated together."})
    latency_questions: int = field(default=3, metadata={
        "help": "The first N open questions are answered one at a time to time the first token and decoding speed."})
    api_concurrency: int = field(default=4, metadata={"help": "Requests sent to the endpoint at once."})
    api_timeout: float = field(default=120.0, metadata={"help": "Seconds before an endpoint request fails."})
    max_questions: int | None = field(default=None, metadata={
        "help": "Use only N records of each of --mc_file, --open_file, ... (a folder counts as one), spread "
                "evenly over it, for quick runs."})

    def __post_init__(self):
        for name, minimum in (("max_length", 2), ("max_new_tokens", 1), ("mc_max_new_tokens", 1), ("batch_size", 1),
                              ("latency_questions", 0), ("api_concurrency", 1), ("max_questions", 1)):
            at_least(self, name, minimum)
        require(self.api_timeout > 0, "api_timeout", "must be positive", self.api_timeout)
        require(self.repetition_penalty > 0, "repetition_penalty", "must be positive", self.repetition_penalty)


def spread_sample(rows: list, count: int | None) -> list:
    """`count` rows spread evenly over the file (every k-th), so a quick run still sees each part of it
    (a file of English then Chinese questions keeps both), the same rows every time."""
    if not count or len(rows) <= count:
        return rows
    return [rows[index * len(rows) // count] for index in range(count)]


def load_data(args: EvaluationArguments):
    """Every question file, read and checked before a model loads."""
    from medgpt.data import DataReport, load_records, record_to_preference
    from medgpt.eval_data import load_choice_questions, load_open_questions
    from medgpt.evaluation import EvalData

    cap = lambda rows: spread_sample(rows, args.max_questions)  # noqa: E731
    records = lambda path, kind, **extra: cap(load_records(path, kind, DataReport(kind), False, **extra)) if path else []  # noqa: E731
    data = EvalData(
        choice_questions=cap(load_choice_questions(args.mc_file, args.mc_format)) if args.mc_file else [],
        open_questions=cap(load_open_questions(args.open_file)) if args.open_file else [],
        text_records=records(args.ppl_text_file, "text"),
        conversation_records=records(args.ppl_conversation_file, "conversation"),
        preference_records=records(args.preference_file, "preference", converter=record_to_preference),
    )
    if not any(asdict(data).values()):
        raise InputError("nothing to evaluate on: pass --mc_file, --open_file, --ppl_text_file, "
                         "--ppl_conversation_file and/or --preference_file")
    logger.info("evaluating on %d multiple-choice questions, %d open questions, %d texts, %d conversations, "
                "%d preference pairs", len(data.choice_questions), len(data.open_questions), len(data.text_records),
                len(data.conversation_records), len(data.preference_records))
    return data


def check_output_dir(args: EvaluationArguments) -> list[str]:
    from medgpt.outputs import check_apart_from_inputs, check_output_dir as check_folder

    check_folder(args.output_dir)
    check_apart_from_inputs(args.output_dir, [(f"--{name}", getattr(args, name)) for name in (
        "mc_file", "open_file", "ppl_text_file", "ppl_conversation_file", "preference_file")])
    paths = [os.path.join(args.output_dir, name) for name in ("results.json", "results.md", "comparison.png")]
    existing = [path for path in paths if os.path.exists(path)]
    if existing and not args.overwrite_output_dir:
        raise InputError("already holds evaluation results: pass --overwrite_output_dir True or choose another "
                         "--output_dir", existing[0])
    return paths


def endpoint_for(args: EvaluationArguments):
    """The endpoint client, checked to answer (and to serve the named models) before any work starts."""
    from medgpt.evaluation import EndpointGenerator

    if args.api_models and not args.api_base:
        raise InputError("--api_models needs --api_base (the endpoint's address, e.g. http://127.0.0.1:8000/v1)")
    if not args.api_base:
        return None
    endpoint = EndpointGenerator(args.api_base, args.api_key or os.environ.get("OPENAI_API_KEY"), "",
                                 args.api_concurrency, args.api_timeout)
    if args.repetition_penalty != 1.0:
        logger.warning("--repetition_penalty applies to local models only: OpenAI's API has no such setting")
    served = endpoint.served_models()
    if not args.api_models:
        if len(served) != 1:
            raise InputError(f"name the endpoint's model with --api_models (it serves: {', '.join(served) or 'unknown'})",
                             args.api_base)
        args.api_models = served
    from medgpt.evaluation import split_label

    for text in args.api_models:
        name = split_label(text)[1]
        if served and name not in served:
            raise InputError(f"the endpoint does not serve '{name}' (it serves: {', '.join(served)})", args.api_base)
    return endpoint


def write_results(paths: list[str], results: dict, settings: dict, notes: list[str]) -> None:
    from medgpt.evaluation import markdown_report, save_chart, summaries
    from medgpt.outputs import atomic_write_text

    json_path, markdown_path, chart_path = paths
    document = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": settings, "notes": notes, "models": results}
    atomic_write_text(json_path, json.dumps(document, ensure_ascii=False, indent=1) + "\n")
    scores = summaries(results)
    atomic_write_text(markdown_path, markdown_report(scores, notes))
    save_chart(scores, chart_path)


@exit_on_input_error
def main(argv=None):
    (args,) = parse_args((EvaluationArguments,), argv)
    setup_logging()
    from medgpt import metrics
    from medgpt.evaluation import (check_scorable, evaluate_endpoint, evaluate_local, markdown_report,
                                   parse_model_specs, summaries)

    paths = check_output_dir(args)
    endpoint = endpoint_for(args)
    specs = parse_model_specs(args.models, args.api_models, args.template_name, args.default_template)
    data = load_data(args)
    for spec in specs:
        check_scorable(spec, data)
    notes = [f"Overlap metrics tokenization: {metrics.tokenization_note()}.",
             "Multiple choice: a multiple-answer question counts as right only when the set of letters is exactly right."]
    settings = {key: value for key, value in asdict(args).items() if key != "api_key"}
    results = {}
    for spec in specs:
        logger.info("== %s: %s", spec.label, spec.describe())
        if spec.api_model:
            results[spec.label] = evaluate_endpoint(spec, endpoint.for_model(spec.api_model), data, args)
        else:
            results[spec.label] = evaluate_local(spec, data, args)
        write_results(paths, results, settings, notes)  # what is done so far survives a later failure
    print(markdown_report(summaries(results), notes))
    logger.info("results: %s, table: %s, chart: %s", *(os.path.abspath(path) for path in paths))


if __name__ == "__main__":
    sys.exit(main())
