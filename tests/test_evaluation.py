"""evaluate_models.py: tiny local models and an OpenAI-speaking endpoint in one run, option scoring
against a plain forward pass, answer perplexity against the SFT trainer's own evaluation loss, bad input."""

import json
import math
import os
import socket

import pytest
import torch

import evaluate_models
from conftest import REPO, run_script, tiny_training_flags
from medgpt.eval_data import ChoiceQuestion
from medgpt.evaluation import chart_size, metric_table, score_choices_by_loglikelihood, summaries
from medgpt.generation import ChatModel, InferenceModelArguments
from openai_stub import StubEndpoint

CHOICE_RECORDS = [
    {"id": "c1", "subject": "cardiology", "question": "Which vessel brings oxygenated blood to the heart?",
     "options": {"A": "Pulmonary vein", "B": "Pulmonary artery", "C": "Superior vena cava"}, "answer": "A"},
    {"id": "c2", "subject": "pharmacology", "question": "Which are beta blockers? (Select all that apply.)",
     "options": {"A": "Metoprolol", "B": "Amlodipine", "C": "Atenolol", "D": "Lisinopril"}, "answer": "AC"},
    {"id": "c3", "subject": "nutrition", "question": "缺乏哪种维生素会导致坏血病？",
     "options": {"A": "维生素A", "B": "维生素C", "C": "维生素D", "D": "维生素K"}, "answer": "B"},
]
OPEN_RECORDS = [
    {"question": "What is a normal resting heart rate for adults?",
     "reference": "A normal resting heart rate for adults is 60 to 100 beats per minute."},
    {"question": "发烧时应该怎么办？", "reference": "发烧时应多喝水、注意休息，体温超过38.5度可服用退烧药。"},
]


@pytest.fixture(autouse=True)
def keep_pytests_log_handlers(monkeypatch):
    """main() run in this process must not replace the root log handlers that pytest's capture owns."""
    monkeypatch.setattr(evaluate_models, "setup_logging", lambda: None)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return str(path)


def stub_reply(question: str) -> str:
    """The stub endpoint's answer: the reference answer to an open question, "Answer: B" to the rest."""
    references = {record["question"]: record["reference"] for record in OPEN_RECORDS}
    return references.get(question, "Answer: B")


@pytest.fixture(scope="module")
def endpoint():
    with StubEndpoint(stub_reply, model_name="stub-doctor") as stub:
        yield stub


def test_two_local_models_and_an_endpoint_in_one_run(tiny_model_dir, random_adapter, endpoint, tmp_path):
    choice_file = write_jsonl(tmp_path / "mc.jsonl", CHOICE_RECORDS)
    open_file = write_jsonl(tmp_path / "open.jsonl", OPEN_RECORDS)
    out = tmp_path / "eval"
    evaluate_models.main([
        "--models", f"base={tiny_model_dir}", f"adapted={tiny_model_dir}+{random_adapter}",
        "--api_base", endpoint.url, "--api_key", "secret", "--api_models", "reference=stub-doctor",
        "--mc_file", choice_file, "--open_file", open_file,
        "--ppl_conversation_file", os.path.join(REPO, "data", "eval", "finetune"), "--max_questions", "4",
        "--template_name", "chatml", "--max_new_tokens", "8", "--latency_questions", "1", "--output_dir", str(out),
        "--mc_method", "both", "--mc_max_new_tokens", "6",
    ])
    document = json.loads((out / "results.json").read_text(encoding="utf-8"))
    models = document["models"]
    assert list(models) == ["base", "adapted", "reference"]
    assert "api_key" not in document["settings"]

    # The endpoint answered "Answer: B" to every question: right only for the vitamin C one.
    reference = models["reference"]
    assert reference["kind"] == "endpoint"
    assert reference["multiple_choice"]["acc_generated"]["accuracy"] == pytest.approx(100 / 3)
    assert reference["multiple_choice"]["acc_generated"]["by_subject"] == {"cardiology": 0.0, "nutrition": 100.0,
                                                                           "pharmacology": 0.0}
    assert reference["multiple_choice"]["extraction_failure_rate"] == 0.0
    assert [row["extracted"] for row in reference["per_question"]["multiple_choice"]] == ["B", "B", "B"]
    assert "acc" not in reference["multiple_choice"]  # no log-likelihoods from an endpoint
    # ... and the reference answer to every open question: every overlap metric is perfect.
    for name in ("bleu4", "rouge1", "rouge2", "rougeL", "token_f1"):
        assert reference["open"][name] == pytest.approx(100.0)
    assert reference["open"]["first_token_seconds"] > 0
    assert "perplexity" not in reference
    assert endpoint.server.requests[-1]["temperature"] == 0

    for label in ("base", "adapted"):
        result = models[label]
        rows = result["per_question"]["multiple_choice"]
        assert [row["answer"] for row in rows] == ["A", "AC", "B"]
        # A single-answer question has one candidate per option, a multiple-answer one every set of 2+.
        assert [len(row["loglikelihoods"]) for row in rows] == [3, 11, 4]
        assert result["multiple_choice"]["acc"]["accuracy"] == pytest.approx(100 * sum(r["acc"] for r in rows) / 3)
        for row in rows:
            best = max(row["loglikelihoods"], key=row["loglikelihoods"].get)
            assert row["predicted"] == best and row["acc"] == (best == row["answer"])
        # --mc_method both: the same questions also answered in words, their letters read back
        for row in rows:
            extracted = set(row["extracted"] or "")
            assert isinstance(row["generated"], str) and row["acc_generated"] == (extracted == set(row["answer"]))
        failures = 100 * sum(row["extracted"] is None for row in rows) / 3
        assert result["multiple_choice"]["extraction_failure_rate"] == pytest.approx(failures)
        assert len(result["per_question"]["open"]) == 2
        assert result["perplexity"]["answers"]["perplexity"] > 1
    # The adapter changes the model, so it changes the scores.
    assert (models["base"]["per_question"]["multiple_choice"][0]["loglikelihoods"]
            != models["adapted"]["per_question"]["multiple_choice"][0]["loglikelihoods"])

    table = (out / "results.md").read_text(encoding="utf-8")
    assert table.startswith("| metric | base | adapted | reference |\n")
    rouge_row = next(line for line in table.splitlines() if line.startswith("| Open questions: ROUGE-L F1 |"))
    assert rouge_row.endswith("| 100.0 |")
    perplexity_row = next(line for line in table.splitlines() if line.startswith("| Perplexity: answers"))
    assert perplexity_row.endswith("| – |")
    assert "jieba" in table

    from PIL import Image

    with Image.open(out / "comparison.png") as image:
        image.verify()
    with Image.open(out / "comparison.png") as image:
        assert image.format == "PNG"
        assert image.size == chart_size(len(metric_table(summaries(models)))) == (1200, 1500)


def test_option_loglikelihoods_equal_a_plain_forward_pass(tiny_model_dir):
    """The cached-prompt scoring gives each option the log-likelihood a full forward pass gives it; a
    question whose right answer is the most likely option is scored right."""
    chat_model = ChatModel(InferenceModelArguments(base_model=tiny_model_dir, template_name="chatml"))
    options = {"A": "Rest and fluids", "B": "Antibiotics at once", "C": "An urgent chest X-ray"}
    question = ChoiceQuestion("What helps a common cold?", options, frozenset("A"), "general", "test:1")
    tokenizer, model = chat_model.tokenizer, chat_model.model
    prompt = chat_model.chat_format.render([{"role": "user", "content": "What helps a common cold?\nA. Rest and "
                                             "fluids\nB. Antibiotics at once\nC. An urgent chest X-ray"}],
                                           add_generation_prompt=True)
    plain = {}
    for letter, text in options.items():
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + answer_ids])).logits[0].float()
        log_probs = torch.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)
        plain[letter] = log_probs[torch.arange(len(answer_ids)), torch.tensor(answer_ids)].sum().item()
    best = max(plain, key=plain.get)
    question = ChoiceQuestion(question.question, options, frozenset(best), "general", "test:1")
    (row,) = score_choices_by_loglikelihood(chat_model, [question], batch_size=2)
    assert row["loglikelihoods"] == pytest.approx(plain, abs=1e-3)
    assert row["predicted"] == best and row["acc"] is True


def test_answer_perplexity_is_exp_of_the_sft_trainers_evaluation_loss(tiny_model_dir, tmp_path):
    validation = os.path.join(REPO, "data", "eval", "finetune")
    trained = tmp_path / "sft"
    result = run_script(
        "supervised_finetuning.py", "--model_name_or_path", tiny_model_dir, "--train_file_dir",
        os.path.join(REPO, "data", "finetune"), "--validation_file_dir", validation, "--template_name", "chatml",
        "--use_peft", "False", "--model_max_length", "384", "--per_device_eval_batch_size", "64",
        *tiny_training_flags(trained, steps=2),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    eval_loss = json.loads((trained / "all_results.json").read_text())["eval_loss"]
    out = tmp_path / "eval"
    evaluate_models.main(["--models", str(trained), "--ppl_conversation_file", validation, "--max_length", "384",
                          "--output_dir", str(out)])
    found = json.loads((out / "results.json").read_text())["models"]["sft"]["perplexity"]["answers"]["perplexity"]
    assert found == pytest.approx(math.exp(eval_loss), rel=0.01)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("case", ["no options", "letter out of range", "no reference", "unreachable endpoint",
                                  "missing model", "results already there"])
def test_bad_input_is_one_line_with_exit_status_2(case, tiny_model_dir, tmp_path, capsys):
    choice = dict(CHOICE_RECORDS[0])
    flags = ["--models", tiny_model_dir, "--output_dir", str(tmp_path / "eval")]
    if case == "no options":
        del choice["options"]
        expected = f"{tmp_path / 'mc.jsonl'}:2: "
    elif case == "letter out of range":
        choice["answer"] = "D"
        expected = f"{tmp_path / 'mc.jsonl'}:2: "
    mc_file = write_jsonl(tmp_path / "mc.jsonl", [CHOICE_RECORDS[1], choice])
    flags += ["--mc_file", mc_file]
    if case == "no reference":
        open_file = write_jsonl(tmp_path / "open.jsonl", [OPEN_RECORDS[0], {"question": "What is a fever?"}])
        flags += ["--open_file", open_file]
        expected = f"{open_file}:2: "
    elif case == "unreachable endpoint":
        address = f"http://127.0.0.1:{_free_port()}/v1"
        flags += ["--api_base", address, "--api_models", "doctor"]
        expected = f"{address}: cannot reach the endpoint"
    elif case == "missing model":
        flags[1] = str(tmp_path / "no-such-model")
        expected = "no-such-model"
    elif case == "results already there":
        (tmp_path / "eval").mkdir()
        (tmp_path / "eval" / "results.json").write_text("{}")
        expected = "already holds evaluation results"
    with pytest.raises(SystemExit) as stop:
        evaluate_models.main(flags)
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and expected in error[0], error
    if case == "results already there":
        assert (tmp_path / "eval" / "results.json").read_text() == "{}"


def test_a_model_given_nothing_it_can_be_scored_on_is_refused_before_any_work(endpoint, tmp_path, capsys):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("Hypertension raises the risk of stroke.\n", encoding="utf-8")
    with pytest.raises(SystemExit) as stop:
        evaluate_models.main(["--api_base", endpoint.url, "--api_models", "stub-doctor", "--ppl_text_file", str(text_file),
                              "--output_dir", str(tmp_path / "eval")])
    assert stop.value.code == 2
    assert "model 'stub-doctor' is an endpoint model: it is scored on --mc_file, --open_file" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_a_reward_model_is_scored_on_preference_pairs(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward_dir = tmp_path / "rm"
    torch.manual_seed(3)
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(reward_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None  # the template comes from --template_name
    tokenizer.save_pretrained(reward_dir)
    out = tmp_path / "eval"
    evaluate_models.main(["--models", f"rm={reward_dir}", "--preference_file",
                          os.path.join(REPO, "data", "reward", "medical_preference.jsonl"), "--max_questions", "6",
                          "--template_name", "chatml", "--output_dir", str(out)])
    result = json.loads((out / "results.json").read_text(encoding="utf-8"))["models"]["rm"]
    pairs = result["per_question"]["preference"]
    assert result["kind"] == "reward model" and len(pairs) == 6
    margins = [pair["chosen_score"] - pair["rejected_score"] for pair in pairs]
    assert result["reward"]["accuracy"] == pytest.approx(100 * sum(m > 0 for m in margins) / 6)
    assert result["reward"]["mean_margin"] == pytest.approx(sum(margins) / 6, abs=1e-3)
    assert len(set(margins)) == 6  # a real score per pair, not a constant
    assert "| Reward model: pairwise accuracy (%) |" in (out / "results.md").read_text(encoding="utf-8")


def test_a_model_without_a_chat_template_needs_one_named(tiny_model_dir, random_adapter, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medgpt.errors import InputError
    from medgpt.evaluation import parse_model_specs

    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(bare)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(bare)
    with pytest.raises(InputError, match="model 'base': the model has no chat_template") as error:
        parse_model_specs([f"base={bare}"], [])
    assert error.value.path == str(bare)
    specs = parse_model_specs([f"base={bare}", f"tuned={tiny_model_dir}"], [], default_template="chatml")
    assert [spec.template for spec in specs] == ["chatml", "auto"]  # a model's own template comes first
    assert parse_model_specs([f"tuned={tiny_model_dir}"], [], template_name="llama3")[0].template == "llama3"
    with pytest.raises(InputError, match="LoRA adapter folder: give it with its base model"):
        parse_model_specs([random_adapter], [])
