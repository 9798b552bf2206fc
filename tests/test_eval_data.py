"""Evaluation questions: each benchmark's public layout read into one shape, format detection, and bad
input reported at its path:line."""

import json
import logging

import pytest

from medgpt.errors import InputError
from medgpt.eval_data import ChoiceQuestion, OpenQuestion, detect_choice_format, load_choice_questions, load_open_questions


def write_jsonl(path, *records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records), encoding="utf-8")
    return str(path)


def write_text(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_text(path, fmt="auto") -> str:
    with pytest.raises(InputError) as caught:
        load_choice_questions(path, fmt)
    return str(caught.value)


# --- native ---------------------------------------------------------------------------------------------

def test_native_single_and_multiple_answers(tmp_path):
    path = write_jsonl(
        tmp_path / "multiple_choice.jsonl",
        {"id": "mc-1", "language": "en", "subject": "pharmacology", "question": " Which drug reverses heparin? ",
         "options": {"A": "Vitamin K", "B": "Protamine sulfate", "C": "Idarucizumab", "D": "Flumazenil"}, "answer": "B"},
        {"id": "mc-2", "language": "zh", "subject": "", "question": "下列哪些属于β受体阻滞剂？",
         "options": ["美托洛尔", "氨氯地平", "比索洛尔", "普萘洛尔"], "answer": "ACD"},
        {"id": 3, "question": "Which are loop diuretics?", "options": {"A": "Furosemide", "B": "Bumetanide", "C": "Spironolactone"},
         "answer": ["A", "B"], "context": "Loop diuretics act on the thick ascending limb."},
    )
    questions = load_choice_questions(path)
    assert questions[0] == ChoiceQuestion(
        question="Which drug reverses heparin?",
        options={"A": "Vitamin K", "B": "Protamine sulfate", "C": "Idarucizumab", "D": "Flumazenil"},
        answer=frozenset("B"), subject="pharmacology", source=f"{path}:1", id="mc-1")
    assert questions[1].options == {"A": "美托洛尔", "B": "氨氯地平", "C": "比索洛尔", "D": "普萘洛尔"}
    assert questions[1].answer == frozenset("ACD") and questions[1].subject == "general"
    assert questions[2].answer == frozenset("AB") and questions[2].id == "3" and questions[2].source == f"{path}:3"
    assert questions[2].context == "Loop diuretics act on the thick ascending limb."


# --- MedQA ----------------------------------------------------------------------------------------------

MEDQA = [
    {"question": "A 24-year-old pregnant woman at 10 weeks' gestation has burning on urination. Urine culture grows "
                 "Escherichia coli. Which is the most appropriate treatment?",
     "answer": "Nitrofurantoin",
     "options": {"A": "Doxycycline", "B": "Ciprofloxacin", "C": "Nitrofurantoin", "D": "Trimethoprim-sulfamethoxazole"},
     "meta_info": "step2&3", "answer_idx": "C",
     "metamap_phrases": ["24 year old pregnant woman", "burning on urination"]},
    {"question": "Which enzyme is deficient in classic phenylketonuria?",
     "answer": "Phenylalanine hydroxylase",
     "options": {"A": "Tyrosinase", "B": "Phenylalanine hydroxylase", "C": "Homogentisate oxidase",
                 "D": "Dihydropteridine reductase", "E": "Fumarylacetoacetase"},
     "meta_info": "step1", "answer_idx": "B"},
]


def test_medqa(tmp_path):
    path = write_jsonl(tmp_path / "phrases_no_exclude_test.jsonl", *MEDQA)
    first, second = load_choice_questions(path)
    assert first.question.startswith("A 24-year-old pregnant woman") and first.question.endswith("treatment?")
    assert first.options == MEDQA[0]["options"]
    assert (first.answer, first.subject, first.source, first.context) == (frozenset("C"), "step2&3", f"{path}:1", "")
    assert (second.answer, second.subject, second.source) == (frozenset("B"), "step1", f"{path}:2")
    assert list(second.options) == ["A", "B", "C", "D", "E"]


def test_medqa_answer_text_only_and_no_meta_info(tmp_path):
    record = {key: value for key, value in MEDQA[1].items() if key not in ("answer_idx", "meta_info")}
    path = write_jsonl(tmp_path / "medqa.jsonl", record)
    (question,) = load_choice_questions(path, "medqa")
    assert question.answer == frozenset("B") and question.subject == "medqa"
    path = write_jsonl(tmp_path / "medqa_bad.jsonl", {**record, "answer": "Galactokinase"})
    assert error_text(path, "medqa") == f"{path}:1: answer 'Galactokinase' is not the text of any option"


def test_medqa_answer_idx_outside_the_options(tmp_path):
    path = write_jsonl(tmp_path / "medqa.jsonl", MEDQA[1], {**MEDQA[0], "answer_idx": "E"})
    assert error_text(path) == f"{path}:2: answer letter 'E' is not one of the options A-D"


# --- MedMCQA --------------------------------------------------------------------------------------------

def medmcqa(cop, **extra):
    return {"id": "e9ad821a-c438-4965-9f77-760819dfa155", "question": "Drug of choice for absence seizures in a child is:",
            "opa": "Phenytoin", "opb": "Ethosuximide", "opc": "Carbamazepine", "opd": "Phenobarbitone", "cop": cop,
            "choice_type": "single", "exp": "Ethosuximide is the first choice for typical absence seizures.",
            "subject_name": "Pharmacology", "topic_name": "Antiepileptics", **extra}


def test_medmcqa_zero_based_hugging_face_copy(tmp_path):
    path = write_jsonl(tmp_path / "validation.jsonl", medmcqa(1), medmcqa(0, subject_name="Medicine"), medmcqa(3))
    questions = load_choice_questions(path)
    assert [q.answer for q in questions] == [frozenset("B"), frozenset("A"), frozenset("D")]
    assert questions[0] == ChoiceQuestion(
        question="Drug of choice for absence seizures in a child is:",
        options={"A": "Phenytoin", "B": "Ethosuximide", "C": "Carbamazepine", "D": "Phenobarbitone"},
        answer=frozenset("B"), subject="Pharmacology", source=f"{path}:1", id="e9ad821a-c438-4965-9f77-760819dfa155")
    assert questions[1].subject == "Medicine"


def test_medmcqa_one_based_original_release(tmp_path, caplog):
    path = write_jsonl(tmp_path / "dev.json", medmcqa(2), medmcqa(4))
    assert [q.answer for q in load_choice_questions(path)] == [frozenset("B"), frozenset("D")]
    # Neither 0 nor 4: read as the original 1-4, with a warning.
    path = write_jsonl(tmp_path / "dev_small.json", medmcqa(2), medmcqa(3))
    with caplog.at_level(logging.WARNING, logger="medgpt.eval_data"):
        assert [q.answer for q in load_choice_questions(path)] == [frozenset("B"), frozenset("C")]
    assert "reading them as 1-4" in caplog.text and path in caplog.text


def test_medmcqa_errors(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", medmcqa(0), medmcqa(4))
    assert error_text(path) == f"{path}: answers (cop) include both 0 and 4: cannot tell whether they count from 0 (Hugging Face copy) or from 1 (original release)"
    test_split = {key: value for key, value in medmcqa(0).items() if key != "cop"}
    path = write_jsonl(tmp_path / "test.json", test_split)
    assert error_text(path).startswith(f"{path}:1: this file has no answers ('cop' is missing or -1")
    path = write_jsonl(tmp_path / "test_hf.jsonl", medmcqa(-1))
    assert "this file has no answers" in error_text(path)
    path = write_jsonl(tmp_path / "empty_option.jsonl", medmcqa(1), medmcqa(1, opc=" "))
    assert error_text(path) == f"{path}:2: option 'C' is empty"


# --- PubMedQA -------------------------------------------------------------------------------------------

PQAL = {
    "21645374": {
        "QUESTION": "Do mitochondria play a role in remodelling lace plant leaves during programmed cell death?",
        "CONTEXTS": ["Programmed cell death (PCD) forms perforations in lace plant leaves.",
                     "Mitochondrial dynamics were imaged in cells at the window edge."],
        "LABELS": ["BACKGROUND", "RESULTS"], "MESHES": ["Mitochondria"], "YEAR": "2011",
        "reasoning_required_pred": "yes", "reasoning_free_pred": "yes", "final_decision": "yes",
        "LONG_ANSWER": "Mitochondria take part in the remodelling."},
    "16418930": {
        "QUESTION": "Does oral aspirin prevent deep vein thrombosis after knee arthroscopy?",
        "CONTEXTS": ["Patients were randomised to aspirin or no treatment after arthroscopy."],
        "LABELS": ["METHODS"], "MESHES": ["Aspirin"], "YEAR": "2006",
        "reasoning_required_pred": "no", "reasoning_free_pred": "no", "final_decision": "maybe",
        "LONG_ANSWER": "The trial was too small to tell."},
}


def test_pubmedqa_original_file(tmp_path):
    path = write_text(tmp_path / "ori_pqal.json", json.dumps(PQAL, indent=4))
    first, second = load_choice_questions(path)
    assert first == ChoiceQuestion(
        question="Do mitochondria play a role in remodelling lace plant leaves during programmed cell death?",
        options={"A": "yes", "B": "no", "C": "maybe"}, answer=frozenset("A"), subject="pubmedqa",
        source=f"{path}:2",
        context="Programmed cell death (PCD) forms perforations in lace plant leaves.\n"
                "Mitochondrial dynamics were imaged in cells at the window edge.",
        id="21645374")
    # Each question at the line of its pmid: the first record's indented JSON takes lines 2-20.
    assert (second.id, second.answer, second.source) == ("16418930", frozenset("C"), f"{path}:21")
    assert json.dumps(PQAL, indent=4).splitlines()[20].startswith('    "16418930": {')


def test_pubmedqa_json_lines(tmp_path):
    record = {"pubid": 25429730, "question": "Is a high body mass index linked to worse asthma control in adults?",
              "context": {"contexts": ["Adults with asthma were followed for a year.", "Control was scored with ACT."],
                          "labels": ["METHODS", "RESULTS"], "meshes": ["Asthma", "Obesity"]},
              "long_answer": "Obesity was associated with poorer control.", "final_decision": "yes"}
    path = write_jsonl(tmp_path / "pqa_labeled.jsonl", record, {**record, "pubid": 1, "final_decision": "no"})
    first, second = load_choice_questions(path)
    assert (first.question, first.id, first.answer, first.source) == (record["question"], "25429730", frozenset("A"), f"{path}:1")
    assert first.context == "Adults with asthma were followed for a year.\nControl was scored with ACT."
    assert (second.answer, second.source, second.subject) == (frozenset("B"), f"{path}:2", "pubmedqa")
    path = write_jsonl(tmp_path / "bad.jsonl", {**record, "final_decision": "probably"})
    assert error_text(path) == f"{path}:1: final_decision must be yes, no or maybe, got 'probably'"


# --- CMExam ---------------------------------------------------------------------------------------------

CMEXAM = (
    "Question,Options,Answer,Explanation,Disease Group,Clinical Department,Medical Discipline,Competency Area,Difficulty level\n"
    '急性心肌梗死最早升高的心肌损伤标志物是,"A 肌红蛋白\nB．肌钙蛋白I\nC、CK-MB\nD：乳酸脱氢酶\nE:天冬氨酸转氨酶",A,'
    "肌红蛋白在发病后2小时内即升高,循环系统疾病,内科,临床医学,医学知识,中等\n"
    '下列属于肝硬化失代偿期表现的有,"A.腹水\nB 脾大\nC 食管胃底静脉曲张\nD 肝掌",ABCD,,消化系统疾病,,临床医学,医学知识,难\n'
    '糖尿病的典型症状不包括,"A 多饮\nB 多尿\nC 体重增加",C,,,,,,易\n'
)


def test_cmexam_options_cell_and_several_answers(tmp_path):
    path = write_text(tmp_path / "cmexam_test.csv", CMEXAM)
    first, second, third = load_choice_questions(path)
    assert first == ChoiceQuestion(
        question="急性心肌梗死最早升高的心肌损伤标志物是",
        options={"A": "肌红蛋白", "B": "肌钙蛋白I", "C": "CK-MB", "D": "乳酸脱氢酶", "E": "天冬氨酸转氨酶"},
        answer=frozenset("A"), subject="内科", source=f"{path}:2")
    # The first row's options cell spans lines 2-6: the next row starts on line 7.
    assert second.options == {"A": "腹水", "B": "脾大", "C": "食管胃底静脉曲张", "D": "肝掌"}
    assert (second.answer, second.subject, second.source) == (frozenset("ABCD"), "临床医学", f"{path}:7")
    assert (third.answer, third.subject, third.source) == (frozenset("C"), "cmexam", f"{path}:11")


def test_cmexam_bad_option_line(tmp_path):
    header = CMEXAM.splitlines()[0]
    path = write_text(tmp_path / "bad.csv", header + '\n问题,"A 甲\n乙",A,,,,,,\n')
    assert error_text(path) == f"{path}:2: cannot read the option line '乙' (expected a letter and its text, such as 'A 肝脏')"


# --- C-Eval and CMMLU -------------------------------------------------------------------------------------

CEVAL_VAL = (
    "id,question,A,B,C,D,answer\n"
    "0,治疗肺炎链球菌肺炎的首选药物是____,青霉素,庆大霉素,甲硝唑,氟康唑,A\n"
    '1,"下列关于消化性溃疡的叙述,正确的是____",十二指肠溃疡好发于球部,胃溃疡多见于青年,两者均与幽门螺杆菌无关,溃疡不会出血,A\n'
)
CEVAL_DEV = (
    "id,question,A,B,C,D,answer,explanation\n"
    "0,成人正常空腹血糖为____,3.9~6.1 mmol/L,6.1~7.0 mmol/L,7.0~11.1 mmol/L,大于11.1 mmol/L,A,正常空腹血糖为3.9~6.1 mmol/L。\n"
)


def test_ceval_folder_subject_from_file_name(tmp_path):
    write_text(tmp_path / "ceval" / "val" / "clinical_medicine_val.csv", CEVAL_VAL)
    write_text(tmp_path / "ceval" / "dev" / "physician_dev.csv", CEVAL_DEV)
    questions = load_choice_questions(str(tmp_path / "ceval"))
    dev_path, val_path = str(tmp_path / "ceval" / "dev" / "physician_dev.csv"), str(tmp_path / "ceval" / "val" / "clinical_medicine_val.csv")
    assert [q.source for q in questions] == [f"{dev_path}:2", f"{val_path}:2", f"{val_path}:3"]
    assert questions[0].subject == "physician" and questions[0].options["A"] == "3.9~6.1 mmol/L"
    assert questions[1] == ChoiceQuestion(
        question="治疗肺炎链球菌肺炎的首选药物是____",
        options={"A": "青霉素", "B": "庆大霉素", "C": "甲硝唑", "D": "氟康唑"},
        answer=frozenset("A"), subject="clinical_medicine", source=f"{val_path}:2", id="0")
    assert questions[2].question == "下列关于消化性溃疡的叙述,正确的是____"


def test_ceval_test_split_has_no_answers(tmp_path):
    path = write_text(tmp_path / "clinical_medicine_test.csv",
                      "id,question,A,B,C,D,answer\n0,问题一,甲,乙,丙,丁,\n1,问题二,甲,乙,丙,丁,\n")
    assert error_text(path) == f"{path}:2: this file has no answers (C-Eval's test split has none): use the val or dev split"


def test_cmmlu_unnamed_index_column(tmp_path):
    path = write_text(tmp_path / "cmmlu" / "clinical_knowledge.csv", (
        ",Question,A,B,C,D,Answer\n"
        "0,人体最大的消化腺是,胰腺,肝脏,胃腺,唾液腺,B\n"
        "1,缺乏维生素D可导致,夜盲症,坏血病,佝偻病,脚气病,C\n"))
    first, second = load_choice_questions(str(tmp_path / "cmmlu"))
    assert first == ChoiceQuestion(question="人体最大的消化腺是", options={"A": "胰腺", "B": "肝脏", "C": "胃腺", "D": "唾液腺"},
                                   answer=frozenset("B"), subject="clinical_knowledge", source=f"{path}:2", id="0")
    assert (second.answer, second.source) == (frozenset("C"), f"{path}:3")


# --- detection --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("first_record, fmt", [
    ({"id": "1", "language": "en", "subject": "x", "question": "q", "options": {"A": "a", "B": "b"}, "answer": "A"}, "native"),
    ({"id": "1", "question": "q", "options": ["a", "b"], "answer": "A"}, "native"),
    (MEDQA[0], "medqa"),
    (medmcqa(1), "medmcqa"),
    ({"pubid": 1, "question": "q", "context": {"contexts": []}, "final_decision": "yes"}, "pubmedqa"),
    (PQAL, "pubmedqa"),
    (dict.fromkeys(CMEXAM.splitlines()[0].split(","), ""), "cmexam"),
    (dict.fromkeys(["id", "question", "A", "B", "C", "D", "answer"], ""), "ceval"),
    (dict.fromkeys(["", "Question", "A", "B", "C", "D", "Answer"], ""), "cmmlu"),
])
def test_detect_choice_format(first_record, fmt):
    assert detect_choice_format("questions.jsonl", first_record) == fmt


def test_unrecognised_format(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", {"conversations": [{"from": "human", "value": "Hi"}]})
    message = error_text(path)
    assert message.startswith(f"{path}: cannot tell which multiple-choice format this file is in (first record's fields: 'conversations')")
    assert "--mc_format" in message and "native, medqa, medmcqa, pubmedqa, cmexam, ceval, cmmlu" in message


def test_unknown_format_name(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", MEDQA[0])
    assert "unknown multiple-choice format 'mmlu'" in error_text(path, "mmlu")


# --- bad input --------------------------------------------------------------------------------------------

GOOD = {"question": "Which vitamin deficiency causes scurvy?", "options": {"A": "Vitamin A", "B": "Vitamin C"}, "answer": "B"}


@pytest.mark.parametrize("change, message", [
    ({"options": {}}, "question has no options"),
    ({"options": None}, "question has no options"),
    ({"answer": "F"}, "answer letter 'F' is not one of the options A-B"),
    ({"answer": ""}, "question has no answer"),
    ({"answer": "1"}, "answer must be option letters such as \"B\" or \"ACD\", got '1'"),
    ({"options": {"A": "Vitamin A", "B": "Vitamin C", "C": "  "}}, "option 'C' is empty"),
    ({"options": {"A": "Vitamin A", "C": "Vitamin C"}}, "options must be consecutive letters from A, got A, C"),
    ({"options": list("abcdef")}, "more than 5 options"),
    ({"options": dict(zip("ABCDEF", "abcdef"))}, "more than 5 options"),
    ({"options": ["Vitamin C"], "answer": "A"}, "a question needs at least 2 options"),
    ({"options": "A. Vitamin A B. Vitamin C"}, "options must be an object of letter -> text or a list of texts, got str"),
    ({"question": "   "}, "empty question"),
    ({"question": ["Which", "vitamin"]}, "question must be text, got list"),
])
def test_bad_native_record(tmp_path, change, message):
    path = write_jsonl(tmp_path / "mc.jsonl", GOOD, {**GOOD, **change}, GOOD)
    assert error_text(path, "native") == f"{path}:2: {message}"


def test_malformed_json_invalid_utf8_and_non_objects(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", GOOD, '{"question": "Fever?", "options": ', GOOD)
    assert error_text(path) == f"{path}:2: malformed JSON: Expecting value at column 35"
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + json.dumps(GOOD).encode().replace(b"scurvy", b"scorbut\xe9") + b"\n")
    assert error_text(str(path)) == f"{path}:2: not valid UTF-8 text (save the file as UTF-8)"
    path = write_jsonl(tmp_path / "list.jsonl", GOOD, '["not", "an", "object"]')
    assert error_text(path) == f"{path}:2: a question must be a JSON object, got list"


def test_bad_csv(tmp_path):
    path = write_text(tmp_path / "short_row.csv", CEVAL_VAL + "2,只有三个选项,甲,乙,丙\n")
    assert error_text(path) == f"{path}:4: this row has 5 cells, the header has 7"
    path = write_text(tmp_path / "unclosed.csv", CEVAL_VAL + '2,"没有闭合的引号,甲,乙,丙,丁,A\n3,问题,甲,乙,丙,丁,B\n')
    assert error_text(path) == f"{path}:4: a quoted cell that starts in this row is never closed (a '\"' is missing)"
    path = tmp_path / "crlf.csv"
    path.write_bytes("id,question,A,B,C,D,answer\r\n0,\"贫血的定义是\r\n（成年男性）\",Hb<120 g/L,Hb<110 g/L,Hb<100 g/L,Hb<90 g/L,A\r\n"
                     "1,问题,甲,乙,丙,丁,B\r\n".encode())
    # Windows line ends: one line break inside the quoted cell, and the next row still on its own line.
    assert [(q.question, q.source) for q in load_choice_questions(str(path), "ceval")] == [
        ("贫血的定义是\n（成年男性）", f"{path}:2"), ("问题", f"{path}:4")]
    path = tmp_path / "gbk.csv"
    path.write_bytes(CEVAL_VAL.encode("gbk"))
    assert error_text(str(path)) == f"{path}:2: not valid UTF-8 text (save the file as UTF-8)"


@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("blank.json", "\n  \n"), ("array.json", "[]"), ("header.csv", "id,question,A,B,C,D,answer\n")])
def test_empty_file(tmp_path, name, text):
    path = write_text(tmp_path / name, text)
    assert error_text(path) == f"{path}: no questions in this file"


def test_missing_paths_and_unsupported_files(tmp_path):
    assert error_text(str(tmp_path / "absent")) == f"{tmp_path / 'absent'}: no such file or folder"
    (tmp_path / "empty_folder").mkdir()
    assert error_text(str(tmp_path / "empty_folder")) == f"{tmp_path / 'empty_folder'}: no .jsonl/.json/.csv files in this folder"
    path = write_text(tmp_path / "questions.txt", "What is a fever?\n")
    assert error_text(path) == f"{path}: questions must be in a .jsonl, .json, .csv file"


# --- open questions ---------------------------------------------------------------------------------------

def test_open_questions_key_variants(tmp_path):
    path = write_jsonl(
        tmp_path / "open.jsonl",
        {"id": "o1", "subject": "cardiology", "question": "What is a normal resting heart rate?", "reference": " 60-100 beats per minute. "},
        {"question": "高血压的诊断标准是什么？", "answer": "非同日三次测量收缩压≥140 mmHg和/或舒张压≥90 mmHg。"},
        {"question": "What does HbA1c measure?", "response": "Average blood glucose over about three months."},
        {"instruction": "Explain the term.", "input": "Tachycardia", "output": "A heart rate over 100 beats per minute."},
        {"instruction": "Name the first-line drug for anaphylaxis.", "input": "", "output": "Intramuscular adrenaline."},
    )
    questions = load_open_questions(path)
    assert questions[0] == OpenQuestion("What is a normal resting heart rate?", "60-100 beats per minute.", "cardiology", f"{path}:1", "o1")
    assert (questions[1].reference, questions[1].subject) == ("非同日三次测量收缩压≥140 mmHg和/或舒张压≥90 mmHg。", "general")
    assert questions[2].reference == "Average blood glucose over about three months."
    assert (questions[3].question, questions[3].reference) == ("Explain the term.\nTachycardia", "A heart rate over 100 beats per minute.")
    assert (questions[4].question, questions[4].source) == ("Name the first-line drug for anaphylaxis.", f"{path}:5")


def test_open_question_without_reference(tmp_path):
    path = write_jsonl(tmp_path / "open.jsonl", {"question": "Why wash hands?", "reference": "Germs."}, {"question": "What is a fever?"})
    with pytest.raises(InputError) as caught:
        load_open_questions(path)
    assert str(caught.value) == f'{path}:2: open question has no reference answer (add a "reference" field)'
