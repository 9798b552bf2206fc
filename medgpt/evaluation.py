"""Evaluating models on held-out data: multiple-choice exams, open questions, perplexity, reward-model
pairs and latency, for local model folders and OpenAI-compatible endpoints alike."""

import copy
import gc
import json
import logging
import os
import re
import time
from dataclasses import dataclass

import torch

from medgpt.errors import InputError
from medgpt.eval_data import ChoiceQuestion, OpenQuestion
from medgpt import metrics

logger = logging.getLogger(__name__)

# ----- what is evaluated ----------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """One model to evaluate: a local folder (optionally with a LoRA adapter), or a model of an endpoint."""

    label: str
    path: str | None = None
    adapter: str | None = None
    api_model: str | None = None
    template: str = "auto"  # how its prompts are rendered: "auto" (its own chat_template) or a template name

    def describe(self) -> str:
        if self.api_model:
            return f"endpoint model {self.api_model}"
        return self.path + (f" + {self.adapter}" if self.adapter else "")


def split_label(text: str) -> tuple[str | None, str]:
    """("base", "models/x") from "base=models/x"; (None, text) when the text has no label."""
    label, separator, value = text.partition("=")
    return (label.strip(), value.strip()) if separator and label.strip() and "/" not in label else (None, text.strip())


def parse_model_specs(models: list[str], api_models: list[str], template_name: str = "auto",
                      default_template: str | None = None) -> list[ModelSpec]:
    """`[LABEL=]FOLDER`, `[LABEL=]BASE+ADAPTER` and endpoint `[LABEL=]NAME` values, each folder checked to
    exist and to have a chat template before the first model spends minutes: `template_name` for every model,
    or with "auto" the model's own, or `default_template` for a model without one."""
    from medgpt.modeling import check_adapter_path, check_model_path, is_adapter_folder

    specs = []
    for text in models:
        label, value = split_label(text)
        path, adapter = value, None
        if "+" in value and not os.path.exists(value):
            path, adapter = (part.strip() for part in value.rsplit("+", 1))
        if os.path.isdir(path) and is_adapter_folder(path):
            raise InputError("this is a LoRA adapter folder: give it with its base model as --models "
                             "LABEL=BASE+ADAPTER", path)
        check_model_path(path, "--models")
        if adapter:
            check_adapter_path(adapter, "--models")
        spec = ModelSpec(label or os.path.basename(os.path.normpath(adapter or path)), path, adapter)
        spec.template = chat_template_for(spec, template_name, default_template)
        specs.append(spec)
    for text in api_models:
        label, value = split_label(text)
        if not value:
            raise InputError("--api_models has an empty model name")
        specs.append(ModelSpec(label or value, api_model=value))
    labels = [spec.label for spec in specs]
    for label in labels:
        if labels.count(label) > 1:
            raise InputError(f"two models are labelled '{label}': name them, e.g. --models base={label} ...")
    if not specs:
        raise InputError("nothing to evaluate: pass --models FOLDER ... and/or --api_base URL --api_models NAME")
    return specs


def chat_template_for(spec: ModelSpec, template_name: str, default_template: str | None) -> str:
    """The template the model's prompts are rendered with, checked now; a model without a chat template of
    its own (and no `default_template`) is an error naming its folder."""
    from medgpt.chat import ChatFormat
    from medgpt.modeling import open_tokenizer, tokenizer_folder

    folder = tokenizer_folder(spec.path, spec.adapter)
    try:
        tokenizer = open_tokenizer(folder)
        if template_name == "auto" and not tokenizer.chat_template and default_template:
            template_name = default_template
        ChatFormat.for_model(template_name, tokenizer)
        return template_name
    except InputError as error:
        raise InputError(f"model '{spec.label}': {error.message}", folder) from None
    except (OSError, ValueError) as error:
        raise InputError(f"model '{spec.label}': its tokenizer cannot be loaded ({str(error).splitlines()[0]})",
                         folder) from None


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def is_reward_model(spec: ModelSpec) -> bool:
    """A sequence-classification model with one score, as reward_modeling.py saves it: a full model folder,
    or a base + the LoRA adapter of a reward model (task type SEQ_CLS)."""
    if spec.adapter and _read_json(os.path.join(spec.adapter, "adapter_config.json")).get("task_type") == "SEQ_CLS":
        return True
    architectures = _read_json(os.path.join(spec.path, "config.json")).get("architectures") or []
    return any(name.endswith("ForSequenceClassification") for name in architectures)


# ----- prompts --------------------------------------------------------------------------------------------


def is_chinese(text: str) -> bool:
    return bool(metrics.CJK_RUN.search(text))


def choice_messages(question: ChoiceQuestion, ask_for_letters: bool) -> list[dict]:
    """The question as one user turn: context, question, lettered options; with `ask_for_letters`, an
    instruction to answer with the letter(s), in the question's language."""
    lines = [question.context, question.question] if question.context else [question.question]
    lines += [f"{letter}. {text}" for letter, text in question.options.items()]
    if ask_for_letters:
        several = len(question.answer) > 1
        if is_chinese(question.question):
            lines.append("本题有多个正确选项，请只回答所有正确选项的字母。" if several else "请只回答正确选项的字母。")
        else:
            lines.append("Several options are correct: answer with the letters of all correct options only." if several
                         else "Answer with the letter of the correct option only.")
    return [{"role": "user", "content": "\n".join(lines)}]


def answer_text_in_turn(chat_format, messages: list[dict], answer: str) -> tuple[str, str]:
    """(prompt, answer) texts as SFT splits them for `answer` after `messages`, without the end-of-turn
    marker: a candidate is scored on exactly the text that would have been trained as its answer."""
    segments = chat_format.split(messages + [{"role": "assistant", "content": answer}])
    prompt, segment = segments[-1]
    end = segment.find(answer)
    if end < 0:  # a template that rewrites the answer: score the plain text after the generation prompt
        return chat_format.render(messages, add_generation_prompt=True), answer
    return "".join(p + a for p, a in segments[:-1]) + prompt, segment[: end + len(answer)]


# ----- local model computations ---------------------------------------------------------------------------


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def model_context_length(model) -> int:
    return getattr(model.config, "max_position_embeddings", None) or 1_000_000


# Logits held at once when scoring text: rows x positions x vocabulary entries (about 1 GiB in fp32).
LOGIT_BUDGET = 2**28


@torch.no_grad()
def continuation_loglikelihoods(model, prompt_ids: list[int], continuations: list[list[int]], batch_size: int) -> list[float]:
    """log P(continuation | prompt) for each continuation. The prompt is run once; its key/value cache is
    copied for each batch of continuations, so only the options' own tokens are computed again."""
    device = _model_device(model)
    output = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True, logits_to_keep=1)
    first_token = torch.log_softmax(output.logits[0, -1].float(), dim=-1)
    prompt_cache, prompt_length = output.past_key_values, len(prompt_ids)
    scores = []
    for start in range(0, len(continuations), batch_size):
        chunk = continuations[start:start + batch_size]
        chunk_scores = [first_token[tokens[0]].item() for tokens in chunk]
        longest = max(len(tokens) for tokens in chunk)
        if longest > 1:
            # Each option's tokens but its last are the inputs; the mask covers the cached prompt too.
            inputs, option_mask = right_padded([tokens[:-1] for tokens in chunk], 0, device)
            prompt_mask = torch.ones((len(chunk), prompt_length), dtype=torch.long, device=device)
            mask = torch.cat([prompt_mask, option_mask], dim=1)
            cache = copy.deepcopy(prompt_cache)
            cache.batch_repeat_interleave(len(chunk))
            logits = model(input_ids=inputs, attention_mask=mask, past_key_values=cache, use_cache=True).logits
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            for row, tokens in enumerate(chunk):
                targets = torch.tensor(tokens[1:], dtype=torch.long, device=device)
                chunk_scores[row] += log_probs[row, torch.arange(len(tokens) - 1, device=device), targets].sum().item()
        scores += chunk_scores
    return scores


def score_choices_by_loglikelihood(chat_model, questions: list[ChoiceQuestion], batch_size: int) -> list[dict]:
    """Per question: the candidate with the highest log-likelihood (acc) and per character (acc_norm)."""
    from tqdm.auto import tqdm

    from medgpt.encoding import _tokenize

    results, context_length = [], model_context_length(chat_model.model)
    for question in tqdm(questions, desc="multiple choice (log-likelihood)", unit="question"):
        # A multiple-answer question is answered with letters, so its prompt asks for them.
        messages = chat_model.with_system(choice_messages(question, ask_for_letters=len(question.answer) > 1))
        candidates = metrics.answer_candidates(question.options, len(question.answer))
        prompt, continuations = None, []
        for _, text in candidates:
            candidate_prompt, answer = answer_text_in_turn(chat_model.chat_format, messages, text)
            prompt = prompt or candidate_prompt
            continuations.append(_tokenize(chat_model.tokenizer, answer))
        prompt_ids = _tokenize(chat_model.tokenizer, prompt)
        if len(prompt_ids) + max(map(len, continuations)) > context_length:
            raise InputError.at(f"the question with its options takes more than the model's {context_length} tokens",
                                question.source)
        loglikelihoods = continuation_loglikelihoods(chat_model.model, prompt_ids, continuations, batch_size)
        best, best_norm = metrics.pick_by_loglikelihood(loglikelihoods, [text for _, text in candidates])
        if len(question.answer) > 1:
            best_norm = best  # letter sets: their length says nothing about the answer, nothing to normalise
        letters = lambda index: "".join(sorted(candidates[index][0]))  # noqa: E731
        results.append({
            **_question_row(question),
            "predicted": letters(best), "predicted_norm": letters(best_norm),
            "acc": candidates[best][0] == question.answer, "acc_norm": candidates[best_norm][0] == question.answer,
            "loglikelihoods": {letters(i): round(value, 4) for i, value in enumerate(loglikelihoods)},
        })
    return results


def _question_row(question) -> dict:
    row = {"id": question.id, "source": question.source, "subject": question.subject}
    if isinstance(question, ChoiceQuestion):
        row["answer"] = "".join(sorted(question.answer))
    return row


def right_padded(sequences: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token lists padded on the right with `pad` to the longest."""
    longest = max(map(len, sequences))
    ids = torch.full((len(sequences), longest), pad, dtype=torch.long, device=device)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long, device=device)
    for index, tokens in enumerate(sequences):
        ids[index, : len(tokens)], mask[index, : len(tokens)] = torch.tensor(tokens, dtype=torch.long), 1
    return ids, mask


@torch.no_grad()
def negative_log_likelihood(model, rows: list[dict], batch_size: int, description: str) -> tuple[float, int]:
    """(summed NLL, predicted tokens) over rows of input_ids/labels, with the labels shifted as the trainers'
    causal-LM loss shifts them; labels of -100 are not predicted."""
    from tqdm.auto import tqdm

    from medgpt.encoding import IGNORE_INDEX

    device, total, count = _model_device(model), 0.0, 0
    vocabulary = model.get_output_embeddings().weight.shape[0]
    longest_row = max(len(row["input_ids"]) for row in rows)
    batch_size = max(1, min(batch_size, LOGIT_BUDGET // (longest_row * vocabulary)))  # a big vocabulary: fewer rows
    for start in tqdm(range(0, len(rows), batch_size), desc=description, unit="batch"):
        batch = rows[start:start + batch_size]
        inputs, mask = right_padded([row["input_ids"] for row in batch], 0, device)
        labels, _ = right_padded([row["labels"] for row in batch], IGNORE_INDEX, device)
        logits = model(input_ids=inputs, attention_mask=mask).logits[:, :-1]
        targets = labels[:, 1:]
        for index in range(len(batch)):  # one row at a time: no second full-size copy in fp32
            total += torch.nn.functional.cross_entropy(logits[index].float(), targets[index],
                                                       ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((targets != IGNORE_INDEX).sum())
    return total, count


@torch.no_grad()
def reward_scores(model, tokenizer, sequences: list[list[int]], batch_size: int) -> list[float]:
    """The reward model's score of each sequence, padded and pooled as reward_modeling.py trained it."""
    device, pad = _model_device(model), tokenizer.pad_token_id
    scores = []
    for start in range(0, len(sequences), batch_size):
        inputs, mask = right_padded(sequences[start:start + batch_size], pad, device)
        scores += model(input_ids=inputs, attention_mask=mask).logits[:, 0].float().tolist()
    return scores


# ----- generation: local models and endpoints -------------------------------------------------------------


class LocalGenerator:
    """Greedy answers from a ChatModel through its generation engine."""

    def __init__(self, chat_model, repetition_penalty: float, batch_size: int):
        self.chat_model, self.batch_size = chat_model, batch_size
        self.repetition_penalty = repetition_penalty

    def generate(self, conversations: list[list[dict]], max_new_tokens: int, one_at_a_time: bool = False):
        from medgpt.generation import GenerationArguments

        settings = GenerationArguments(max_new_tokens=max_new_tokens, temperature=0,
                                       repetition_penalty=self.repetition_penalty)
        if one_at_a_time:
            return [self.chat_model.generate_batch([messages], settings, 1)[0] for messages in conversations]
        return self.chat_model.generate_batch(conversations, settings, self.batch_size)


class EndpointError(Exception):
    pass


STREAM_CUT = "the answer's stream ended before it was complete"


class EndpointGenerator:
    """Answers from an OpenAI-compatible chat completions endpoint (greedy unless a temperature is given),
    streamed to time the first token."""

    def __init__(self, api_base: str, api_key: str | None, model: str, concurrency: int, timeout: float,
                 retries: int = 2, temperature: float = 0.0):
        import httpx

        self.url, self.model, self.concurrency, self.retries = api_base.rstrip("/"), model, concurrency, retries
        self.temperature = temperature
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout)

    def for_model(self, model: str) -> "EndpointGenerator":
        """The same endpoint (and connection pool), asked for another of its models."""
        other = copy.copy(self)
        other.model = model
        return other

    def served_models(self) -> list[str]:
        """The endpoint's model names; an unreachable endpoint or one that refuses the key is an InputError."""
        import httpx

        try:
            response = self.client.get(f"{self.url}/models")
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            raise InputError(f"cannot reach the endpoint: {type(error).__name__}: {error}", self.url) from None
        if response.status_code in (401, 403):
            raise InputError(f"the endpoint refused the API key (HTTP {response.status_code}): pass --api_key", self.url)
        if response.status_code != 200:
            return []  # some servers answer chat completions without listing models
        try:
            return [entry["id"] for entry in response.json().get("data", [])]
        except (ValueError, AttributeError, KeyError, TypeError):
            raise InputError("the endpoint's /models answer is not OpenAI's JSON: is --api_base the /v1 address?",
                             self.url) from None

    def _stream(self, messages: list[dict], max_new_tokens: int):
        from medgpt.generation import Generated

        body = {"model": self.model, "messages": messages, "max_tokens": max_new_tokens, "temperature": self.temperature,
                "stream": True, "stream_options": {"include_usage": True}}
        started, first, pieces, usage, streamed, done = time.perf_counter(), None, [], None, False, False
        with self.client.stream("POST", f"{self.url}/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                raise EndpointError(f"HTTP {response.status_code}: {response.text[:200]}")
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data, streamed = line[5:].strip(), True
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    chunk = None
                if not isinstance(chunk, dict):
                    raise EndpointError(f"the endpoint streamed something that is not a JSON object: {data[:80]!r}")
                if chunk.get("error"):  # a failure reported inside the stream
                    raise EndpointError(f"the endpoint reported an error: {str(chunk['error'])[:200]}")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        first = first or time.perf_counter()
                        pieces.append(piece)
            if not streamed:
                raise EndpointError("the endpoint did not stream its answer (no 'data:' lines)")
            if not done:  # the connection closed mid-answer: what came is a cut-off answer
                raise EndpointError(f"{STREAM_CUT} (no 'data: [DONE]')")
        finished = time.perf_counter()
        tokens = (usage or {}).get("completion_tokens") or len(pieces)
        return Generated("".join(pieces).strip(), tokens, (first or finished) - started, finished - started)

    def complete(self, messages: list[dict], max_new_tokens: int):
        """One answer, retried with backoff on connection errors and 5xx/429 answers."""
        import httpx

        for attempt in range(self.retries + 1):
            try:
                return self._stream(messages, max_new_tokens)
            except (httpx.HTTPError, httpx.InvalidURL, EndpointError) as error:
                retriable = (isinstance(error, httpx.TransportError) or re.match(r"HTTP (5\d\d|429)", str(error))
                             or str(error).startswith(STREAM_CUT))
                if not retriable or attempt == self.retries:
                    hint = ": pass --api_key or set $OPENAI_API_KEY" if re.match(r"HTTP 40[13]", str(error)) else ""
                    raise InputError(f"the endpoint failed on model {self.model}: {error}{hint}", self.url) from None
                # rate limits ("HTTP 429") need longer than a dropped connection
                time.sleep((5.0 if str(error).startswith("HTTP 429") else 0.5) * 2**attempt)

    def generate(self, conversations: list[list[dict]], max_new_tokens: int, one_at_a_time: bool = False):
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        pool = ThreadPoolExecutor(1 if one_at_a_time else self.concurrency)
        futures = [pool.submit(self.complete, messages, max_new_tokens) for messages in conversations]
        try:
            return [future.result() for future in tqdm(futures, desc="generating", unit="answer")]
        finally:  # after a failure, the requests not yet sent are dropped rather than waited for
            pool.shutdown(wait=False, cancel_futures=True)


# ----- the evaluations ------------------------------------------------------------------------------------


def score_choices_by_generation(generator, questions: list[ChoiceQuestion], max_new_tokens: int) -> list[dict]:
    """Per question: the letters read from a generated answer (None: none could be read, counted wrong)."""
    answers = generator.generate([choice_messages(question, ask_for_letters=True) for question in questions],
                                 max_new_tokens)
    results = []
    for question, answer in zip(questions, answers, strict=True):
        letters = metrics.extract_answer_letters(answer.text, list(question.options))
        results.append({
            **_question_row(question), "generated": answer.text,
            "extracted": "".join(sorted(letters)) if letters else None,
            "acc_generated": letters == question.answer,
        })
    return results


def answer_open_questions(generator, questions: list[OpenQuestion], max_new_tokens: int,
                          latency_questions: int) -> tuple[dict, list[dict]]:
    """Answers to the open questions scored against their references; the first `latency_questions` are
    answered one at a time, so their time to first token and decoding speed are an unloaded model's."""
    conversations = [[{"role": "user", "content": question.question}] for question in questions]
    alone = min(latency_questions, len(questions))
    if alone:
        generator.generate(conversations[:1], 1, one_at_a_time=True)  # warm-up: the timed answers start warm
    answers = generator.generate(conversations[:alone], max_new_tokens, one_at_a_time=True)
    answers += generator.generate(conversations[alone:], max_new_tokens) if alone < len(questions) else []
    texts = [answer.text for answer in answers]
    summary, per_answer = metrics.answer_overlap(texts, [question.reference for question in questions])
    if alone:
        summary["first_token_seconds"] = sum(a.first_token_seconds for a in answers[:alone]) / alone
        summary["tokens_per_second"] = sum(a.tokens_per_second for a in answers[:alone]) / alone
    rows = []
    for index, (question, answer, scores) in enumerate(zip(questions, answers, per_answer, strict=True)):
        row = {**_question_row(question), "answer": answer.text, "reference": question.reference,
               **{name: round(value, 3) for name, value in scores.items()}}
        if index < alone:
            row.update(first_token_seconds=round(answer.first_token_seconds, 4),
                       tokens_per_second=round(answer.tokens_per_second, 2))
        rows.append(row)
    return summary, rows


def summarise_choices(rows: list[dict]) -> dict:
    summary = {}
    for key in ("acc", "acc_norm", "acc_generated"):
        if result := metrics.choice_summary(rows, key):
            summary[key] = result
    generated = [row for row in rows if "generated" in row]
    if generated:
        summary["extraction_failure_rate"] = 100 * sum(row["extracted"] is None for row in generated) / len(generated)
    return summary


@dataclass
class EvalData:
    """Everything a run evaluates on, read and checked before any model loads."""

    choice_questions: list[ChoiceQuestion]
    open_questions: list[OpenQuestion]
    text_records: list[dict]
    conversation_records: list[dict]
    preference_records: list[dict]


def check_scorable(spec: ModelSpec, data: EvalData) -> None:
    """Each model gets what it can be scored on; say what it cannot use, and refuse a model left with nothing."""
    given = {"--mc_file": data.choice_questions, "--open_file": data.open_questions,
             "--ppl_text_file": data.text_records, "--ppl_conversation_file": data.conversation_records,
             "--preference_file": data.preference_records}
    if spec.api_model:
        kind, usable = "an endpoint model", ("--mc_file", "--open_file")
    elif is_reward_model(spec):
        kind, usable = "a reward model", ("--preference_file",)
    else:
        kind, usable = "a language model", ("--mc_file", "--open_file", "--ppl_text_file", "--ppl_conversation_file")
    unused = [flag for flag, rows in given.items() if rows and flag not in usable]
    if not any(given[flag] for flag in usable):
        raise InputError(f"model '{spec.label}' is {kind}: it is scored on {', '.join(usable)}, and none was given")
    if unused:
        logger.warning("model '%s' is %s: %s do not apply to it", spec.label, kind, ", ".join(unused))


def evaluate_local(spec: ModelSpec, data: EvalData, args) -> dict:
    """Every metric a local model folder supports; a reward model gets the pairwise ones only."""
    from medgpt.generation import ChatModel, InferenceModelArguments

    if is_reward_model(spec):
        return evaluate_reward_model(spec, data, args)
    model_args = InferenceModelArguments(base_model=spec.path, lora_model=spec.adapter, template_name=spec.template,
                                         torch_dtype=args.torch_dtype)
    chat_model = ChatModel(model_args)
    result = {"kind": "local", "model": spec.describe(), "template": chat_model.chat_format.name}
    per_question = {}
    try:
        if data.choice_questions:
            rows = []
            if args.mc_method in ("auto", "loglik", "both"):
                rows = score_choices_by_loglikelihood(chat_model, data.choice_questions, args.batch_size)
            if args.mc_method in ("generate", "both"):
                generator = LocalGenerator(chat_model, args.repetition_penalty, args.batch_size)
                generated = score_choices_by_generation(generator, data.choice_questions, args.mc_max_new_tokens)
                rows = [{**a, **b} for a, b in zip(rows, generated)] if rows else generated
            result["multiple_choice"] = summarise_choices(rows)
            per_question["multiple_choice"] = rows
        if data.open_questions:
            generator = LocalGenerator(chat_model, args.repetition_penalty, args.batch_size)
            result["open"], per_question["open"] = answer_open_questions(
                generator, data.open_questions, args.max_new_tokens, args.latency_questions)
        result["perplexity"] = perplexities(chat_model, data, args)
    finally:
        release(chat_model)
    result["per_question"] = per_question
    return result


def perplexities(chat_model, data: EvalData, args) -> dict:
    from medgpt.data import DataReport
    from medgpt.encoding import encode_conversations, encode_text_blocks

    found = {}
    if data.text_records:
        blocks = encode_text_blocks(data.text_records, chat_model.tokenizer, args.max_length,
                                    DataReport("perplexity text", read=len(data.text_records)))
        total, count = negative_log_likelihood(chat_model.model, blocks, args.batch_size, "perplexity (text)")
        found["text"] = {"perplexity": metrics.perplexity(total, count), "tokens": count}
    if data.conversation_records:
        report = DataReport("perplexity conversations", read=len(data.conversation_records))
        rows = encode_conversations(data.conversation_records, chat_model.chat_format, chat_model.tokenizer,
                                    args.max_length, train_on_inputs=False, report=report, skip_invalid=False)
        report.log()
        total, count = negative_log_likelihood(chat_model.model, rows, args.batch_size, "perplexity (answers)")
        found["answers"] = {"perplexity": metrics.perplexity(total, count), "tokens": count,
                            "truncated_conversations": report.truncated}
    return found


def evaluate_reward_model(spec: ModelSpec, data: EvalData, args) -> dict:
    from transformers import AutoModelForSequenceClassification

    from medgpt.chat import ChatFormat
    from medgpt.data import DataReport
    from medgpt.encoding import encode_preferences
    from medgpt.modeling import load_adapter, open_tokenizer, resolve_dtype, tokenizer_folder

    result = {"kind": "reward model", "model": spec.describe()}
    if not data.preference_records:
        logger.warning("%s is a reward model: it is only evaluated on --preference_file pairs, and none were given",
                       spec.label)
        return result
    tokenizer = open_tokenizer(tokenizer_folder(spec.path, spec.adapter))
    chat_format = ChatFormat.for_model(spec.template, tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(
        spec.path, num_labels=1, dtype=resolve_dtype(args.torch_dtype),
        **({"device_map": "auto"} if torch.cuda.is_available() else {}))
    if spec.adapter:
        model = load_adapter(model, spec.adapter, "--models")
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    rows = encode_preferences(data.preference_records, chat_format, tokenizer, args.max_length,
                              args.max_length // 2, DataReport("preference pairs"))
    chosen = reward_scores(model, tokenizer, [r["prompt_ids"] + r["chosen_ids"] for r in rows], args.batch_size)
    rejected = reward_scores(model, tokenizer, [r["prompt_ids"] + r["rejected_ids"] for r in rows], args.batch_size)
    result["reward"] = metrics.pairwise_accuracy(chosen, rejected)
    result["per_question"] = {"preference": [
        {"source": record["source"], "chosen_score": round(c, 4), "rejected_score": round(r, 4)}
        for record, c, r in zip(data.preference_records, chosen, rejected, strict=True)
    ]}
    del model
    gc.collect()
    return result


def evaluate_endpoint(spec: ModelSpec, endpoint: EndpointGenerator, data: EvalData, args) -> dict:
    """What an endpoint supports: generated multiple-choice answers, open questions and latency."""
    result, per_question = {"kind": "endpoint", "model": f"{spec.api_model} at {endpoint.url}"}, {}
    if data.choice_questions:
        rows = score_choices_by_generation(endpoint, data.choice_questions, args.mc_max_new_tokens)
        result["multiple_choice"], per_question["multiple_choice"] = summarise_choices(rows), rows
    if data.open_questions:
        result["open"], per_question["open"] = answer_open_questions(
            endpoint, data.open_questions, args.max_new_tokens, args.latency_questions)
    result["per_question"] = per_question
    return result


def release(chat_model) -> None:
    """Stop the model's engine and free its memory before the next model loads."""
    engine = getattr(chat_model, "_engine_instance", None)
    if engine is not None:
        engine.close()
    chat_model.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----- reporting ------------------------------------------------------------------------------------------


def _get(result: dict, *keys):
    for key in keys:
        if not isinstance(result, dict) or key not in result:
            return None
        result = result[key]
    return result


# (key, what it is, where it sits in a model's result); in this order in the table and the chart.
METRICS = [
    ("mc_acc", "Multiple choice: accuracy, log-likelihood (%)", ("multiple_choice", "acc", "accuracy")),
    ("mc_acc_norm", "Multiple choice: accuracy, length-normalised (%)", ("multiple_choice", "acc_norm", "accuracy")),
    ("mc_acc_generated", "Multiple choice: accuracy, generated letters (%)", ("multiple_choice", "acc_generated", "accuracy")),
    ("mc_extraction_failures", "Multiple choice: generated answers without a letter (%)",
     ("multiple_choice", "extraction_failure_rate")),
    ("open_bleu4", "Open questions: BLEU-4", ("open", "bleu4")),
    ("open_rouge1", "Open questions: ROUGE-1 F1", ("open", "rouge1")),
    ("open_rouge2", "Open questions: ROUGE-2 F1", ("open", "rouge2")),
    ("open_rougeL", "Open questions: ROUGE-L F1", ("open", "rougeL")),
    ("open_token_f1", "Open questions: token F1", ("open", "token_f1")),
    ("open_answer_words", "Open questions: mean answer length (words)", ("open", "answer_tokens")),
    ("ppl_text", "Perplexity: held-out text", ("perplexity", "text", "perplexity")),
    ("ppl_answers", "Perplexity: answers of held-out conversations", ("perplexity", "answers", "perplexity")),
    ("rm_accuracy", "Reward model: pairwise accuracy (%)", ("reward", "accuracy")),
    ("rm_margin", "Reward model: mean margin", ("reward", "mean_margin")),
    ("first_token_seconds", "Latency: time to first token (s)", ("open", "first_token_seconds")),
    ("tokens_per_second", "Latency: decoding speed (tokens/s)", ("open", "tokens_per_second")),
]


def summaries(results: dict[str, dict]) -> dict[str, dict]:
    """Each model's scores without its per-question rows."""
    return {label: {k: v for k, v in result.items() if k != "per_question"} for label, result in results.items()}


def metric_table(results: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """{metric key: {model label: value or None}} for every metric at least one model has."""
    table = {}
    for key, _, path in METRICS:
        values = {label: _get(result, *path) for label, result in results.items()}
        if any(value is not None for value in values.values()):
            table[key] = values
    return table


def _cell(value) -> str:
    return "–" if value is None else f"{value:.2f}" if abs(value) < 100 else f"{value:.1f}"


def markdown_report(results: dict[str, dict], notes: list[str]) -> str:
    """Models as columns, one metric a row; then multiple-choice accuracy per subject; then the notes."""
    labels, names = list(results), {key: name for key, name, _ in METRICS}
    lines = ["| metric | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for key, values in metric_table(results).items():
        lines.append(f"| {names[key]} | " + " | ".join(_cell(values[label]) for label in labels) + " |")
    subjects = sorted({subject for result in results.values()
                       for summary in (_get(result, "multiple_choice") or {}).values() if isinstance(summary, dict)
                       for subject in summary.get("by_subject", {})})
    if subjects:
        lines += ["", "Multiple-choice accuracy per subject (%; log-likelihood where the model has it, else generated "
                  "letters):", "", "| subject | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for subject in subjects:
            cells = []
            for label in labels:
                choice = _get(results[label], "multiple_choice") or {}
                summary = choice.get("acc") or choice.get("acc_generated") or {}
                cells.append(_cell(summary.get("by_subject", {}).get(subject)))
            lines.append(f"| {subject} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + [f"- {note}" for note in notes]) + "\n"


CHART_COLUMNS, CHART_PANEL_INCHES, CHART_DPI = 3, (4.0, 3.0), 100


def chart_size(metric_count: int) -> tuple[int, int]:
    """The chart's size in pixels: panels of 400 x 300, three to a row."""
    rows = -(-metric_count // CHART_COLUMNS)
    return (int(CHART_COLUMNS * CHART_PANEL_INCHES[0] * CHART_DPI), int(rows * CHART_PANEL_INCHES[1] * CHART_DPI))


def save_chart(results: dict[str, dict], path: str) -> None:
    """One bar panel per metric, one bar per model (models without the metric leave a gap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medgpt.outputs import atomic_write

    table, names, labels = metric_table(results), {key: name for key, name, _ in METRICS}, list(results)
    if not table:
        return
    width, height = chart_size(len(table))
    rows = height // int(CHART_PANEL_INCHES[1] * CHART_DPI)
    figure, axes = plt.subplots(rows, CHART_COLUMNS, figsize=(width / CHART_DPI, height / CHART_DPI), dpi=CHART_DPI,
                                squeeze=False)
    colours = plt.get_cmap("tab10").colors
    for panel, (key, values) in zip(axes.flat, table.items()):
        heights = [values[label] if values[label] is not None else 0.0 for label in labels]
        bars = panel.bar(range(len(labels)), heights, color=[colours[i % 10] for i in range(len(labels))])
        for bar, label in zip(bars, labels):
            if values[label] is not None:
                panel.annotate(_cell(values[label]), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                               ha="center", va="bottom", fontsize=8)
        panel.set_xticks(range(len(labels)), labels, fontsize=8, rotation=15)
        panel.set_title(names[key], fontsize=9)
        top, bottom = max(heights), min(0.0, min(heights))
        panel.set_ylim(bottom * 1.18, 105 if names[key].endswith("(%)") else (top * 1.18 if top > 0 else 1))
    for panel in list(axes.flat)[len(table):]:
        panel.axis("off")
    figure.tight_layout()
    with atomic_write(path, "wb") as stream:
        figure.savefig(stream, format="png", dpi=CHART_DPI)
    plt.close(figure)
