"""Evaluation questions: multiple-choice sets (our own and the public medical benchmarks) and open questions
with reference answers.

Each benchmark's layout is read into one shape (`ChoiceQuestion` or `OpenQuestion`) so that scoring never
depends on where a question came from. Every question keeps its `path:line`, and a record that cannot be read
is an `InputError` there: a benchmark with one silently dropped question gives a different accuracy.
"""

import codecs
import csv
import json
import logging
import os
import re
from dataclasses import dataclass

from medgpt.data import RecordError, decode_lines, find_data_files, has_suffix, read_raw_records
from medgpt.errors import InputError

logger = logging.getLogger(__name__)

CHOICE_FORMATS = ("native", "medqa", "medmcqa", "pubmedqa", "cmexam", "ceval", "cmmlu")
CHOICE_SUFFIXES = (".jsonl", ".json", ".csv")
OPEN_SUFFIXES = (".jsonl", ".json")
LETTERS = "ABCDE"
PUBMEDQA_DECISIONS = ("yes", "no", "maybe")  # options A, B, C
REFERENCE_KEYS = ("reference", "answer", "output", "response")

# Separators people put between answer letters: "A,C", "A C", "A、C".
ANSWER_SEPARATORS = re.compile(r"[\s,，、;；/]+")
# A CMExam option line: "A 肝脏", "B.肾脏", "C、心脏", "D：脾脏" (a letter alone is an empty option).
OPTION_LINE = re.compile(r"([A-Z])(?:\s*[.、．:：]|\s|$)\s*(.*)", re.S)


@dataclass(frozen=True)
class ChoiceQuestion:
    question: str
    options: dict[str, str]  # "A" -> text, consecutive letters from A, 2 to 5 of them
    answer: frozenset[str]  # several letters: a multiple-answer question, right only if all are chosen
    subject: str
    source: str  # "path:line"
    context: str = ""  # shown before the question (PubMedQA's abstract)
    id: str = ""


@dataclass(frozen=True)
class OpenQuestion:
    question: str
    reference: str
    subject: str
    source: str
    id: str = ""


def _bad(message: str) -> RecordError:
    return RecordError("bad question", message)


def find_question_files(path: str, suffixes: tuple[str, ...]) -> list[str]:
    """A file, or every file with one of `suffixes` below a folder, sorted so that runs are repeatable."""
    if os.path.isfile(path) and not has_suffix(path, suffixes):
        raise InputError(f"questions must be in a {', '.join(suffixes)} file", path)
    return find_data_files(path, suffixes)


def _is_blank(path: str) -> bool:
    """Whether a file holds nothing but whitespace, read in chunks so a large file is not read twice."""
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 16), b""):
            if chunk.replace(codecs.BOM_UTF8, b"").strip():
                return False
    return True


def _json_records(path: str) -> list[tuple[int, dict]]:
    records = []
    for line, record in read_raw_records(path):
        if isinstance(record, RecordError):
            raise InputError(str(record), path, line)
        if not isinstance(record, dict):
            raise InputError(f"a question must be a JSON object, got {type(record).__name__}", path, line)
        records.append((line, record))
    return records


def _csv_records(path: str) -> list[tuple[int, dict]]:
    """Rows as {header name: cell}, each at the line where it starts (a quoted cell may span lines)."""
    lines, bad_lines = decode_lines(path)
    if bad_lines:
        raise InputError("not valid UTF-8 text (save the file as UTF-8)", path, min(bad_lines))
    reader = csv.reader(f"{line}\n" for line in lines)
    header, records, start = None, [], 1
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip() for cell in row]
            elif len(row) != len(header):
                if reader.line_num >= len(lines) and reader.line_num > line:
                    raise InputError("a quoted cell that starts in this row is never closed (a '\"' is missing)", path, line)
                raise InputError(f"this row has {len(row)} cells, the header has {len(header)}", path, line)
            else:
                records.append((line, {name: cell.replace("\r\n", "\n") for name, cell in zip(header, row)}))
    except csv.Error as error:
        raise InputError(f"malformed CSV: {error}", path, start) from None
    return records


def _read_records(path: str) -> list[tuple[int, dict]]:
    """The file's records as (line, dict); an empty file is an error, since it would score as 0 of 0."""
    records = [] if _is_blank(path) else _csv_records(path) if has_suffix(path, ".csv") else _json_records(path)
    if not records:
        raise InputError("no questions in this file", path)
    return records


def _text(value, what: str) -> str:
    """A text field, stripped. Numbers are taken as text (ids, numeric options); missing is empty."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _bad(f"{what} must be text, got {type(value).__name__}")
    return str(value).strip()


def _question_text(record: dict, key: str) -> str:
    if key not in record:
        raise _bad(f"no '{key}' field")
    question = _text(record[key], key)
    if not question:
        raise _bad("empty question")
    return question


def _options(value) -> dict[str, str]:
    """Options as {letter: text} in letter order, from a mapping, a list of texts, or a list of
    {"key", "value"} pairs."""
    if isinstance(value, list) and value and all(isinstance(item, dict) and "key" in item for item in value):
        value = {item["key"]: item.get("value") for item in value}
    elif isinstance(value, list):
        if len(value) > len(LETTERS):
            raise _bad(f"more than {len(LETTERS)} options")
        value = dict(zip(LETTERS, value))
    if not value:
        raise _bad("question has no options")
    if not isinstance(value, dict):
        raise _bad(f"options must be an object of letter -> text or a list of texts, got {type(value).__name__}")
    if len(value) > len(LETTERS):
        raise _bad(f"more than {len(LETTERS)} options")
    letters = sorted(str(key).strip() for key in value)
    if letters != list(LETTERS[: len(letters)]):
        raise _bad(f"options must be consecutive letters from A, got {', '.join(letters)}")
    if len(letters) < 2:
        raise _bad("a question needs at least 2 options")
    options = {str(key).strip(): _text(text, f"option '{key}'") for key, text in value.items()}
    for letter in letters:
        if not options[letter]:
            raise _bad(f"option '{letter}' is empty")
    return {letter: options[letter] for letter in letters}


def _answer(value, options: dict[str, str]) -> frozenset[str]:
    """The right letters from "B", "ACD", "A,C" or ["A", "C"]."""
    given = "".join(_text(item, "answer") for item in value) if isinstance(value, list) else _text(value, "answer")
    letters = ANSWER_SEPARATORS.sub("", given).upper()
    if not letters:
        raise _bad("question has no answer")
    for letter in letters:
        if not ("A" <= letter <= "Z"):
            raise _bad(f"answer must be option letters such as \"B\" or \"ACD\", got '{given}'")
        if letter not in options:
            raise _bad(f"answer letter '{letter}' is not one of the options A-{list(options)[-1]}")
    return frozenset(letters)


def _choice(source: str, question: str, options, answer, subject, default_subject: str, context="", id="") -> ChoiceQuestion:
    options = _options(options)
    return ChoiceQuestion(
        question=question,
        options=options,
        answer=_answer(answer, options),
        subject=_text(subject, "subject") or default_subject,
        source=source,
        context=_text(context, "context"),
        id=_text(id, "id"),
    )


def _native(record: dict, source: str) -> ChoiceQuestion:
    return _choice(source, _question_text(record, "question"), record.get("options"), record.get("answer"),
                   record.get("subject"), "general", record.get("context"), record.get("id"))


def _medqa(record: dict, source: str) -> ChoiceQuestion:
    options = _options(record.get("options"))
    answer = record.get("answer_idx")
    if answer is None or answer == "":
        # Some copies keep only the right option's text.
        text = _text(record.get("answer"), "answer")
        if not text:
            raise _bad("question has no answer (no 'answer_idx' or 'answer')")
        matches = [letter for letter, option in options.items() if option == text]
        if not matches:
            raise _bad(f"answer '{text[:60]}' is not the text of any option")
        answer = matches[0]
    return _choice(source, _question_text(record, "question"), options, answer, record.get("meta_info"), "medqa",
                   id=record.get("id"))


def _medmcqa(record: dict, source: str, letter: str) -> ChoiceQuestion:
    options = {letter: record.get(key) for letter, key in zip("ABCD", ("opa", "opb", "opc", "opd"))}
    return _choice(source, _question_text(record, "question"), options, letter, record.get("subject_name"),
                   "medmcqa", id=record.get("id"))


def _medmcqa_file(path: str, records: list[tuple[int, dict]]) -> list[ChoiceQuestion]:
    """MedMCQA's original release numbers the right option 1-4, the Hugging Face copy 0-3; which one a file
    uses is told by whether any answer is 0 or 4."""
    cops = []
    for line, record in records:
        cop = record.get("cop")
        if isinstance(cop, str) and cop.strip().lstrip("-").isdigit():
            cop = int(cop)
        if cop is None or cop == "" or cop == -1:
            raise InputError("this file has no answers ('cop' is missing or -1, as in MedMCQA's test split): "
                             "evaluate on the validation split", path, line)
        if isinstance(cop, bool) or not isinstance(cop, int) or not 0 <= cop <= 4:
            raise InputError(f"cop must be a number from 0 to 4, got {cop!r}", path, line)
        cops.append(cop)
    if 0 in cops and 4 in cops:
        raise InputError("answers (cop) include both 0 and 4: cannot tell whether they count from 0 (Hugging "
                         "Face copy) or from 1 (original release)", path)
    if 0 not in cops and 4 not in cops:
        logger.warning("%s: no answer (cop) is 0 or 4; reading them as 1-4, as in MedMCQA's original release", path)
    first = 0 if 0 in cops else 1
    return _convert(path, records, lambda record, source, cop: _medmcqa(record, source, LETTERS[cop - first]), cops)


def _pubmedqa(record: dict, source: str) -> ChoiceQuestion:
    question = _question_text(record, "QUESTION" if "QUESTION" in record and "question" not in record else "question")
    contexts = record.get("context", record.get("CONTEXTS"))
    if isinstance(contexts, dict):
        contexts = contexts.get("contexts")
    if isinstance(contexts, list):
        context = "\n".join(_text(part, "context") for part in contexts)
    else:
        context = _text(contexts, "context")
    decision = _text(record.get("final_decision"), "final_decision").lower()
    if not decision:
        raise _bad("question has no answer (no 'final_decision')")
    if decision not in PUBMEDQA_DECISIONS:
        raise _bad(f"final_decision must be yes, no or maybe, got '{decision}'")
    options = dict(zip(LETTERS, PUBMEDQA_DECISIONS))
    answer = LETTERS[PUBMEDQA_DECISIONS.index(decision)]
    return _choice(source, question, options, answer, None, "pubmedqa", context, record.get("pubid"))


def _is_pmid_map(record) -> bool:
    """Whether a record is PubMedQA's original file: {pmid: {"QUESTION": ..., ...}, ...}."""
    if not isinstance(record, dict) or not record:
        return False
    first = next(iter(record.values()))
    return isinstance(first, dict) and "QUESTION" in first


def _key_lines(path: str, keys: list[str], default: int) -> dict[str, int]:
    """The line of each top-level key of a JSON object file (keys in file order), so each PubMedQA question
    gets its own line; `default` where a key cannot be found."""
    content = "\n".join(decode_lines(path)[0])
    lines, position, line = {}, 0, 1
    for key in keys:
        match = re.compile(re.escape(json.dumps(key, ensure_ascii=False)) + r"\s*:").search(content, position)
        if match is None:
            lines[key] = default
            continue
        line += content.count("\n", position, match.start())
        lines[key], position = line, match.start()
    return lines


def _pubmedqa_records(path: str, records: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
    """Records with the original file's pmid map opened up into one record per pmid."""
    opened = []
    for line, record in records:
        if not _is_pmid_map(record):
            opened.append((line, record))
            continue
        lines = _key_lines(path, list(record), line)
        for pmid, value in record.items():
            if not isinstance(value, dict):
                raise InputError(f"'{pmid}' must be a question object, got {type(value).__name__}", path, lines[pmid])
            opened.append((lines[pmid], {"pubid": pmid, **value}))
    return opened


def _cmexam_options(text: str) -> dict[str, str]:
    options = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        match = OPTION_LINE.fullmatch(line.strip())
        if match is None:
            raise _bad(f"cannot read the option line '{line.strip()[:40]}' (expected a letter and its text, such as 'A 肝脏')")
        if match[1] in options:
            raise _bad(f"option '{match[1]}' is given twice")
        options[match[1]] = match[2]
    return options


def _cmexam(record: dict, source: str) -> ChoiceQuestion:
    subject = _text(record.get("Clinical Department"), "Clinical Department") or record.get("Medical Discipline")
    options = _cmexam_options(_text(record.get("Options"), "Options"))
    return _choice(source, _question_text(record, "Question"), options, record.get("Answer"), subject, "cmexam")


def _column_options(record: dict) -> dict:
    return {letter: record[letter] for letter in LETTERS if letter in record}


def _subject_from_file(path: str) -> str:
    """clinical_medicine_val.csv -> clinical_medicine (C-Eval); clinical_knowledge.csv stays as it is (CMMLU)."""
    return re.sub(r"_(val|dev|test)$", "", os.path.splitext(os.path.basename(path))[0])


def _ceval(record: dict, source: str) -> ChoiceQuestion:
    subject = _subject_from_file(source.rpartition(":")[0])
    return _choice(source, _question_text(record, "question"), _column_options(record), record.get("answer"),
                   subject, "general", id=record.get("id"))


def _cmmlu(record: dict, source: str) -> ChoiceQuestion:
    subject = _subject_from_file(source.rpartition(":")[0])
    return _choice(source, _question_text(record, "Question"), _column_options(record), record.get("Answer"),
                   subject, "general", id=record.get(""))


PARSERS = {"native": _native, "medqa": _medqa, "pubmedqa": _pubmedqa, "cmexam": _cmexam, "ceval": _ceval, "cmmlu": _cmmlu}


def _convert(path: str, records: list[tuple[int, dict]], parse, *extra) -> list:
    """Each record parsed, the first that cannot be is an error at its line. `extra` are lists of
    per-record arguments."""
    questions = []
    for (line, record), *arguments in zip(records, *extra):
        try:
            questions.append(parse(record, f"{path}:{line}", *arguments))
        except RecordError as error:
            raise InputError(str(error), path, line) from None
    return questions


def detect_choice_format(path: str, first_record) -> str:
    """The multiple-choice format of a file, told by its first record's fields (for a CSV file: its first
    row as {header name: cell})."""
    keys = list(first_record) if isinstance(first_record, dict) else []
    if "answer_idx" in keys or "meta_info" in keys:
        return "medqa"
    if "opa" in keys:
        return "medmcqa"
    if "final_decision" in keys or _is_pmid_map(first_record):
        return "pubmedqa"
    if "Options" in keys:
        return "cmexam"
    if keys[:2] == ["id", "question"] and "A" in keys and "answer" in keys:
        return "ceval"
    if "Question" in keys and "A" in keys and "Answer" in keys:
        return "cmmlu"
    if "options" in keys and "answer" in keys:
        return "native"
    shown = ", ".join(repr(key) for key in keys[:10]) + (", ..." if len(keys) > 10 else "")
    raise InputError(f"cannot tell which multiple-choice format this file is in (first record's fields: {shown or 'none'}); "
                     f"name it with --mc_format, one of: {', '.join(CHOICE_FORMATS)}", path)


def _load_choice_file(path: str, fmt: str) -> list[ChoiceQuestion]:
    records = _read_records(path)
    if fmt == "auto":
        fmt = detect_choice_format(path, records[0][1])
    if fmt == "medmcqa":
        return _medmcqa_file(path, records)
    if fmt == "pubmedqa":
        records = _pubmedqa_records(path, records)
    if fmt == "ceval" and not any(str(record.get("answer") or "").strip() for _, record in records):
        raise InputError("this file has no answers (C-Eval's test split has none): use the val or dev split",
                         path, records[0][0])
    return _convert(path, records, PARSERS[fmt])


def load_choice_questions(path: str, fmt: str = "auto") -> list[ChoiceQuestion]:
    """Multiple-choice questions from a file or from every .jsonl/.json/.csv file below a folder. `fmt` is
    one of CHOICE_FORMATS, or "auto" to tell each file's format from its first record."""
    if fmt != "auto" and fmt not in CHOICE_FORMATS:
        raise InputError(f"unknown multiple-choice format '{fmt}': use auto or one of {', '.join(CHOICE_FORMATS)}")
    questions = []
    for file in find_question_files(path, CHOICE_SUFFIXES):
        questions += _load_choice_file(file, fmt)
    return questions


def _open_question(record: dict, source: str) -> OpenQuestion:
    if "question" not in record and "instruction" in record:
        # Alpaca: the input, when there is one, is part of the question.
        question = _question_text(record, "instruction")
        extra = _text(record.get("input"), "input")
        question = f"{question}\n{extra}" if extra else question
    else:
        question = _question_text(record, "question")
    key = next((key for key in REFERENCE_KEYS if key in record), None)
    reference = _text(record[key], key) if key else ""
    if not reference:
        raise _bad('open question has no reference answer (add a "reference" field)')
    return OpenQuestion(question, reference, _text(record.get("subject"), "subject") or "general", source,
                        _text(record.get("id"), "id"))


def load_open_questions(path: str) -> list[OpenQuestion]:
    """Open questions with reference answers, from a .jsonl/.json file or every such file below a folder:
    {"question", "reference"} (or "answer", "output", "response"), or Alpaca's {"instruction", "input", "output"}."""
    questions = []
    for file in find_question_files(path, OPEN_SUFFIXES):
        questions += _convert(file, _read_records(file), _open_question)
    return questions
