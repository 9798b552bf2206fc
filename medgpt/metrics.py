"""Evaluation metrics as small pure functions: answer overlap (BLEU-4, ROUGE, token F1), multiple-choice
scoring, perplexity and reward-model pairwise accuracy; and the language of a text. Nothing here touches
a model."""

import functools
import itertools
import logging
import math
import re
import unicodedata
from collections import Counter

# CJK ideographs: the unified block, extension A, compatibility ideographs, extensions B to F.
CJK_CHARACTERS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
CJK_RUN = re.compile(f"[{CJK_CHARACTERS}]+")
WORD = re.compile(r"[^\W_]+")
TOKENIZATION = ("Chinese segmented into words by jieba {jieba}; other text split into lowercased words "
                "(runs of letters and digits); punctuation dropped")


def tokenization_note() -> str:
    import jieba

    return TOKENIZATION.format(jieba=jieba.__version__)


@functools.lru_cache(maxsize=1)
def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)  # its dictionary-loading messages are not ours to print
    return jieba


# A Chinese character carries about as much as a short English word, so it counts as this many Latin
# letters when the two are compared; a Chinese text with a few English drug names stays Chinese.
LATIN_LETTERS_PER_CJK = 3
LANGUAGE_SHARE = 0.7  # the weighted share of CJK (or Latin) letters that makes a text zh (or en)


def letter_counts(text: str) -> tuple[int, int, int]:
    """CJK characters (weighted as Latin letters, above), Latin letters, and letters of other scripts."""
    cjk = sum(len(run) for run in CJK_RUN.findall(text))
    latin = others = 0
    for character in CJK_RUN.sub("", text):
        if character.isalpha():
            if character.isascii() or "LATIN" in unicodedata.name(character, ""):
                latin += 1
            else:
                others += 1
    return cjk * LATIN_LETTERS_PER_CJK, latin, others


def language_of(text: str) -> str:
    """zh, en, mixed or other, from the CJK characters and Latin letters of the text; other: no letters,
    or mostly letters of other scripts (Cyrillic, kana, Hangul, ...)."""
    cjk, latin, others = letter_counts(text)
    total = cjk + latin + others
    if total == 0 or others * 2 > total:
        return "other"
    if cjk >= LANGUAGE_SHARE * total:
        return "zh"
    if latin >= LANGUAGE_SHARE * total:
        return "en"
    return "mixed"


def metric_tokens(text: str) -> list[str]:
    """The words overlap metrics compare: jieba's words for Chinese, lowercased words for the rest."""
    tokens, position = [], 0
    for run in CJK_RUN.finditer(text):
        tokens += WORD.findall(text[position:run.start()].lower())
        tokens += [word for word in _jieba().lcut(run.group()) if WORD.search(word)]
        position = run.end()
    return tokens + WORD.findall(text[position:].lower())


class _PretokenizedText:
    """rouge-score's tokenizer interface over metric_tokens (its own drops every non-ASCII character)."""

    def tokenize(self, text: str) -> list[str]:
        return metric_tokens(text)


def bleu4(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 (0-100, sacrebleu, exponential smoothing) over metric_tokens."""
    from sacrebleu.metrics import BLEU

    joined = lambda texts: [" ".join(metric_tokens(text)) for text in texts]  # noqa: E731
    return BLEU(tokenize="none").corpus_score(joined(hypotheses), [joined(references)]).score


def sentence_bleu4(hypothesis: str, reference: str) -> float:
    """BLEU-4 of one answer (0-100; orders with no n-grams left out, as sacrebleu's sentence BLEU does)."""
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize="none", effective_order=True).sentence_score(
        " ".join(metric_tokens(hypothesis)), [" ".join(metric_tokens(reference))]).score


def rouge(hypothesis: str, reference: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures (0-100) over metric_tokens."""
    from rouge_score.rouge_scorer import RougeScorer

    scores = RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_PretokenizedText()).score(reference, hypothesis)
    return {name: 100 * score.fmeasure for name, score in scores.items()}


ARTICLES = {"a", "an", "the"}


def token_f1(hypothesis: str, reference: str) -> float:
    """Harmonic mean of precision and recall of the shared words (bag of words, 0-100), without English
    articles as SQuAD's F1 leaves them out (that is all that tells it from ROUGE-1)."""
    words = lambda text: Counter(word for word in metric_tokens(text) if word not in ARTICLES)  # noqa: E731
    hypothesis_tokens, reference_tokens = words(hypothesis), words(reference)
    shared = sum((hypothesis_tokens & reference_tokens).values())
    if shared == 0:
        return 0.0
    precision = shared / sum(hypothesis_tokens.values())
    recall = shared / sum(reference_tokens.values())
    return 100 * 2 * precision * recall / (precision + recall)


def answer_overlap(hypotheses: list[str], references: list[str]) -> tuple[dict, list[dict]]:
    """(summary, per-answer scores) for open answers against their references."""
    per_answer = []
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        scores = {"bleu4": sentence_bleu4(hypothesis, reference), **rouge(hypothesis, reference),
                  "token_f1": token_f1(hypothesis, reference), "answer_tokens": len(metric_tokens(hypothesis))}
        per_answer.append(scores)
    count = max(len(per_answer), 1)
    summary = {"bleu4": bleu4(hypotheses, references) if hypotheses else 0.0}
    for name in ("rouge1", "rouge2", "rougeL", "token_f1", "answer_tokens"):
        summary[name] = sum(scores[name] for scores in per_answer) / count
    return summary, per_answer


# ----- multiple choice ----------------------------------------------------------------------------------


def answer_candidates(options: dict[str, str], answer_count: int) -> list[tuple[frozenset, str]]:
    """What a model can answer, each as (letters, text scored after the question). A single-answer question:
    each option's whole text. A multiple-answer one: every set of two or more options, written as its
    letters ("ACD", as such exams print answers): a 5-option question has 26 such sets, and scoring the
    options' joined texts instead would cost tens of times more for no clearer answer."""
    letters = sorted(options)
    if answer_count == 1:
        return [(frozenset(letter), options[letter]) for letter in letters]
    return [
        (frozenset(chosen), "".join(chosen))
        for size in range(2, len(letters) + 1)
        for chosen in itertools.combinations(letters, size)
    ]


def pick_by_loglikelihood(loglikelihoods: list[float], texts: list[str]) -> tuple[int, int]:
    """(best, best_normalised): the candidate with the highest log-likelihood (acc), and with the highest
    log-likelihood per character of its text (acc_norm), as lm-evaluation-harness scores multiple choice."""
    best = max(range(len(texts)), key=lambda i: loglikelihoods[i])
    best_norm = max(range(len(texts)), key=lambda i: loglikelihoods[i] / max(len(texts[i]), 1))
    return best, best_norm


# Letters of an answer on one line: "B", "AC", "A, C and D", "A、C"; never across a line break.
_LETTERS = r"[A-E](?:[ \t]*(?:,|，|、|/|&)?[ \t]*(?:and[ \t]+|和|及)?[A-E])*"
_NOT_A_WORD = r"(?![A-Za-z超型])"  # "B超" is an ultrasound, "A型" a type, "Amlodipine" a word
_ENDS_LETTERS = r"(?=[ \t]*(?:$|\n)|[ \t]*[.)）\]】:：、,，。;；])"
_ANSWER_CUES = [
    re.compile(r"(?:answer|答案)(?:[ \t]+(?:is|are|would be|should be))?[ \t]*(?:为|是|应为|应该是)?[ \t]*[:：]?[ \t]*"
               r"[(（\[【]?(" + _LETTERS + r")" + _NOT_A_WORD, re.IGNORECASE),
    re.compile(r"(?:(?:应|故|本题|我|所以)选(?:择)?|(?:correct|right|best)[ \t]+(?:option|choice)s?(?:[ \t]+(?:is|are))?"
               r"|I(?: would)? choose)[ \t]*[:：]?[ \t]*[(（\[【]?(" + _LETTERS + r")" + _NOT_A_WORD, re.IGNORECASE),
]
_TERMINATED = re.compile(_ENDS_LETTERS)
_LEADING = re.compile(r"\s*[(（\[【]?(" + _LETTERS + r")" + _ENDS_LETTERS)
# A letter standing alone ("..., so C."), unless it names something: vitamin D, hepatitis B, type A, 乙型.
_LONE = re.compile(r"(?<![A-Za-z])(?<!vitamin )(?<!hepatitis )(?<!type )(?<!group )(?<!stage )(?<!grade )"
                   r"(?<!class )(?<!维生素)([A-E])" + _ENDS_LETTERS, re.IGNORECASE)


def extract_answer_letters(text: str, letters: list[str]) -> frozenset | None:
    """The option letters a generated answer gives, or None when none can be read. In order: an answer cue
    ("Answer: B", "答案：AC", "the answer is A, C and D"), a choice cue ("应选D", "the correct option is
    C"), a leading letter set ("B.", "(B)", "A, C"), then the letters standing alone ("..., so C.");
    markdown emphasis is ignored, and letters that are not among the question's options do not count."""
    allowed = set(letters)
    text = re.sub(r"[*_`]", "", text)

    def letter_set(found_text: str) -> frozenset | None:
        found = frozenset(letter for letter in re.findall(r"[A-E]", found_text) if letter in allowed)
        return found or None

    for cue in _ANSWER_CUES:
        for match in cue.finditer(text):
            letters_text = match.group(1)
            if not _TERMINATED.match(text, match.end()):  # "the answer is B, A is wrong": only B is the answer
                letters_text = letters_text[0]
            if found := letter_set(letters_text):
                return found
    match = _LEADING.match(text)
    if match and (found := letter_set(match.group(1))):
        return found
    return letter_set("".join(match.group(1) for match in _LONE.finditer(text) if match.group(1).isupper()))


def choice_summary(results: list[dict], key: str) -> dict:
    """Accuracy of `key` ("acc", "acc_norm", "acc_generated") over all questions and per subject."""
    scored = [row for row in results if key in row]
    if not scored:
        return {}
    by_subject: dict[str, list[bool]] = {}
    for row in scored:
        by_subject.setdefault(row["subject"], []).append(row[key])
    return {
        "accuracy": 100 * sum(row[key] for row in scored) / len(scored),
        "questions": len(scored),
        "by_subject": {subject: 100 * sum(marks) / len(marks) for subject, marks in sorted(by_subject.items())},
    }


# ----- perplexity and reward models ---------------------------------------------------------------------


def perplexity(total_nll: float, token_count: int) -> float:
    """exp of the mean negative log-likelihood per predicted token (None without tokens)."""
    return math.exp(total_nll / token_count) if token_count else None


def pairwise_accuracy(chosen_scores: list[float], rejected_scores: list[float]) -> dict:
    """Share of pairs whose chosen answer outscores the rejected one (ties count as wrong), and the mean
    margin chosen - rejected."""
    margins = [chosen - rejected for chosen, rejected in zip(chosen_scores, rejected_scores, strict=True)]
    return {
        "accuracy": 100 * sum(margin > 0 for margin in margins) / len(margins),
        "mean_margin": sum(margins) / len(margins),
        "pairs": len(margins),
    }
