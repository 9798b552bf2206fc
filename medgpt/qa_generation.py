"""Question-answer pairs written by a model from source texts (abstracts, notes), kept only where the
answer is supported by its source; the output is resumable and every pair names its source."""

import json
import logging
import os
import re
import string
from collections import Counter
from dataclasses import dataclass

from medgpt.data import RecordError, file_records, find_data_files, record_to_text
from medgpt.dataset_tools import question_answer_record
from medgpt.errors import InputError
from medgpt.metrics import CJK_RUN, letter_counts
from medgpt.outputs import atomic_write_text, check_output_file, jsonl_text

logger = logging.getLogger(__name__)


@dataclass
class Source:
    id: str  # the record's pmid or id, else "path:line"
    text: str


def text_language(text: str) -> str:
    """The language to ask a source's questions in: Chinese where its (weighted) Chinese characters
    outnumber its Latin letters, else English."""
    cjk, latin, _ = letter_counts(text)
    return "zh" if cjk > latin else "en"


def read_sources(paths: list[str], min_words: int, report) -> list[Source]:
    """Source texts from text files (a line each) or JSONL/JSON records with a "text" (the literature
    tool's corpus: "pmid"). Records without text are an error naming their line; texts of fewer
    than `min_words` content words (Chinese: character pairs), and a text or id seen before, are counted
    and left out."""
    sources, seen_texts, seen_ids = [], set(), set()
    for path in paths:
        for file_path in find_data_files(path):
            for line, record in file_records(file_path):
                where = f"{file_path}:{line}"
                report.read += 1
                try:
                    if isinstance(record, RecordError):
                        raise record
                    text = record_to_text(record).strip()
                except RecordError as error:
                    raise InputError(str(error), file_path, line) from None
                if len(content_units(text)) < min_words:
                    report.drop(f"source under {min_words} content words", where)
                    continue
                if text in seen_texts:
                    report.drop("source text seen before", where)
                    continue
                seen_texts.add(text)
                source_id = str(record.get("pmid") or record.get("id") or where)
                if source_id in seen_ids:
                    report.drop("source id seen before", where)
                    continue
                seen_ids.add(source_id)
                sources.append(Source(source_id, text))
    return sources


# The source comes first and the request after it: small models (the 135M default) then answer from the
# source; asked first, they wrote general knowledge. Larger models do well with either order.
PROMPTS = {
    "en": ("Text: {text}\n\n"
           "Write {pairs} questions about facts in this text, each followed by its answer from the text. "
           "Name the disease, drug or test in each question. Use this format:\n"
           "Q: question\nA: answer"),
    "zh": ("文字：{text}\n\n"
           "根据这段文字写出{pairs}个问题，每个问题后面给出文中的答案。问题中写明疾病、药物或检查的名称。格式如下：\n"
           "问：问题\n答：答案"),
}


def qa_prompt(source: Source, language: str, pairs: int) -> list[dict]:
    """The conversation that asks for `pairs` question-answer pairs about one source, in `language`."""
    return [{"role": "user", "content": PROMPTS[language].format(text=source.text, pairs=pairs)}]


# A label opens a question or an answer at the start of a line or after a sentence's end ("...? Answer:"),
# so that "vitamin A: ..." inside a sentence is not taken for one.
LABEL = re.compile(r"(?:^|(?<=[.?!。？！]))[ \t]*(?:\d+[.)、][ \t]*)?(?:\*\*)?"
                   r"(?P<label>Q|Question|问题|问|A|Answer|答案|答)[ \t]*\d*[ \t]*(?:\*\*)?[ \t]*[:：][ \t]*(?:\*\*)?",
                   re.I | re.M)
QUESTION_LABELS = {"q", "question", "问题", "问"}
REPEATED_LABEL = re.compile(r"^(?:question|answer|问题|答案)\s*[:：]\s*", re.I)


def _json_pairs(text: str) -> list[tuple[str, str]] | None:
    """Pairs from a JSON list of {"question", "answer"} objects, anywhere in the text (fenced or not)."""
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start:
        return None
    try:
        items = json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None
    if not isinstance(items, list):
        return None
    pairs = []
    for item in items:
        if isinstance(item, dict):
            question = item.get("question") or item.get("q") or item.get("问题")
            answer = item.get("answer") or item.get("a") or item.get("答案")
            if isinstance(question, str) and isinstance(answer, str):
                pairs.append((question, answer))
    return pairs


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """The question-answer pairs in a model's reply: "Q: ... A: ..." (or 问：/答：) on lines of their own or
    run together, or a JSON list of {"question", "answer"}. An answer ends at a blank line or the next
    label; a question without an answer is left out."""
    found = _json_pairs(text)
    if found:
        return [(question.strip(), answer.strip()) for question, answer in found]
    labels = list(LABEL.finditer(text))
    pairs, question = [], None
    for index, match in enumerate(labels):
        end = labels[index + 1].start() if index + 1 < len(labels) else len(text)
        body = text[match.end():end].split("\n\n")[0].strip().strip("*").strip()
        body = REPEATED_LABEL.sub("", body)  # "Q: question: What ..." copies the format's placeholder
        if match.group("label").lower() in QUESTION_LABELS:
            question = body
        elif question is not None:
            pairs.append((" ".join(question.split()), body))
            question = None
    return pairs


ENGLISH_STOPWORDS = frozenset(
    "a an the and or of in on at to for from by with without as is are was were be been being it its this that "
    "these those which who whom what when where why how than then there their they them he she his her we our you "
    "your i can could may might should would will do does did not no nor so such also into over under about after "
    "before between during per via".split())
PUNCTUATION = set(string.punctuation) | set("，。、；：？！“”‘’（）《》【】…—·")


def content_units(text: str) -> list[str]:
    """What a text says, in units comparable across languages: English words (not stopwords) and numbers,
    lower-cased, words cut to their first 5 letters so that "cause" meets "caused" and "variant" meets
    "variants"; Chinese character pairs (single characters say too little)."""
    units = []
    for run in CJK_RUN.findall(text):
        units += [run[i:i + 2] for i in range(len(run) - 1)] if len(run) > 1 else [run]
    for word in re.findall(r"[a-z0-9](?:[a-z0-9\-'.]*[a-z0-9])?", CJK_RUN.sub(" ", text).lower()):
        if word not in ENGLISH_STOPWORDS:
            units.append(word[:5] if word.isalpha() else word)
    return units


def support(answer: str, source_text: str) -> float:
    """The share of an answer's content units that occur in its source: a simple test that the answer
    restates the source rather than something else the model knows or invented."""
    units = content_units(answer)
    if not units:
        return 0.0
    source_units = set(content_units(source_text))
    return sum(unit in source_units for unit in units) / len(units)


REFERS_TO_SOURCE = re.compile(r"\b(the|this) (text|passage|study|article|abstract|paper|authors?)\b|本文|文中|该研究|本研究|上文",
                              re.I)


def normalized_question(question: str) -> str:
    return "".join(character for character in question.casefold() if character not in PUNCTUATION and not character.isspace())


@dataclass
class PairChecks:
    min_question_units: int = 3
    min_answer_units: int = 2
    min_support: float = 0.6

    def reason_to_drop(self, question: str, answer: str, source: Source, seen_questions: set[str]) -> str | None:
        """Why a pair is left out, or None to keep it."""
        if not question or not answer:
            return "empty question or answer"
        if REFERS_TO_SOURCE.search(question):
            return "question refers to the source text"
        if len(content_units(question)) < self.min_question_units:
            return f"question under {self.min_question_units} content words"
        if len(content_units(answer)) < self.min_answer_units:
            return f"answer under {self.min_answer_units} content words"
        if normalized_question(question) == normalized_question(answer):
            return "answer repeats the question"
        if support(answer, source.text) < self.min_support:
            return f"answer not supported by the source (under {self.min_support:.0%} of its words)"
        if normalized_question(question) in seen_questions:
            return "duplicate question"
        return None


def record_question(record: dict) -> str:
    if "instruction" in record:
        return record["instruction"]
    turns = record.get("conversations") or record["messages"]
    return turns[0].get("value", turns[0].get("content"))


class ResumableOutput:
    """A JSONL output written a round at a time, with a state file beside it (`<output>.state`, a name
    the training scripts do not read as data): the settings, then one line per finished source with its
    counts. Pairs are appended before their source is marked finished, so after an interruption the pairs
    of unfinished sources are removed and those sources done again: every pair is kept once."""

    def __init__(self, path: str, settings: dict, overwrite: bool):
        """Check where the output goes and whether it resumes (before any work); nothing is written yet."""
        check_output_file(path)
        self.path, self.state_path, self.settings = path, path + ".state", settings
        if os.path.isdir(self.state_path):
            raise InputError("a folder has the state file's name: move it, or write elsewhere", self.state_path)
        self.finished: dict[str, dict] = {}
        self.records: list[dict] = []
        self.resuming = not overwrite and (os.path.exists(path) or os.path.exists(self.state_path))
        if self.resuming:
            self._check_resumable()

    def open(self, source_ids: set[str]) -> None:
        """Start the output afresh, or take up the run recorded in the state file, keeping only what came
        from `source_ids` (a source no longer in the input takes its pairs with it)."""
        if self.resuming:
            self._resume(source_ids)
        else:
            # The fresh state first: stopped between the two writes, the next run finds no finished
            # source and removes whatever the old output held, rather than trusting an old state.
            atomic_write_text(self.state_path, self._state_text())
            atomic_write_text(self.path, "")

    def _state_text(self) -> str:
        return jsonl_text([{"settings": self.settings}, *self.finished.values()])

    def _lines(self, path: str) -> list[str]:
        # A line cut inside a multi-byte character must not stop the resume: it fails to parse like
        # any half-written line and is dropped.
        with open(path, encoding="utf-8", errors="replace") as stream:
            return stream.read().split("\n")

    def _check_resumable(self) -> None:
        if not os.path.exists(self.state_path):
            raise InputError("--output_file already holds results that are not a resumable run of this tool: "
                             "pass --overwrite True to replace them, or write elsewhere", self.path)
        if not os.path.exists(self.path):
            raise InputError("the run recorded beside --output_file lost its output: pass --overwrite True to "
                             "start again", self.path)
        try:
            recorded = json.loads(self._lines(self.state_path)[0])["settings"]
        except (ValueError, KeyError, TypeError):
            raise InputError("unreadable state file: pass --overwrite True to start again", self.state_path, 1) from None
        changed = sorted(key for key in set(recorded) | set(self.settings) if recorded.get(key) != self.settings.get(key))
        if changed:
            raise InputError(f"--output_file was started with other settings ({', '.join(changed)}): pass "
                             "--overwrite True to start again, or write elsewhere", self.path)

    @staticmethod
    def _objects(lines: list[str]):
        for line in lines:
            try:
                value = json.loads(line)
            except ValueError:
                continue  # the line being written when the run stopped
            if isinstance(value, dict):
                yield value

    def _resume(self, source_ids: set[str]) -> None:
        gone = 0
        for entry in self._objects(self._lines(self.state_path)[1:]):
            if entry.get("finished") in source_ids:
                self.finished[entry["finished"]] = entry
            elif "finished" in entry:
                gone += 1
        lines = [line for line in self._lines(self.path) if line.strip()]
        self.records = [record for record in self._objects(lines) if record.get("source_id") in self.finished]
        removed = len(lines) - len(self.records)
        atomic_write_text(self.state_path, self._state_text())  # without a half-written last line
        if removed:  # pairs of unfinished sources (done again) and of sources no longer in the input
            atomic_write_text(self.path, jsonl_text(self.records))
        logger.info("resuming %s: %d sources finished before, %d pairs kept%s%s", self.path, len(self.finished),
                    len(self.records), f", {removed} lines of unfinished or removed sources dropped" if removed else "",
                    f", {gone} finished sources no longer in the input" if gone else "")

    def add(self, source_id: str, records: list[dict], dropped: Counter) -> None:
        """A finished source: its pairs, then its mark in the state file, each flushed to disk."""
        entry = {"finished": source_id, "kept": len(records), "dropped": dict(dropped)}
        for path, text in ((self.path, jsonl_text(records)), (self.state_path, jsonl_text([entry]))):
            with open(path, "a", encoding="utf-8") as stream:
                stream.write(text)
                stream.flush()
                os.fsync(stream.fileno())
        self.records += records
        self.finished[source_id] = entry


def generate_pairs(sources: list[Source], writer, output: ResumableOutput, language: str, pairs_per_source: int,
                   checks: PairChecks, output_format: str, round_size: int) -> Counter:
    """Ask the writer model for pairs from every source not finished before, a round of sources at a time;
    returns what was dropped, by reason, over the whole output (earlier runs included)."""
    from tqdm.auto import tqdm

    seen_questions = {normalized_question(record_question(record)) for record in output.records}
    dropped = Counter()
    for entry in output.finished.values():
        dropped.update(entry.get("dropped", {}))
    todo = [source for source in sources if source.id not in output.finished]
    with tqdm(total=len(todo), desc="sources", unit="source") as progress:
        for start in range(0, len(todo), round_size):
            batch = todo[start:start + round_size]
            languages = [text_language(source.text) if language == "auto" else language for source in batch]
            replies = writer.write([qa_prompt(source, lang, pairs_per_source) for source, lang in zip(batch, languages)])
            for source, lang, reply in zip(batch, languages, replies, strict=True):
                records, source_dropped = [], Counter()
                pairs = parse_pairs(reply)
                if not pairs:
                    source_dropped["reply without question-answer pairs"] += 1
                for question, answer in pairs:
                    reason = checks.reason_to_drop(question, answer, source, seen_questions)
                    if reason:
                        source_dropped[reason] += 1
                        continue
                    seen_questions.add(normalized_question(question))
                    records.append(question_answer_record(question, answer, output_format, source_id=source.id,
                                                          language=lang))
                output.add(source.id, records, source_dropped)
                dropped.update(source_dropped)
                progress.update()
    return dropped
