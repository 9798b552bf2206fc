"""Extending a model's tokenizer with a domain's vocabulary, and its embeddings to match.

A BPE vocabulary is learned on the domain corpus with the base tokenizer's own normalizer and
pre-tokenizer, so every learned piece is a string the base tokenizer could have produced. The pieces the
base tokenizer needs two or more tokens for, ranked by corpus frequency x tokens saved (per vocabulary
entry they take), become new tokens; the model's embedding rows for them start as the mean of the rows of
the pieces they replace.

How the new tokens enter the tokenizer: as BPE vocabulary entries with merges appended after the base
merges, not as "added tokens" (`tokenizer.add_tokens`). Added tokens are matched in the raw text before
pre-tokenization, wherever they occur, and that goes wrong in byte-level tokenizers:
- an added token is found inside any word: with "ial" added, SmolLM2 encodes "special essential" (two
  base tokens) as "spec" "ial" "Ġess" "ent" "ial", so common words can need more tokens than before;
- the byte-level decoder reads an added token's characters through the byte alphabet, which includes the
  Latin-1 letters: an added "café" decodes as "caf\ufffd", so encode -> decode is no longer lossless;
- the leading-space variant has to be spelt with a real space (" myocardial", not "Ġmyocardial"), and
  runtimes that rebuild a tokenizer from its vocabulary and merges (GGUF, other engines) treat added tokens
  apart from the BPE.
(Chinese added tokens do decode correctly, as their characters are outside the byte alphabet, and being
found anywhere suits unsegmented Chinese; the two problems above are enough to rule them out for a
vocabulary that mixes Chinese and English.)
Appended merges have none of these problems. They rank after every base merge, so the base merges run
first exactly as before and a new merge can only join two of their results: no text ever needs more
tokens than with the base tokenizer, every old token keeps its id, and a new token is the concatenation
of the byte-level pieces it joins, so decoding stays lossless. The price is that a token the base
tokenizer splits into three or more pieces needs intermediate tokens (one per merge); they count against
--num_new_tokens, and are chosen among the learned pieces (whole characters, shorter words) where possible.

Only byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM2 and their kind) are supported.
"""

import heapq
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from medgpt.data import DataReport, RecordError, file_records, find_data_files, record_to_messages, record_to_text
from medgpt.errors import InputError
from medgpt.modeling import hub_kwargs
from medgpt.outputs import atomic_write_text, check_output_dir, is_model_file, publish_model_folder, staging_folder

logger = logging.getLogger(__name__)

# ---- reading the corpus ----


def record_texts(record) -> list[str]:
    """The text of one record: a plain text line or {"text"} record, or every message of a conversation."""
    if "text" in record:
        return [record_to_text(record)]
    return [message["content"] for message in record_to_messages(record) if message["content"].strip()]


def read_corpus(paths: list[str], report: DataReport) -> list[str]:
    """Every text under `paths` (files or folders); records that cannot be read are counted and skipped."""
    texts = []
    files = [file for path in paths for file in find_data_files(path)]
    with tqdm(desc="reading the corpus", unit=" records") as progress:
        for file in files:
            for line, raw in file_records(file):
                report.read += 1
                progress.update()
                try:
                    if isinstance(raw, RecordError):
                        raise raw
                    texts += record_texts(raw)
                except RecordError as error:
                    report.reject(error.kind, f"{file}:{line}")
                    continue
                report.kept += 1
    if not texts:
        report.log()
        reasons = ", ".join(f"{count} x {kind}" for kind, count in report.rejected.most_common())
        raise InputError(f"no usable text in the corpus ({report.read} records read"
                         + (f"; rejected: {reasons})" if reasons else ")"), ", ".join(paths))
    return texts


# ---- the base tokenizer ----


def _components(spec: dict | None) -> list[dict]:
    """A normalizer/pre-tokenizer/decoder and the parts of a Sequence of them."""
    if not spec:
        return []
    parts = spec.get("pretokenizers") or spec.get("decoders") or spec.get("normalizers")
    return [spec] + [inner for part in parts or [] for inner in _components(part)]


def check_byte_level_bpe(spec: dict, where: str) -> None:
    """Refuse, with what the tokenizer is, a tokenizer.json this module cannot extend."""
    model = spec.get("model") or {}
    kind = model.get("type")
    if kind != "BPE":
        raise InputError(f"the tokenizer is a {kind or 'unknown'} model: only byte-level BPE tokenizers (GPT-2, "
                         "Llama 3, Qwen, SmolLM2 and their kind) can be extended", where)
    pre_tokenizers = {part.get("type") for part in _components(spec.get("pre_tokenizer"))}
    decoders = {part.get("type") for part in _components(spec.get("decoder"))}
    if "ByteLevel" not in pre_tokenizers or "ByteLevel" not in decoders:
        style = ("a SentencePiece-style (Metaspace) BPE" if "Metaspace" in pre_tokenizers | decoders
                 or model.get("byte_fallback") else "a BPE without byte-level pre-tokenization")
        raise InputError(f"the tokenizer is {style}: only byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, "
                         "SmolLM2 and their kind) can be extended", where)
    for option in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(option):
            raise InputError(f"the tokenizer's BPE uses a {option} ({model[option]!r}), which is not supported", where)
    if model.get("dropout"):
        raise InputError("the tokenizer's BPE uses dropout, which is not supported", where)


def merge_pairs(model: dict) -> list[tuple[str, str]]:
    """tokenizer.json's merges: pairs, or "left right" strings in older files (byte-level tokens hold no
    space: it is written as Ġ)."""
    return [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ", 1)) for merge in model["merges"]]


class MergeTable:
    """The BPE's merges by rank, to see what it makes of a token sequence after merges are appended."""

    def __init__(self, merges: list[tuple[str, str]]):
        self.rank = {pair: rank for rank, pair in enumerate(merges)}

    def add(self, pair: tuple[str, str]) -> None:
        self.rank.setdefault(pair, len(self.rank))

    def remove(self, pair: tuple[str, str]) -> None:
        del self.rank[pair]

    def apply(self, symbols: list[str]) -> list[str]:
        """BPE from `symbols` on: the lowest-ranked adjacent pair is joined first, the leftmost on a tie."""
        symbols = list(symbols)
        while len(symbols) > 1:
            best = None
            for index in range(len(symbols) - 1):
                rank = self.rank.get((symbols[index], symbols[index + 1]))
                if rank is not None and (best is None or rank < best[0]):
                    best = (rank, index)
            if best is None:
                break
            index = best[1]
            symbols[index:index + 2] = [symbols[index] + symbols[index + 1]]
        return symbols


def byte_level_text(token: str) -> str:
    """The text a byte-level token stands for (a piece of a UTF-8 character shows as U+FFFD)."""
    return decoders.ByteLevel().decode([token])


# ---- learning and choosing the new tokens ----


def learn_domain_bpe(base, texts: list[str], vocab_size: int, min_frequency: int, max_token_bytes: int | None):
    """A BPE trained on `texts` with the base tokenizer's normalizer and pre-tokenizer (`base`: a
    tokenizers.Tokenizer), so its pieces are byte-level strings of the same kind as the base's."""
    learned = Tokenizer(models.BPE())
    learned.normalizer = base.normalizer
    learned.pre_tokenizer = base.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), max_token_length=max_token_bytes or None,
    )
    learned.train_from_iterator(texts, trainer, length=len(texts))
    return learned


def count_tokens(tokenizer, texts: list[str]) -> Counter:
    """How often each token occurs when `tokenizer` encodes `texts`."""
    counts = Counter()
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        counts.update(encoding.tokens)
    return counts


def corpus_words(base, texts: list[str]) -> Counter:
    """The corpus as the base tokenizer's pre-tokenizer cuts it (byte-level strings), with counts."""
    words = Counter()
    for text in texts:
        if base.normalizer is not None:
            text = base.normalizer.normalize_str(text)
        words.update(word for word, _ in base.pre_tokenizer.pre_tokenize_str(text))
    return words


def piece_frequencies(base, learned, texts: list[str]) -> Counter:
    """How often each learned piece could replace base tokens in the corpus: occurrences where the base
    tokenizer, encoding the corpus, produces exactly the two or more tokens it splits the piece into.

    Occurrences inside words the base tokenizer already has as one token do not count ("ymptom" within
    " symptoms"), and neither do those cut differently in context: a new merge would not fire there."""
    learned_pieces = set(learned.get_vocab())
    # Spans of a word's tokens are grown only while they can still become a learned piece.
    prefixes = {piece[:length] for piece in learned_pieces for length in range(1, len(piece) + 1)}
    pieces_of = {}
    counts = Counter()
    for word, count in corpus_words(base, texts).items():
        tokens = [token.value for token in base.model.tokenize(word)]
        for start in range(len(tokens) - 1):
            joined = tokens[start]
            for end in range(start + 1, len(tokens)):
                joined += tokens[end]
                if joined not in prefixes:
                    break
                if joined in learned_pieces:
                    if joined not in pieces_of:
                        pieces_of[joined] = [token.value for token in base.model.tokenize(joined)]
                    if pieces_of[joined] == tokens[start:end + 1]:
                        counts[joined] += count
    return counts


@dataclass
class NewToken:
    token: str  # as the BPE vocabulary writes it (byte-level: "Ġ" for a space, Chinese as byte characters)
    text: str  # what it stands for
    id: int
    merge: tuple[str, str]  # the appended merge that makes it
    pieces: list[str]  # what the base tokenizer splits it into
    piece_ids: list[int]
    frequency: int  # occurrences in the corpus that it can replace base tokens at (piece_frequencies)
    intermediate: bool  # added only as a step towards a longer new token

    def report(self) -> dict:
        entry = asdict(self)
        entry["merge"] = list(self.merge)
        entry["tokens_saved"] = len(self.pieces) - 1
        return entry


@dataclass
class Extension:
    """The new tokens in id order, and the merges to append in order."""

    tokens: list[NewToken] = field(default_factory=list)
    merges: list[tuple[str, str]] = field(default_factory=list)
    candidates: int = 0
    skipped_over_budget: int = 0
    skipped_unreachable: int = 0


def _cheapest_tree(symbols: list[str], vocab, learned_frequency: Counter):
    """The binary tree of merges joining `symbols` into one token that needs the fewest new vocabulary
    entries; among those, the one whose new entries are the most frequent learned pieces (whole Chinese
    characters and shorter words rather than arbitrary byte strings). Returns the merges in the order to
    append them (each after the merges making its two parts)."""
    count = len(symbols)
    text = {(i, j): "".join(symbols[i:j]) for i in range(count) for j in range(i + 1, count + 1)}
    best = {(i, i + 1): (0, 0, None) for i in range(count)}  # (new entries, -frequency of them, split)
    for length in range(2, count + 1):
        for start in range(count - length + 1):
            end = start + length
            joined = text[start, end]
            is_new = joined not in vocab
            own = (int(is_new), -learned_frequency[joined] if is_new else 0)
            best[start, end] = min(
                (best[start, split][0] + best[split, end][0] + own[0],
                 best[start, split][1] + best[split, end][1] + own[1], split)
                for split in range(start + 1, end)
            )
    merges = []

    def visit(start, end):
        split = best[start, end][2]
        if split is not None:
            visit(start, split)
            visit(split, end)
            merges.append((text[start, split], text[split, end]))

    visit(0, count)
    return merges


DIGITS = frozenset("0123456789")


def choose_new_tokens(base, spec: dict, learned_frequency: Counter, budget: int) -> Extension:
    """Learned pieces not in the base vocabulary that the base tokenizer splits into two or more tokens, each
    with the merges (and intermediate tokens) that make the extended BPE produce it, until `budget` new
    vocabulary entries are used.

    Best first by corpus frequency x tokens saved, per new vocabulary entry it takes: a long phrase that
    needs ten intermediate entries must save ten times what a token needing one saves. Both change as
    tokens are added (a character added for one word makes the next word with it cheaper and saves less
    on its own), so a candidate's value is worked out again when it comes up, and it goes back into the
    queue if it has fallen behind the next one."""
    base_vocab = base.get_vocab(with_added_tokens=True)
    # A model whose vocabulary holds digits only alone (SmolLM2) reads numbers digit by digit; tokens such
    # as "120" or " 5" learned from the corpus would change that, so they are left out.
    digits_alone = not any(len(token) > 1 and any(char in DIGITS for char in token) for token in base_vocab)
    candidates = {}
    for token in learned_frequency:
        if token in base_vocab or (digits_alone and any(char in DIGITS for char in token)):
            continue
        # A piece that starts or ends inside a character's UTF-8 bytes fits only the text it was learned
        # from; such pieces are used as steps towards whole characters, never chosen for themselves.
        if "\ufffd" not in byte_level_text(token):
            pieces = [piece.value for piece in base.model.tokenize(token)]
            if len(pieces) >= 2:
                candidates[token] = pieces

    table = MergeTable(merge_pairs(spec["model"]))
    vocab = dict(base_vocab)
    next_id = max(base_vocab.values()) + 1
    extension = Extension(candidates=len(candidates))
    made = {}  # new token -> its NewToken

    def plan(token):
        """(value, new entries, merges) of adding `token` now."""
        symbols = table.apply(candidates[token])
        if symbols == [token]:
            return 0.0, 0, []
        merges = _cheapest_tree(symbols, vocab, learned_frequency)
        cost = len({left + right for left, right in merges if left + right not in vocab})
        return learned_frequency[token] * (len(symbols) - 1) / max(cost, 1), cost, merges

    def queued(token, value):
        return (-value, -learned_frequency[token], token)  # ties: the more frequent, then by text

    queue = [queued(token, plan(token)[0]) for token in candidates]
    heapq.heapify(queue)
    while queue and len(extension.tokens) < budget:
        token = heapq.heappop(queue)[2]
        value, cost, merges = plan(token)
        if not merges:  # made already, as a step towards a longer token
            made[token].intermediate = False
            continue
        if queue and queued(token, value) > queue[0]:
            heapq.heappush(queue, queued(token, value))
            continue
        if len(extension.tokens) + cost > budget:
            extension.skipped_over_budget += 1
            continue
        appended = [pair for pair in merges if pair not in table.rank]
        for pair in appended:
            table.add(pair)
        if table.apply(candidates[token]) != [token]:
            # A merge of this tree that also matches elsewhere among its own pieces joins them another way.
            for pair in appended:
                table.remove(pair)
            extension.skipped_unreachable += 1
            continue
        extension.merges += appended
        for left, right in appended:
            joined = left + right
            if joined not in vocab:
                pieces = base.model.tokenize(joined)
                made[joined] = NewToken(
                    token=joined, text=byte_level_text(joined), id=next_id, merge=(left, right),
                    pieces=[piece.value for piece in pieces], piece_ids=[piece.id for piece in pieces],
                    frequency=learned_frequency[joined], intermediate=joined != token,
                )
                vocab[joined] = next_id
                next_id += 1
                extension.tokens.append(made[joined])
        made[token].intermediate = False
    return extension


# ---- the extended tokenizer ----


def extended_tokenizer_json(spec: dict, extension: Extension) -> dict:
    """tokenizer.json with the new tokens appended to the BPE vocabulary and their merges after the base's."""
    extended = json.loads(json.dumps(spec))
    model = extended["model"]
    vocab = model["vocab"]
    # Tokens that live only among the added tokens with ids below the new ones (Qwen's special tokens follow
    # its BPE vocabulary) are written into the BPE vocabulary too: on loading, an added token not found in
    # the model gets the id after the model's vocabulary, which would now be a new token's.
    for added in extended.get("added_tokens", []):
        if added["content"] not in vocab:
            vocab[added["content"]] = added["id"]
    for token in extension.tokens:
        vocab[token.token] = token.id
    strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
    model["merges"] += [f"{left} {right}" if strings else [left, right] for left, right in extension.merges]
    return extended


def check_extension(base, extended, extension: Extension) -> None:
    """What the extension promises, checked on the built tokenizer: old ids kept, new ids contiguous after
    them, every chosen new token produced by the BPE from its own text (intermediate ones are made inside
    the longer tokens they lead to)."""
    old = base.get_vocab(with_added_tokens=True)
    new = extended.get_vocab(with_added_tokens=True)
    moved = [token for token, index in old.items() if new.get(token) != index]
    if moved:
        raise RuntimeError(f"{len(moved)} base tokens changed ids, e.g. {moved[:5]}")
    first = max(old.values()) + 1
    if [token.id for token in extension.tokens] != list(range(first, first + len(extension.tokens))):
        raise RuntimeError("the new token ids are not contiguous after the base vocabulary")
    unmade = [token.token for token in extension.tokens if not token.intermediate
              and [piece.value for piece in extended.model.tokenize(token.token)] != [token.token]]
    if unmade:
        raise RuntimeError(f"{len(unmade)} new tokens are not produced by the extended BPE, e.g. {unmade[:5]}")


def build_extended_tokenizer(base, spec: dict, extension: Extension, texts: list[str]):
    """The extended tokenizer.json and its tokenizer, checked (check_extension) and checked to decode every
    corpus text as the base tokenizer does."""
    extended_spec = extended_tokenizer_json(spec, extension)
    extended = Tokenizer.from_str(json.dumps(extended_spec))
    check_extension(base, extended, extension)
    failures = round_trip_failures(base, extended, texts)
    if failures:
        raise RuntimeError(f"{len(failures)} corpus texts do not decode back to themselves, e.g. {texts[failures[0]][:80]!r}")
    return extended_spec, extended


def tokens_per_thousand_characters(tokenizer, texts: list[str]) -> float:
    characters = sum(len(text) for text in texts)
    tokens = sum(len(encoding.ids) for encoding in tokenizer.encode_batch(texts, add_special_tokens=False))
    return round(1000 * tokens / max(characters, 1), 2)


def round_trip_failures(base, extended, texts: list[str]) -> list[int]:
    """Indices of texts the extended tokenizer does not decode back to what the base tokenizer does (the
    text itself, unless the base's normalizer changes it)."""
    failures = []
    base_encodings = base.encode_batch(texts, add_special_tokens=False)
    extended_encodings = extended.encode_batch(texts, add_special_tokens=False)
    for index, (before, after) in enumerate(zip(base_encodings, extended_encodings)):
        if extended.decode(after.ids, skip_special_tokens=False) != base.decode(before.ids, skip_special_tokens=False):
            failures.append(index)
    return failures


# ---- the model ----


def initialise_new_embeddings(model, extension: Extension, vocab_size: int) -> None:
    """Grow the embeddings (and an untied output head) to `vocab_size` rows if they are smaller, and set each
    new token's row to the mean of the rows of the base pieces it joins."""
    embeddings = model.get_input_embeddings()
    if embeddings.weight.shape[0] < vocab_size:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)  # rows set below
    matrices = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(head.weight)
    with torch.no_grad():
        for matrix in matrices:
            for token in extension.tokens:
                matrix[token.id] = matrix[token.piece_ids].float().mean(dim=0).to(matrix.dtype)


def extension_report(base_size: int, new_size: int, extension: Extension, before: float, after: float,
                     uses: Counter, data_report: DataReport, texts: int, settings: dict) -> dict:
    return {
        "base_vocab_size": base_size,
        "new_vocab_size": new_size,
        "added": len(extension.tokens),
        "intermediate": sum(token.intermediate for token in extension.tokens),
        "tokens_per_1000_characters": {"before": before, "after": after},
        "corpus": {"records_read": data_report.read, "records_kept": data_report.kept,
                   "records_rejected": dict(data_report.rejected), "texts": texts},
        "candidates": extension.candidates,
        "candidates_left_out": {"over the token budget": extension.skipped_over_budget,
                                "not formed by the merges": extension.skipped_unreachable},
        "settings": settings,
        "tokens": [dict(token.report(), uses=uses[token.token]) for token in extension.tokens],
    }


def report_json(report: dict) -> str:
    """The report as indented JSON with one line per token, so that thousands of tokens stay readable."""
    summary = {key: value for key, value in report.items() if key != "tokens"}
    lines = json.dumps(summary, ensure_ascii=False, indent=2)[:-len("\n}")]
    tokens = ",\n".join("    " + json.dumps(token, ensure_ascii=False) for token in report["tokens"])
    return f'{lines},\n  "tokens": [\n{tokens}\n  ]\n}}\n'


# ---- loading and saving ----

REPORT_NAME = "extension_report.json"


def check_new_model_folder(output_dir: str, overwrite: bool) -> None:
    """Before any work: refuse a folder that already holds a model (or an extension report) unless asked."""
    check_output_dir(output_dir)
    if os.path.isdir(output_dir) and not overwrite:
        held = sorted(name for name in os.listdir(output_dir) if is_model_file(name) or name == REPORT_NAME)
        if held:
            raise InputError(f"--output_dir already holds a model ({', '.join(held[:3])}"
                             f"{', ...' if len(held) > 3 else ''}): pass --overwrite True to replace it", output_dir)


def load_base_tokenizer(path: str):
    """The model's tokenizer (transformers) and its backend's tokenizer.json, checked to be byte-level BPE."""
    tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs(path))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputError("the tokenizer has no tokenizers backend (tokenizer.json): only byte-level BPE tokenizers "
                         "can be extended", path)
    spec = json.loads(backend.to_str())
    check_byte_level_bpe(spec, path)
    base = Tokenizer.from_str(json.dumps(spec))
    base.no_padding()
    base.no_truncation()
    return tokenizer, spec, base


def save_extended_model(model, tokenizer, extended_spec: dict, report: dict, output_dir: str, check_texts: list[str]) -> None:
    """Model, tokenizer (with its chat template), generation config and the report, written into a staging
    folder and moved into `output_dir` only once complete and checked to load with the new tokenizer."""
    os.makedirs(output_dir, exist_ok=True)
    with staging_folder(output_dir) as staging:
        tokenizer.save_pretrained(staging)
        # The tokenizer files transformers wrote describe the base vocabulary; the backend's tokenizer.json
        # is replaced by the extended one, and the folder read back as users will read it.
        atomic_write_text(os.path.join(staging, "tokenizer.json"), json.dumps(extended_spec, ensure_ascii=False, indent=2))
        for stale in ("vocab.json", "merges.txt"):
            if os.path.exists(os.path.join(staging, stale)):
                os.remove(os.path.join(staging, stale))
        reloaded = AutoTokenizer.from_pretrained(staging, local_files_only=True)
        extended = Tokenizer.from_str(json.dumps(extended_spec))
        if len(reloaded) != extended.get_vocab_size(with_added_tokens=True) or any(
            reloaded(text, add_special_tokens=False)["input_ids"] != extended.encode(text, add_special_tokens=False).ids
            for text in check_texts
        ):
            raise RuntimeError("the saved tokenizer does not encode as the extended one: nothing was published")
        model.save_pretrained(staging)
        atomic_write_text(os.path.join(staging, REPORT_NAME), report_json(report))
        publish_model_folder(staging, output_dir)
