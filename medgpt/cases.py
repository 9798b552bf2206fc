"""Patient cases synthesised from a knowledge graph of diseases (symptoms, signs, tests with results,
treatments, differential diagnoses), in the SFT data's medical-inquiry shape: "Patient: ... Symptoms:
... Examination: ... Test results: ..." answered by an assessment. Deterministic for a seed."""

import json
import random
import re
from collections import Counter
from dataclasses import dataclass

from medgpt.data import decode_lines
from medgpt.dataset_tools import question_answer_record
from medgpt.errors import InputError

LANGUAGES = ("en", "zh")
PERSON = {(False, False): "man", (True, False): "woman", (False, True): "boy", (True, True): "girl"}  # (female, child)
TEXT_LISTS = {"symptoms": 2, "signs": 1, "treatments": 1, "differential": 1}  # list -> fewest entries
TEXTS = ("name", "inheritance", "specialist")


@dataclass
class Disease:
    id: str
    fields: dict
    line: int


def _items_with_lines(content: str, array_key: str, path: str) -> list[tuple[int, object]]:
    """The entries of the top-level array `array_key`, each with the line it starts on."""
    match = re.search(re.escape(json.dumps(array_key)) + r"\s*:\s*\[", content)
    if match is None:
        raise InputError(f'no "{array_key}" list in the knowledge graph (the file holds {{"{array_key}": [...]}})', path, 1)
    decoder, position, items = json.JSONDecoder(), match.end(), []
    while True:
        while position < len(content) and content[position] in " \t\r\n,":
            position += 1
        if position >= len(content) or content[position] == "]":
            return items
        item, end = decoder.raw_decode(content, position)
        items.append((content.count("\n", 0, position) + 1, item))
        position = end


def _text(value, where: str, path: str, line: int) -> dict:
    """A bilingual text {"en": ..., "zh": ...}, both non-empty."""
    if not isinstance(value, dict):
        raise InputError(f'{where} must be an object {{"en": ..., "zh": ...}}', path, line)
    for language in LANGUAGES:
        if not isinstance(value.get(language), str) or not value[language].strip():
            raise InputError(f'{where} has no "{language}" text', path, line)
    return value


def applicable_tests(tests: list[dict], sex: str, age: int) -> list[dict]:
    """The tests that apply to a patient: some are for one sex (an enzyme level that is diagnostic in men
    only), some findings appear only in adults ("min_age")."""
    return [test for test in tests if test.get("sex") in (None, sex) and age >= test.get("min_age", 0)]


def key_tests(tests: list[dict], sex: str, age: int) -> list[dict]:
    return [test for test in applicable_tests(tests, sex, age) if test.get("key")]


def _check_disease(record, path: str, line: int) -> Disease:
    if not isinstance(record, dict):
        raise InputError("a disease must be a JSON object", path, line)
    disease_id = record.get("id")
    if not isinstance(disease_id, str) or not disease_id.strip():
        raise InputError('a disease has no "id"', path, line)
    name = f"disease '{disease_id}'"
    for key in TEXTS:
        if key not in record:
            raise InputError(f'{name} has no "{key}"', path, line)
        _text(record[key], f"{name}: {key}", path, line)
    for key, fewest in TEXT_LISTS.items():
        values = record.get(key)
        if not isinstance(values, list):
            raise InputError(f'{name} has no "{key}" list', path, line)
        if len(values) < fewest:
            raise InputError(f"{name} needs at least {fewest} {key}, has {len(values)}", path, line)
        for index, value in enumerate(values):
            _text(value, f"{name}: {key}[{index}]", path, line)
    tests = record.get("tests")
    if not isinstance(tests, list) or not tests:
        raise InputError(f'{name} has no "tests" list', path, line)
    for index, test in enumerate(tests):
        if not isinstance(test, dict):
            raise InputError(f"{name}: tests[{index}] must be an object", path, line)
        for key in ("name", "result"):
            if key not in test:
                raise InputError(f'{name}: tests[{index}] has no "{key}"', path, line)
            _text(test[key], f"{name}: tests[{index}].{key}", path, line)
        if not isinstance(test.get("key", False), bool):
            raise InputError(f'{name}: tests[{index}].key must be true or false', path, line)
        if test.get("sex") not in (None, "male", "female"):
            raise InputError(f'{name}: tests[{index}].sex must be "male" or "female" (or absent: both)', path, line)
        minimum = test.get("min_age", 0)
        if not isinstance(minimum, int) or isinstance(minimum, bool) or minimum < 0:
            raise InputError(f"{name}: tests[{index}].min_age must be a whole number of years", path, line)
    ages = record.get("onset_age")
    if not (isinstance(ages, list) and len(ages) == 2
            and all(isinstance(age, int) and not isinstance(age, bool) for age in ages) and 0 <= ages[0] <= ages[1] <= 120):
        raise InputError(f'{name}: "onset_age" must be [youngest, oldest] in years', path, line)
    share = record.get("female_share", 0.5)
    if isinstance(share, bool) or not (isinstance(share, (int, float)) and 0 <= share <= 1):
        raise InputError(f'{name}: "female_share" must be a number from 0 to 1', path, line)
    for sex in [sex for sex, possible in (("female", share > 0), ("male", share < 1)) if possible]:
        if not key_tests(tests, sex, ages[0]):
            raise InputError(f'{name}: no test is marked "key": true for a {sex} patient of {ages[0]} (the '
                             "findings an assessment rests on)", path, line)
    return Disease(disease_id, record, line)


def load_knowledge_graph(path: str) -> list[Disease]:
    """The diseases of a knowledge-graph JSON file, each checked; a missing or malformed field is an
    InputError naming the file, the line where its disease starts, and the field."""
    try:
        lines, bad_lines = decode_lines(path)
    except FileNotFoundError:
        raise InputError("no such file", path) from None
    except IsADirectoryError:
        raise InputError("a folder, not a knowledge-graph file", path) from None
    if bad_lines:
        raise InputError("not valid UTF-8", path, min(bad_lines))
    content = "\n".join(lines)
    try:
        json.loads(content)
    except json.JSONDecodeError as error:
        raise InputError(f"not valid JSON: {error.msg}", path, error.lineno) from None
    diseases, seen = [], set()
    for line, record in _items_with_lines(content, "diseases", path):
        disease = _check_disease(record, path, line)
        if disease.id in seen:
            raise InputError(f"disease '{disease.id}' appears twice", path, line)
        seen.add(disease.id)
        diseases.append(disease)
    if not diseases:
        raise InputError('the "diseases" list is empty', path)
    return diseases


@dataclass
class Case:
    id: str
    disease: str
    language: str
    presentation: str  # the patient's side: information, symptoms, examination, test results
    assessment: str


def _join(items: list[str], language: str) -> str:
    if language == "zh":
        return "、".join(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def sample_case(disease: Disease, language: str, rng: random.Random, number: int) -> Case:
    """One case: an age in the disease's range, a sex by its share of women, 3 of its symptoms, 1-2 signs,
    every key test and 1-2 others; the assessment cites the key results and the signs it was given."""
    record = disease.fields
    age = rng.randint(*record["onset_age"])
    female = rng.random() < record.get("female_share", 0.5)
    symptoms = rng.sample(record["symptoms"], min(3, len(record["symptoms"])))
    signs = rng.sample(record["signs"], rng.randint(1, min(2, len(record["signs"]))))
    tests = applicable_tests(record["tests"], "female" if female else "male", age)
    key = [test for test in tests if test.get("key")]
    others = [test for test in tests if not test.get("key")]
    tests = key + rng.sample(others, min(len(others), rng.randint(1, 2)))
    rng.shuffle(tests)
    treatments = record["treatments"][:3]
    pick = lambda items: [item[language] for item in items]  # noqa: E731
    results = [f"{test['name'][language]}{'：' if language == 'zh' else ': '}{test['result'][language]}" for test in tests]
    key_results = [f"{test['name'][language]} {test['result'][language]}" for test in key]
    name, specialist = record["name"][language], record["specialist"][language]
    if language == "zh":
        presentation = (f"患者信息：{'女' if female else '男'}，{age}岁。症状：{'；'.join(pick(symptoms))}。"
                        f"查体：{'；'.join(pick(signs))}。检查结果：{'；'.join(results)}。")
        assessment = (f"以上表现提示{name}。病因：{record['inheritance'][language]}。支持依据：{'；'.join(key_results)}；"
                      f"{'；'.join(pick(signs))}。需要鉴别的疾病：{_join(pick(record['differential']), language)}。"
                      f"处理：{'；'.join(pick(treatments))}。请到{specialist}确诊，并在医生指导下治疗和随访。")
    else:
        presentation = (f"Patient: {age}-year-old {PERSON[female, age < 18]}. Symptoms: {'; '.join(pick(symptoms))}. "
                        f"Examination: {'; '.join(pick(signs))}. Test results: {'; '.join(results)}.")
        assessment = (f"These findings point to {name}. Cause: {record['inheritance'][language]}. In support: "
                      f"{'; '.join(key_results)}; {'; '.join(pick(signs))}. Conditions to rule out: "
                      f"{_join(pick(record['differential']), language)}. Management: {'; '.join(pick(treatments))}. "
                      f"{'An' if specialist[:1].lower() in 'aeiou' else 'A'} {specialist} should confirm the diagnosis "
                      "and lead treatment and follow-up.")
    return Case(f"{disease.id}-{language}-{number:03d}", disease.id, language, presentation, assessment)


def synthesize_cases(diseases: list[Disease], cases_per_disease: int, languages: list[str], seed: int) -> list[Case]:
    """`cases_per_disease` cases of every disease in every language, the same for the same seed (each
    disease and language draws from its own generator, so adding a disease changes no other's cases)."""
    cases = []
    for disease in diseases:
        for language in languages:
            rng = random.Random(f"{seed}:{disease.id}:{language}")
            cases += [sample_case(disease, language, rng, number) for number in range(1, cases_per_disease + 1)]
    return cases


REPHRASE_PROMPTS = {
    "en": ("Rewrite this case description in the words of a referring doctor, as one paragraph. Keep every "
           "finding, test and number exactly; add nothing.\n\n{presentation}"),
    "zh": "请以转诊医生的口吻把下面的病例改写成一段话。保留所有表现、检查和数值，不要添加任何内容。\n\n{presentation}",
}


def keeps_findings(original: str, rephrased: str) -> bool:
    """Whether a rephrased presentation kept every number of the original as a number (an age of 3 is
    not kept by a 35), as often as the original has it, and is not much shorter: a model that drops or
    changes a finding would make the assessment wrong. Wording is the model's; numbers are the facts
    that rewording must not touch."""
    numbers = re.compile(r"(?<![\d.])\d+(?:\.\d+)?(?![\d.])")
    found = Counter(numbers.findall(rephrased))
    return len(rephrased) >= 0.6 * len(original) and all(
        found[number] >= count for number, count in Counter(numbers.findall(original)).items())


def case_record(case: Case, output_format: str) -> dict:
    return question_answer_record(case.presentation, case.assessment, output_format, case_id=case.id,
                                  disease=case.disease, language=case.language)
