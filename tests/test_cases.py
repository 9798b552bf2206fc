"""Case synthesis from a knowledge graph: deterministic for a seed, consistent with the graph, checked
input, optional rephrasing that never loses a finding."""

import json
import os
import sys

import pytest

from conftest import REPO
from medgpt.cases import keeps_findings, load_knowledge_graph, synthesize_cases
from openai_stub import StubEndpoint

sys.path.insert(0, os.path.join(REPO, "tools"))
import synthesize_cases as tool  # noqa: E402

SHIPPED_GRAPH = os.path.join(REPO, "data", "knowledge_graph", "rare_diseases.json")


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream]


def test_the_same_seed_gives_the_same_cases_and_another_seed_others(tmp_path):
    outputs = {}
    for name, seed in (("first", "7"), ("again", "7"), ("other", "8")):
        outputs[name] = tmp_path / f"{name}.jsonl"
        tool.main(["--output_file", str(outputs[name]), "--cases_per_disease", "3", "--seed", seed])
    first = read_jsonl(outputs["first"])
    assert first == read_jsonl(outputs["again"])
    assert len(first) == 6 * 2 * 3
    other = read_jsonl(outputs["other"])
    assert [record["case_id"] for record in other] == [record["case_id"] for record in first]
    assert sum(a != b for a, b in zip(first, other)) > len(first) // 2


def test_every_case_agrees_with_its_disease_in_the_graph():
    diseases = {disease.id: disease.fields for disease in load_knowledge_graph(SHIPPED_GRAPH)}
    cases = synthesize_cases(list(load_knowledge_graph(SHIPPED_GRAPH)), 12, ["en", "zh"], seed=42)
    for case in cases:
        disease, language = diseases[case.disease], case.language
        assert disease["name"][language] in case.assessment
        if language == "zh":
            sex = "female" if case.presentation.startswith("患者信息：女") else "male"
            age = int(case.presentation.split("岁")[0].split("，")[-1])
        else:
            age = int(case.presentation.split("-year-old")[0].split()[-1])
            sex = "female" if ("-year-old woman" in case.presentation or "-year-old girl" in case.presentation) else "male"
            assert ("-year-old boy" in case.presentation or "-year-old girl" in case.presentation) == (age < 18)
        assert disease["onset_age"][0] <= age <= disease["onset_age"][1]
        for test in disease["tests"]:
            shown = f"{test['name'][language]}{'：' if language == 'zh' else ': '}{test['result'][language]}"
            applies = test.get("sex") in (None, sex) and age >= test.get("min_age", 0)
            if not applies:  # another sex's result, or a finding of adults in a child
                assert shown not in case.presentation
            elif test.get("key"):  # the results the diagnosis rests on are always given, and cited
                assert shown in case.presentation
                assert test["result"][language] in case.assessment
        symptoms = [symptom[language] for symptom in disease["symptoms"] if symptom[language] in case.presentation]
        assert len(symptoms) == 3
        assert disease["specialist"][language] in case.assessment
    fabry_women = [case for case in cases if case.disease == "fabry_disease"
                   and ("-year-old woman" in case.presentation or "-year-old girl" in case.presentation)]
    assert fabry_women and all("below 5% of normal" not in case.presentation for case in fabry_women)
    assert all("GLA gene testing: a disease-causing variant" in case.presentation for case in fabry_women)


def write_graph(tmp_path, transform) -> str:
    with open(SHIPPED_GRAPH, encoding="utf-8") as stream:
        graph = json.load(stream)
    transform(graph)
    path = tmp_path / "graph.json"
    path.write_text(json.dumps(graph, ensure_ascii=False, indent=2), encoding="utf-8")
    return str(path)


def disease_line(path: str, disease_id: str) -> int:
    """The line where a disease's object starts (the "{" before its id)."""
    lines = open(path, encoding="utf-8").read().split("\n")
    id_line = next(number for number, line in enumerate(lines, 1) if f'"id": "{disease_id}"' in line)
    return max(number for number in range(1, id_line + 1) if lines[number - 1].strip() == "{")


@pytest.mark.parametrize("transform, message", [
    (lambda graph: graph["diseases"][2].pop("tests"), "disease 'fabry_disease' has no \"tests\" list"),
    (lambda graph: graph["diseases"][2]["symptoms"][1].pop("zh"), "disease 'fabry_disease': symptoms[1] has no \"zh\" text"),
    (lambda graph: graph["diseases"][2]["tests"][0].pop("result"), "disease 'fabry_disease': tests[0] has no \"result\""),
    (lambda graph: graph["diseases"][2].update(onset_age=[30, 8]), "\"onset_age\" must be [youngest, oldest]"),
    (lambda graph: [test.pop("key", None) for test in graph["diseases"][2]["tests"]], "no test is marked \"key\": true"),
])
def test_a_knowledge_graph_with_a_bad_field_names_its_disease_line_and_field(tmp_path, capsys, transform, message):
    graph = write_graph(tmp_path, transform)
    output = tmp_path / "cases.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--knowledge_graph", graph, "--output_file", str(output)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: {graph}:{disease_line(graph, 'fabry_disease')}: ")
    assert message in error
    assert not output.exists()


def test_broken_json_and_an_existing_output_are_refused(tmp_path, capsys):
    broken = tmp_path / "graph.json"
    broken.write_text('{"diseases": [\n  {"id": "x",\n', encoding="utf-8")
    with pytest.raises(SystemExit):
        tool.main(["--knowledge_graph", str(broken), "--output_file", str(tmp_path / "out.jsonl")])
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {broken}:3: not valid JSON")
    existing = tmp_path / "cases.jsonl"
    existing.write_text("old\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        tool.main(["--output_file", str(existing)])
    assert "already holds results" in capsys.readouterr().err
    assert existing.read_text(encoding="utf-8") == "old\n"
    graph_copy = tmp_path / "graph.jsonl"
    graph_copy.write_text(open(SHIPPED_GRAPH, encoding="utf-8").read(), encoding="utf-8")
    with pytest.raises(SystemExit):
        tool.main(["--knowledge_graph", str(graph_copy), "--output_file", str(graph_copy), "--overwrite", "True"])
    assert "--output_file is one of the input files" in capsys.readouterr().err
    assert graph_copy.read_text(encoding="utf-8") == open(SHIPPED_GRAPH, encoding="utf-8").read()


def test_a_rewrite_is_used_only_when_it_keeps_every_finding(tmp_path):
    assert keeps_findings("Patient: 19-year-old man. Test results: sodium: 124 mmol/L.",
                          "A 19-year-old man was referred; his sodium was 124 mmol/L on testing.")
    assert not keeps_findings("Patient: 19-year-old man. Test results: sodium: 124 mmol/L.",
                              "A young man was referred with low sodium of 124 mmol/L on testing today.")
    assert not keeps_findings("Patient: 3-year-old boy, 2 signs. Test results: copper 250 µg/24 h.",
                              "A 35-year-old man, 2 signs, with urinary copper of 250 µg/24 h on testing.")

    def reply(prompt: str) -> str:
        presentation = prompt.split("\n\n", 1)[1]
        if "Wilson" in presentation or "肝" in presentation or "woman" in presentation:
            return "A patient with some findings."  # loses every number
        return "Referral note. " + presentation

    output = tmp_path / "cases.jsonl"
    with StubEndpoint(reply) as stub:
        tool.main(["--output_file", str(output), "--cases_per_disease", "2", "--language", "en", "--rephrase", "True",
                   "--api_base", stub.url, "--model", "m"])
        assert len(stub.server.requests) == 12
    records = read_jsonl(output)
    presentations = [record["conversations"][0]["value"] for record in records]
    rephrased = [text for text in presentations if text.startswith("Referral note. ")]
    assert 0 < len(rephrased) < len(records)
    assert all(text.startswith(("Referral note. ", "Patient: ")) for text in presentations)
