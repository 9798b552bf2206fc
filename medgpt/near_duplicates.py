"""Exact and near-duplicate records, for deduplication and for train/validation splits that keep a
question's rewordings on one side.

A record is compared by its text as the model sees it: every message, tool call and answer except the
system prompt (a system prompt shared by a whole dataset would make every record look alike), normalised
(Unicode NFKC, case folded, runs of whitespace as one space). Exact duplicates have the same normalised
turns. Near duplicates have an estimated Jaccard similarity of at least a threshold between their sets of
character n-grams (no word segmentation, so Chinese works as English does), estimated with MinHash and
found with locality-sensitive hashing (datasketch), with a fixed seed: the same input gives the same result.
"""

import hashlib
import random
import re
import unicodedata
from dataclasses import dataclass, field

from medgpt.arguments import at_least, require
from medgpt.dataset_tools import Record, RecordView, progress

MINHASH_SEED = 1


@dataclass
class SimilarityArguments:
    """What counts as a near duplicate (dedup_data.py, split_data.py)."""

    threshold: float = field(default=0.8, metadata={
        "help": "Near duplicates: estimated Jaccard similarity of character n-grams at least this, in (0, 1]."})
    num_perm: int = field(default=128, metadata={"help": "MinHash permutations (more: finer estimates, slower)."})
    ngram: int = field(default=5, metadata={"help": "Characters per n-gram (shingle)."})

    def __post_init__(self):
        require(0 < self.threshold <= 1, "threshold", "must be in (0, 1]", self.threshold)
        at_least(self, "num_perm", 2)
        at_least(self, "ngram", 1)


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()


def shingles(text: str, ngram: int) -> set[str]:
    """The text's character n-grams; a text shorter than n is one shingle."""
    if len(text) <= ngram:
        return {text}
    return {text[start:start + ngram] for start in range(len(text) - ngram + 1)}


@dataclass
class Fingerprint:
    exact: str  # digest of the normalised turns
    signature: object  # datasketch.MinHash of the n-grams


def fingerprints(views: list[RecordView], ngram: int, num_perm: int) -> list[Fingerprint]:
    from datasketch import MinHash

    exact_keys, shingle_sets = [], []
    for view in views:
        parts = [(role, normalize(text)) for role, text in view.parts if role != "system"]
        exact_keys.append(hashlib.sha1("\x1e".join(f"{role}\x1f{text}" for role, text in parts).encode()).hexdigest())
        shingle_sets.append([shingle.encode() for shingle in shingles(" ".join(text for _, text in parts), ngram)])
    signatures = MinHash.bulk(progress(shingle_sets, "hashing", total=len(shingle_sets)), num_perm=num_perm, seed=MINHASH_SEED)
    return [Fingerprint(key, signature) for key, signature in zip(exact_keys, signatures)]


LSH_RECALL = 0.99


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) of the LSH index: the most rows per band (the fewest pairs to check) with
    which a pair right at the threshold is still a candidate with probability LSH_RECALL; more similar
    pairs are found more surely still. datasketch's own choice balances misses against extra candidates
    and misses more than half of the pairs at the threshold; extra candidates cost only a comparison.
    At least two bands: datasketch's index needs them (one band of every row would do at threshold 1)."""
    for rows in range(num_perm // 2, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= LSH_RECALL:
            return bands, rows
    return num_perm, 1


def _index(threshold: float, num_perm: int):
    from datasketch import MinHashLSH

    return MinHashLSH(threshold=threshold, num_perm=num_perm, params=lsh_bands(threshold, num_perm))


def _most_similar(prints: list[Fingerprint], index, current: int, threshold: float) -> tuple[int, float] | None:
    """The earlier record most like `current` among the index's candidates, if it passes the threshold
    (candidates are only likely matches: each is checked on its estimated similarity)."""
    best = None
    signature = prints[current].signature
    for other in sorted(index.query(signature)):
        similarity = signature.jaccard(prints[other].signature)
        if similarity >= threshold and (best is None or similarity > best[1]):
            best = (other, similarity)
    return best


@dataclass
class Duplicate:
    index: int
    of: int  # the kept record it duplicates
    match: str  # "exact" or "near"
    similarity: float


def find_duplicates(prints: list[Fingerprint], threshold: float, num_perm: int) -> list[Duplicate]:
    """Records that duplicate an earlier kept one; the first of each group is kept."""
    index, first_with, duplicates = _index(threshold, num_perm), {}, []
    for current, fingerprint in enumerate(progress(prints, "finding duplicates")):
        if fingerprint.exact in first_with:
            duplicates.append(Duplicate(current, first_with[fingerprint.exact], "exact", 1.0))
            continue
        found = _most_similar(prints, index, current, threshold)
        if found is not None:
            duplicates.append(Duplicate(current, found[0], "near", found[1]))
            continue
        index.insert(current, fingerprint.signature)
        first_with[fingerprint.exact] = current
    return duplicates


def duplicate_groups(prints: list[Fingerprint], threshold: float, num_perm: int) -> list[list[int]]:
    """Records joined by any chain of (near) duplicates, each group in record order, groups ordered by
    their first record."""
    parent = list(range(len(prints)))

    def root(item: int) -> int:
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    def join(first: int, second: int) -> None:
        first, second = root(first), root(second)
        if first != second:
            parent[max(first, second)] = min(first, second)

    index, first_with = _index(threshold, num_perm), {}
    for current, fingerprint in enumerate(progress(prints, "grouping duplicates")):
        if fingerprint.exact in first_with:
            join(current, first_with[fingerprint.exact])
        else:
            first_with[fingerprint.exact] = current
        signature = fingerprint.signature
        for other in index.query(signature):
            if signature.jaccard(prints[other].signature) >= threshold:
                join(current, other)
        index.insert(current, signature)
    groups = {}
    for item in range(len(prints)):
        groups.setdefault(root(item), []).append(item)
    return list(groups.values())


def choose_validation(groups: list[list[int]], target: int, seed: int) -> set[int]:
    """Whole groups, in an order shuffled with `seed`, while they fit in `target` records. It ends short
    of `target` only when every group left is larger than the room left, so by less than one group."""
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    chosen = set()
    for group in order:
        if len(chosen) == target:
            break
        if len(chosen) + len(groups[group]) <= target:
            chosen.update(groups[group])
    return chosen


def removed_entry(record: Record, kept: Record, duplicate: Duplicate) -> dict:
    """What --removed_file says about a dropped record: where it was, what it duplicates, and the record."""
    entry = {"where": record.where, "match": duplicate.match, "similarity": round(duplicate.similarity, 3),
             "duplicate_of": kept.where}
    if "id" in kept.data:
        entry["duplicate_of_id"] = kept.data["id"]
    entry["record"] = record.data
    return entry
