"""tools/extend_tokenizer.py: a medical vocabulary learned from a corpus, appended to a byte-level BPE, and
the tiny model's embeddings grown to match; then trained with pretraining.py."""

import importlib.util
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_script, tiny_training_flags

tool_spec = importlib.util.spec_from_file_location("extend_tokenizer", os.path.join(REPO, "tools", "extend_tokenizer.py"))
extend_tokenizer = importlib.util.module_from_spec(tool_spec)
tool_spec.loader.exec_module(extend_tokenizer)

CHINESE_TERMS = ["高血压", "糖尿病", "心肌梗死", "冠心病", "脑卒中", "慢性肾病"]
CHINESE_TEMPLATES = [
    "{}患者需要定期复查，必要时在医生指导下调整用药。",
    "预防{}要坚持低盐饮食和规律运动。",
    "医生说我可能有{}，应该做哪些检查？",
    "{}的早期症状并不明显，容易被忽视。",
    "家族中有人患{}时，更要关注自己的健康。",
]
ENGLISH_TERMS = ["metformin", "atorvastatin", "levothyroxine", "echocardiography", "dyslipidemia"]
ENGLISH_TEMPLATES = [
    "Patients on {} should attend regular reviews with their doctor.",
    "Ask your doctor before you stop taking {} or change the dose.",
    "The nurse explained what {} means and why it matters.",
    "Side effects related to {} are usually mild and short-lived.",
]
CHINESE_NOTES = [template.format(term) for term in CHINESE_TERMS for template in CHINESE_TEMPLATES]
ENGLISH_NOTES = [template.format(term) for term in ENGLISH_TERMS for template in ENGLISH_TEMPLATES]
DIALOGUE = {"conversations": [
    {"from": "human", "value": "我有高血压和糖尿病，可以吃二甲双胍吗？"},
    {"from": "gpt", "value": "二甲双胍是糖尿病的常用药物，metformin is safe with high blood pressure; 请在医生指导下服用。"},
]}
REPEATS = 3  # 30 Chinese and 20 English notes, three times over: each term 12-15 times, in varied sentences
BASE_VOCAB = 49152  # SmolLM2's


def write_corpus(folder) -> str:
    """A corpus folder: plain text lines, {"text"} JSON lines (with two bad records) and conversations."""
    folder.mkdir()
    (folder / "notes_zh.txt").write_text("\n".join(CHINESE_NOTES * REPEATS) + "\n", encoding="utf-8")
    lines = [json.dumps({"text": text}, ensure_ascii=False) for text in ENGLISH_NOTES * REPEATS]
    lines += ['{"text": "unterminated', json.dumps({"text": "  "})]
    (folder / "notes_en.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "dialogues.jsonl").write_text(
        "\n".join([json.dumps(DIALOGUE, ensure_ascii=False)] * 2 * REPEATS) + "\n", encoding="utf-8")
    return str(folder)


def corpus_texts() -> list[str]:
    return CHINESE_NOTES + ENGLISH_NOTES + [turn["value"] for turn in DIALOGUE["conversations"]]


def extension_args(model_dir, corpus, output_dir, *extra) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--corpus", str(corpus), "--output_dir", str(output_dir),
            "--num_new_tokens", "150", "--vocab_size", "1500", "--min_frequency", "3", *extra]


@pytest.fixture(scope="module")
def extended(tiny_model_dir, tmp_path_factory):
    """The tiny model extended on the test corpus: (output folder, corpus folder, report)."""
    root = tmp_path_factory.mktemp("extension")
    corpus = write_corpus(root / "corpus")
    output = root / "extended"
    extend_tokenizer.main(extension_args(tiny_model_dir, corpus, output))
    with open(output / "extension_report.json", encoding="utf-8") as handle:
        return output, corpus, json.load(handle)


def test_report_lists_medical_terms_with_their_pieces_and_fewer_tokens(extended, tokenizer_dir):
    from transformers import AutoTokenizer

    output, _, report = extended
    assert report["base_vocab_size"] == BASE_VOCAB
    assert report["added"] == len(report["tokens"]) == 150  # the corpus offers more than the budget
    assert report["new_vocab_size"] == BASE_VOCAB + 150
    # 90 Chinese lines, 60 English records and 6 conversations (two texts each) kept; the bad records counted
    assert report["corpus"] == {"records_read": 158, "records_kept": 156,
                                "records_rejected": {"malformed JSON": 1, "empty text": 1}, "texts": 90 + 60 + 12}
    chosen = {token["text"]: token for token in report["tokens"] if not token["intermediate"]}
    for term in ("心肌梗死", "高血压", "糖尿病", " metformin", " atorvastatin", " echocardiography"):
        assert term in chosen, term
        assert chosen[term]["uses"] > 0 and chosen[term]["frequency"] >= 12, chosen[term]
    base = AutoTokenizer.from_pretrained(tokenizer_dir)
    for token in report["tokens"]:
        ids = base(token["text"], add_special_tokens=False)["input_ids"] if "\ufffd" not in token["text"] else None
        if ids is not None:  # whole characters: the pieces are what the base tokenizer makes of the text
            assert token["piece_ids"] == ids, token
            assert token["pieces"] == base.convert_ids_to_tokens(ids)
        assert len(token["pieces"]) >= 2 and token["tokens_saved"] == len(token["pieces"]) - 1
        assert "".join(token["pieces"]) == token["token"]
    # Steps towards longer tokens come before them, so that their merges exist when the longer ones' do.
    ids = {token["token"]: token["id"] for token in report["tokens"]}
    for token in report["tokens"]:
        assert all(ids.get(part, -1) < token["id"] for part in token["merge"])
    # Medical text needs fewer tokens: in the report, and counted here with both tokenizers.
    per_thousand = report["tokens_per_1000_characters"]
    assert per_thousand["after"] < 0.8 * per_thousand["before"]
    new = AutoTokenizer.from_pretrained(output)
    for text in corpus_texts():
        assert len(new(text, add_special_tokens=False)["input_ids"]) < len(base(text, add_special_tokens=False)["input_ids"]), text
    assert new.tokenize("心肌梗死") == ["å¿ĥèĤĮæ¢ĹæŃ»"]  # one token, where the base needs ten


def test_old_ids_kept_new_ids_contiguous_and_round_trip_lossless(extended, tokenizer_dir):
    from transformers import AutoTokenizer

    output, _, report = extended
    base, new = AutoTokenizer.from_pretrained(tokenizer_dir), AutoTokenizer.from_pretrained(output)
    old_vocab, new_vocab = base.get_vocab(), new.get_vocab()
    assert len(old_vocab) == BASE_VOCAB
    assert {token: new_vocab[token] for token in old_vocab} == old_vocab
    added = {token: index for token, index in new_vocab.items() if token not in old_vocab}
    assert sorted(added.values()) == list(range(BASE_VOCAB, BASE_VOCAB + 150))
    assert {token["token"]: token["id"] for token in report["tokens"]} == added
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(new, name) == getattr(base, name)
    samples = corpus_texts() + [
        "患者曾患急性心肌梗死，现服用metformin 500 mg bid。", "Ménière's disease, café-au-lait spots, naïve T cells",
        "  双空格  and\ttabs\n换行 😀 emoji ½", "<|im_start|>user\n高血压怎么办？<|im_end|>",
    ]
    for text in samples:
        ids = new(text, add_special_tokens=False)["input_ids"]
        assert new.decode(ids) == text
        # Appended merges only ever join base tokens: never more tokens than before.
        assert len(ids) <= len(base(text, add_special_tokens=False)["input_ids"])


def test_new_rows_are_the_mean_of_their_pieces_and_the_model_loads(extended, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output, _, report = extended
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    size = report["new_vocab_size"]
    assert len(tokenizer) == size == model.config.vocab_size == model.get_input_embeddings().weight.shape[0]
    old, new = base.get_input_embeddings().weight, model.get_input_embeddings().weight
    assert torch.equal(new[:BASE_VOCAB], old)
    for token in report["tokens"]:
        torch.testing.assert_close(new[token["id"]], old[token["piece_ids"]].mean(dim=0))
    assert model.get_output_embeddings().weight.data_ptr() == new.data_ptr()  # still tied
    ids = tokenizer("急性心肌梗死 metformin", return_tensors="pt")["input_ids"]
    assert int(ids.max()) >= BASE_VOCAB
    assert model(ids).logits.shape[-1] == size
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    assert os.path.isfile(output / "generation_config.json")
    assert not os.path.exists(output / ".partial")


def test_an_untied_head_and_padded_embeddings(tokenizer_dir, tmp_path):
    """Qwen's shape: an output head of its own, and embedding rows to spare beyond the vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = BASE_VOCAB + 64
    config = LlamaConfig(vocab_size=rows, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "untied")
    tokenizer.save_pretrained(tmp_path / "untied")
    corpus = write_corpus(tmp_path / "corpus")
    extend_tokenizer.main(extension_args(tmp_path / "untied", corpus, tmp_path / "out", "--num_new_tokens", "40"))
    base, model = AutoModelForCausalLM.from_pretrained(tmp_path / "untied"), AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with open(tmp_path / "out" / "extension_report.json", encoding="utf-8") as handle:
        report = json.load(handle)
    assert report["new_vocab_size"] == len(AutoTokenizer.from_pretrained(tmp_path / "out")) == BASE_VOCAB + 40
    # The spare rows hold the new tokens: nothing to resize.
    assert model.lm_head.weight.shape[0] == model.get_input_embeddings().weight.shape[0] == rows
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        old, new = base.get_parameter(name), model.get_parameter(name)
        assert torch.equal(new[:BASE_VOCAB], old[:BASE_VOCAB]) and torch.equal(new[BASE_VOCAB + 40:], old[BASE_VOCAB + 40:])
        for token in report["tokens"]:
            torch.testing.assert_close(new[token["id"]], old[token["piece_ids"]].mean(dim=0))


def test_pretraining_trains_the_new_embeddings_and_head(extended, tmp_path):
    output, corpus, report = extended
    out = tmp_path / "pt"
    result = run_script(
        "pretraining.py", "--model_name_or_path", str(output), "--train_file_dir", os.path.join(corpus, "notes_zh.txt"),
        "--block_size", "64", "--use_peft", "True", "--lora_rank", "4", "--modules_to_save", "embed_tokens,lm_head",
        *tiny_training_flags(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "trainer_state.json", encoding="utf-8") as handle:
        losses = [entry["loss"] for entry in json.load(handle)["log_history"] if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    adapter = load_file(out / "adapter_model.safetensors")
    saved = {name: tensor for name, tensor in adapter.items() if "lora_" not in name}
    assert sorted(saved) == ["base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"]
    size = report["new_vocab_size"]
    assert all(tensor.shape == (size, 64) for tensor in saved.values())
    start = load_file(output / "model.safetensors")["model.embed_tokens.weight"]
    new_ids = [token["id"] for token in report["tokens"]]
    # The Chinese notes use new tokens, so their embedding rows and the head's rows for them were trained.
    assert not torch.equal(saved["base_model.model.model.embed_tokens.weight"][new_ids], start[new_ids])
    assert not torch.equal(saved["base_model.model.lm_head.weight"][new_ids], start[new_ids])


def test_an_existing_model_folder_is_refused_before_any_work(extended, tiny_model_dir, tmp_path, capsys):
    output, corpus, _ = extended
    before = {name: os.path.getmtime(output / name) for name in os.listdir(output)}
    # The corpus does not even exist: the output folder is checked first.
    with pytest.raises(SystemExit) as exit_info:
        extend_tokenizer.main(extension_args(tiny_model_dir, tmp_path / "missing", output))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1  # before the corpus is read: no progress bar, no log
    assert error[0].startswith(f"error: {output}: --output_dir already holds a model (")
    assert error[0].endswith("pass --overwrite True to replace it")
    assert {name: os.path.getmtime(output / name) for name in os.listdir(output)} == before

    # With --overwrite True the same folder is replaced (here by a smaller extension).
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "notes.md"):
        (copy / name).write_bytes(b"{}" if name != "notes.md" else b"mine")
    extend_tokenizer.main(extension_args(tiny_model_dir, corpus, copy, "--num_new_tokens", "10", "--overwrite", "True"))
    with open(copy / "extension_report.json", encoding="utf-8") as handle:
        assert json.load(handle)["added"] == 10
    assert (copy / "notes.md").read_bytes() == b"mine"


def test_a_corpus_without_usable_text_is_a_one_line_error(tiny_model_dir, tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"text": ""}\n[1, 2]\n{"instruction": "only a question"}\nnot json\n', encoding="utf-8")
    output = tmp_path / "out"
    result = run_script("tools/extend_tokenizer.py", *extension_args(tiny_model_dir, corpus, output))
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"error: {corpus}: no usable text in the corpus (4 records read; rejected: 1 x empty text, "
                    "1 x not an object, 1 x empty turn, 1 x malformed JSON)")
    assert "Traceback" not in result.stderr
    assert not output.exists()


def test_a_corpus_with_nothing_new_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    corpus = tmp_path / "plain.txt"
    corpus.write_text("the patient is well and the doctor is happy\n" * 40, encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        extend_tokenizer.main(extension_args(tiny_model_dir, corpus, tmp_path / "out"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert [line for line in error if line.startswith("error:")] == error[-1:] == [
        f"error: {corpus}: no new tokens: every piece learned from the corpus is already a token of the base model "
        "(give more text, or lower --min_frequency)"]
    assert not (tmp_path / "out").exists()


def test_tokenizers_that_are_not_byte_level_bpe_are_refused_clearly():
    from medgpt.domain_tokenizer import check_byte_level_bpe
    from medgpt.errors import InputError

    byte_level = {"type": "ByteLevel", "add_prefix_space": False}
    metaspace = {"type": "Metaspace", "replacement": "▁"}
    cases = {
        "a WordPiece model": {"model": {"type": "WordPiece"}, "pre_tokenizer": byte_level, "decoder": byte_level},
        "a Unigram model": {"model": {"type": "Unigram"}, "pre_tokenizer": metaspace, "decoder": metaspace},
        "a SentencePiece-style (Metaspace) BPE": {"model": {"type": "BPE", "byte_fallback": True, "merges": []},
                                                  "pre_tokenizer": metaspace, "decoder": {"type": "Sequence", "decoders": [metaspace]}},
        "continuing_subword_prefix": {"model": {"type": "BPE", "continuing_subword_prefix": "##"},
                                      "pre_tokenizer": byte_level, "decoder": byte_level},
    }
    for expected, tokenizer_spec in cases.items():
        with pytest.raises(InputError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            check_byte_level_bpe(tokenizer_spec, "model")
    # Qwen's and Llama 3's: a regex split, then byte-level, in a Sequence
    check_byte_level_bpe({"model": {"type": "BPE"}, "decoder": byte_level, "pre_tokenizer": {
        "type": "Sequence", "pretokenizers": [{"type": "Split"}, dict(byte_level, use_regex=False)]}}, "model")


def test_special_tokens_after_the_bpe_vocabulary_keep_their_ids():
    """Qwen's layout: the special tokens' ids follow the BPE vocabulary and are not part of it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from medgpt import domain_tokenizer as dt

    texts = (CHINESE_NOTES + ENGLISH_NOTES) * REPEATS
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts[:20], trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                             show_progress=False))
    bpe.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    spec = json.loads(bpe.to_str())
    size = bpe.get_vocab_size(with_added_tokens=True)
    specials = {token["content"]: token["id"] for token in spec["added_tokens"]}
    assert all(token not in spec["model"]["vocab"] for token in specials) and max(specials.values()) == size - 1

    learned = dt.learn_domain_bpe(bpe, texts, 1000, 3, 24)
    extension = dt.choose_new_tokens(bpe, spec, dt.piece_frequencies(bpe, learned, texts), 50)
    extended = Tokenizer.from_str(json.dumps(dt.extended_tokenizer_json(spec, extension)))
    dt.check_extension(bpe, extended, extension)
    assert [token.id for token in extension.tokens] == list(range(size, size + 50))
    assert {token: extended.token_to_id(token) for token in specials} == specials
    first = next(token for token in extension.tokens if not token.intermediate)
    text = f"<|im_start|>{first.text}<|im_end|>"
    encoding = extended.encode(text)
    assert encoding.ids == [specials["<|im_start|>"], first.id, specials["<|im_end|>"]]
    assert extended.decode(encoding.ids, skip_special_tokens=False) == text
    assert sum(len(encoding.ids) for encoding in extended.encode_batch(texts)) < sum(
        len(encoding.ids) for encoding in bpe.encode_batch(texts))
