"""Graded relevance between captions and images, and NDCG over it (TERAN's protocol, beside R@K).

R@K counts only an item's own positives; NDCG credits a near miss. Relevance of image j to caption
c is ROUGE-L between c and image j's own captions, as coco-caption computes it for a candidate and
its references: with P = max over references of LCS / len(c) and R = max of LCS / len(reference),
F = (1 + b^2) P R / (R + b^2 P), b = 1.2. One [captions, images] matrix serves both directions:
caption -> images reads its row, image -> captions its column. NDCG@K = DCG@K / IDCG@K with
DCG@K = sum over ranks r <= K of rel_r / log2(r + 1), the ideal DCG from the K largest relevances
(SPICE relevance, the other of TERAN's two, is out of scope).

Words are lowercased runs of letters and digits. The LCS is a dynamic programme vectorised over
blocks of caption x reference pairs, O(captions^2 x words^2): 1.4 s for 1,000 captions of 5-13
words, 34 s for 5,000, on a 2-core CPU (docs/search.md).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from vlretrieval.evaluation import search

BETA = 1.2  # coco-caption's ROUGE-L weight of recall over precision
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _word_ids(texts: Sequence[str], vocabulary: dict[str, int], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """([texts, longest] word ids padded with `pad`, [texts] lengths)."""
    tokens = [[vocabulary.setdefault(word, len(vocabulary)) for word in words(text)] for text in texts]
    longest = max([len(t) for t in tokens] + [1])
    ids = np.full((len(texts), longest), pad, np.int32)
    for row, sequence in enumerate(tokens):
        ids[row, : len(sequence)] = sequence
    return ids, np.asarray([len(t) for t in tokens], np.float32)


def lcs_lengths(candidates: np.ndarray, references: np.ndarray) -> np.ndarray:
    """[candidates, references] longest-common-subsequence lengths of padded id rows (pads must
    differ between the two sides so they never match)."""
    count, length = candidates.shape
    table = np.zeros((count, references.shape[0], references.shape[1] + 1), np.int16)
    for i in range(length):
        equal = candidates[:, i, None, None] == references[None, :, :]
        previous, row = table, np.zeros_like(table)
        for j in range(references.shape[1]):
            row[..., j + 1] = np.where(equal[..., j], previous[..., j] + 1,
                                       np.maximum(previous[..., j + 1], row[..., j]))
        table = row
    return table[..., -1]


def rouge_l_matrix(captions: Sequence[str], caption_owners: np.ndarray, num_images: int,
                   block: int = 64) -> np.ndarray:
    """float32 [captions, images]: ROUGE-L of each caption against each image's captions (the
    references: `caption_owners[r]` is caption r's image)."""
    vocabulary: dict[str, int] = {}
    candidates, candidate_lengths = _word_ids(captions, vocabulary, pad=-1)
    references, reference_lengths = _word_ids(captions, vocabulary, pad=-2)
    owners = np.asarray(caption_owners)
    order = np.argsort(owners, kind="stable")  # references grouped by image, for reduceat
    starts = np.searchsorted(owners[order], np.arange(num_images))
    has_references = np.bincount(owners, minlength=num_images) > 0
    result = np.zeros((len(captions), num_images), np.float32)
    for start in range(0, len(captions), block):
        lcs = lcs_lengths(candidates[start:start + block], references[order]).astype(np.float32)
        precision = lcs / np.maximum(candidate_lengths[start:start + block, None], 1)
        recall = lcs / np.maximum(reference_lengths[order][None, :], 1)
        best_precision = np.maximum.reduceat(precision, np.minimum(starts, len(order) - 1), axis=1)
        best_recall = np.maximum.reduceat(recall, np.minimum(starts, len(order) - 1), axis=1)
        denominator = best_recall + BETA**2 * best_precision
        f_score = (1 + BETA**2) * best_precision * best_recall / np.maximum(denominator, 1e-12)
        score = np.where(denominator > 0, f_score, 0)
        result[start:start + block] = np.where(has_references[None, :], score, 0)
    return result


def ndcg(retrieved: np.ndarray, relevance: np.ndarray, k: int) -> float:
    """Mean NDCG@k (percent) of queries whose gallery items, best first, are `retrieved`
    [queries, >= k], with graded `relevance` [queries, gallery]; a query with no relevant item
    counts 0."""
    k = min(k, relevance.shape[1])
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    gains = np.take_along_axis(relevance, retrieved[:, :k], axis=1)
    ideal = -np.sort(-relevance, axis=1)[:, :k]
    dcg, idcg = gains @ discounts, ideal @ discounts
    return float(100 * np.mean(np.where(idcg > 0, dcg / np.maximum(idcg, 1e-12), 0.0)))


def ndcg_both_ways(image_embeddings: np.ndarray, text_embeddings: np.ndarray, captions: Sequence[str],
                   text_owners: np.ndarray, ks: Sequence[int], **search_options) -> dict[str, dict[str, float]]:
    """{"text_to_image": {"NDCG@K": ...}, "image_to_text": {...}} for the towers' rankings."""
    relevance = rouge_l_matrix(captions, text_owners, len(image_embeddings))
    largest = max(ks)
    results = {}
    for direction, (queries, gallery, graded) in (
        ("text_to_image", (text_embeddings, image_embeddings, relevance)),
        ("image_to_text", (image_embeddings, text_embeddings, relevance.T)),
    ):
        _, retrieved = search.top_k(queries, gallery, largest, **search_options)
        results[direction] = {f"NDCG@{k}": ndcg(retrieved, graded, k) for k in ks}
    return results


def _best_first(scores: np.ndarray, k: int) -> np.ndarray:
    """[queries, k] columns of each row's k highest scores, ties to the lower column (as search)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def ndcg_from_scores(scores: np.ndarray, captions: Sequence[str], text_owners: np.ndarray,
                     ks: Sequence[int]) -> dict[str, dict[str, float]]:
    """`ndcg_both_ways` for a dense [captions, images] score matrix (late interaction, joint)."""
    relevance = rouge_l_matrix(captions, text_owners, scores.shape[1])
    largest = max(ks)
    return {
        direction: {f"NDCG@{k}": ndcg(_best_first(matrix, largest), graded, k) for k in ks}
        for direction, matrix, graded in (("text_to_image", scores, relevance),
                                          ("image_to_text", scores.T, relevance.T))
    }
