"""Every evaluation metric against values worked out by hand on tiny inputs."""

import math

import pytest

from medgpt import metrics
from medgpt.generation import Generated

DIABETES_ANSWER = "糖尿病患者应该控制饮食"
DIABETES_REFERENCE = "糖尿病患者需要控制饮食和运动"


def test_chinese_is_segmented_by_jieba_and_other_text_by_lowercased_words():
    assert metrics.metric_tokens(DIABETES_ANSWER) == ["糖尿病", "患者", "应该", "控制", "饮食"]
    assert metrics.metric_tokens(DIABETES_REFERENCE) == ["糖尿病", "患者", "需要", "控制", "饮食", "和", "运动"]
    assert metrics.metric_tokens("BP 140/90 mmHg, don't panic!") == ["bp", "140", "90", "mmhg", "don", "t", "panic"]
    assert metrics.metric_tokens("血压 BP 高") == ["血压", "bp", "高"]


def test_rouge_and_token_f1_of_a_chinese_pair():
    # answer: 糖尿病 患者 应该 控制 饮食 (5 words); reference: 糖尿病 患者 需要 控制 饮食 和 运动 (7 words)
    # shared words 4: P = 4/5, R = 4/7, F1 = 2/3. Longest common subsequence: the same 4 words.
    # bigrams: answer 4, reference 6, shared 2 (糖尿病 患者, 控制 饮食): P = 1/2, R = 1/3, F = 0.4
    scores = metrics.rouge(DIABETES_ANSWER, DIABETES_REFERENCE)
    assert scores["rouge1"] == pytest.approx(200 / 3)
    assert scores["rouge2"] == pytest.approx(40.0)
    assert scores["rougeL"] == pytest.approx(200 / 3)
    assert metrics.token_f1(DIABETES_ANSWER, DIABETES_REFERENCE) == pytest.approx(200 / 3)
    assert metrics.token_f1("完全不同", DIABETES_REFERENCE) == 0.0
    # English articles do not count in token F1 (as in SQuAD): "fever" against "high fever": P = 1, R = 1/2,
    # F1 = 2/3. ROUGE-1 counts "the": 2 shared of 2 and 3 words: P = 1, R = 2/3, F = 0.8.
    assert metrics.token_f1("the fever", "the high fever") == pytest.approx(200 / 3)
    assert metrics.rouge("the fever", "the high fever")["rouge1"] == pytest.approx(80.0)


def test_bleu4_of_a_chinese_and_an_english_pair():
    # 高血压 患者 应该 减少 食盐 摄入 against 高血压 患者 应该 减少 食盐: n-gram precisions 5/6, 4/5, 3/4, 2/3,
    # the answer is longer so no brevity penalty: BLEU = (5/6 * 4/5 * 3/4 * 2/3) ** (1/4) = (1/3) ** (1/4)
    assert metrics.bleu4(["高血压患者应该减少食盐摄入"], ["高血压患者应该减少食盐"]) == pytest.approx(100 * (1 / 3) ** 0.25)
    # precisions 5/7, 3/6, 2/5, 1/4; equal lengths: BLEU = (1/28) ** (1/4)
    english = ("the patient should drink more water daily", "the patient should drink water every day")
    assert metrics.bleu4([english[0]], [english[1]]) == pytest.approx(100 * (1 / 28) ** 0.25)
    assert metrics.sentence_bleu4(*english) == pytest.approx(100 * (1 / 28) ** 0.25)
    # A shorter answer pays the brevity penalty exp(1 - 7/6): 6 of the 7 reference words, in order.
    shorter = metrics.bleu4(["the patient should drink water every"], [english[1]])
    assert shorter == pytest.approx(100 * math.exp(1 - 7 / 6))


def test_answer_overlap_summary_averages_per_answer_scores():
    summary, rows = metrics.answer_overlap([DIABETES_ANSWER, "the same words"], [DIABETES_REFERENCE, "the same words"])
    assert rows[1]["rougeL"] == pytest.approx(100) and rows[1]["token_f1"] == pytest.approx(100)
    assert summary["rouge1"] == pytest.approx((200 / 3 + 100) / 2)
    assert summary["answer_tokens"] == pytest.approx((5 + 3) / 2)


def test_the_option_with_the_highest_loglikelihood_is_picked_raw_and_per_character():
    texts = ["Aspirin 100 mg daily", "Rest", "Intravenous fluids at once, then review"]  # 20, 4, 39 characters
    # A 3-option question whose right answer (B) has the highest log-likelihood, also per character
    # (-9/20 = -0.45, -0.4/4 = -0.1, -12/39 = -0.31): both forms pick it.
    assert metrics.pick_by_loglikelihood([-9.0, -0.4, -12.0], texts) == (1, 1)
    # Per character: -6/20 = -0.30, -4/4 = -1.0, -9/39 = -0.23: the long option wins acc_norm, not acc.
    assert metrics.pick_by_loglikelihood([-6.0, -4.0, -9.0], texts) == (1, 2)


def test_multiple_answer_questions_are_scored_as_whole_sets():
    options = {"A": "Metoprolol", "B": "Amlodipine", "C": "Atenolol"}
    assert metrics.answer_candidates(options, 1) == [
        (frozenset("A"), "Metoprolol"), (frozenset("B"), "Amlodipine"), (frozenset("C"), "Atenolol")]
    assert metrics.answer_candidates(options, 2) == [
        (frozenset("AB"), "AB"), (frozenset("AC"), "AC"), (frozenset("BC"), "BC"), (frozenset("ABC"), "ABC")]
    rows = [
        {"subject": "pharmacology", "acc": frozenset("AC") == frozenset("AC")},   # exact set: right
        {"subject": "pharmacology", "acc": frozenset("A") == frozenset("AC")},    # a subset: wrong
        {"subject": "pharmacology", "acc": frozenset("ABC") == frozenset("AC")},  # a superset: wrong
        {"subject": "cardiology", "acc": True},
    ]
    summary = metrics.choice_summary(rows, "acc")
    assert summary["accuracy"] == 50.0 and summary["questions"] == 4
    assert summary["by_subject"] == {"cardiology": 100.0, "pharmacology": pytest.approx(100 / 3)}
    assert metrics.choice_summary(rows, "acc_norm") == {}


@pytest.mark.parametrize("text, letters", [
    ("B", "B"), ("B. Aspirin", "B"), ("(C)", "C"), ("The answer is D.", "D"), ("Answer: (A) because ...", "A"),
    ("答案：AC", "AC"), ("正确答案是A、C、D", "ACD"), ("A, C and D", "ACD"), ("排除A以后，应选D", "D"),
    ("I would choose C.", "C"), ("E", None),  # E is not an option of a 4-option question
    ("A patient with these symptoms should rest", None), ("I am not sure", None),
    ("Answer: C\n\nA) is wrong because ...", "C"), ("The answer is B, A is incorrect.", "B"),
    ("答案：C，A选项错误", "C"), ("Choices A and B are distractors; the answer is C.", "C"),
    ("该病诊断首选B超，答案是D", "D"), ("the answer is A, B, and D", "ABD"), ("**B**", "B"),
    ("The correct choice is **B**.", "B"), ("It is caused by hepatitis B.", None), ("Vitamin D.", None),
])
def test_answer_letters_are_read_from_generated_answers(text, letters):
    found = metrics.extract_answer_letters(text, list("ABCD"))
    assert found == (frozenset(letters) if letters else None)


def test_perplexity_pairwise_accuracy_and_decoding_speed():
    assert metrics.perplexity(2 * math.log(4), 2) == pytest.approx(4.0)
    # margins 1, -0.5, 0: only the first pair is ranked right (a tie is not)
    result = metrics.pairwise_accuracy([1.0, 0.5, 2.0], [0.0, 1.0, 2.0])
    assert result == {"accuracy": pytest.approx(100 / 3), "mean_margin": pytest.approx(0.5 / 3), "pairs": 3}
    # 11 tokens, the first after 0.5 s, the last at 2.5 s: 10 tokens decoded in 2 s
    assert Generated("text", 11, 0.5, 2.5).tokens_per_second == pytest.approx(5.0)
    assert Generated("", 1, 0.5, 0.5).tokens_per_second == 0.0
