"""How far a candidate's embeddings moved from the original's, on the same sentences.

Pure numpy on two aligned arrays of sentence embeddings (row i: the same sentence):
- neighbour recall@k: for each sentence, the share of its k nearest neighbours under the
  original's embeddings (cosine, among the other sentences of the set) that the candidate's
  embeddings also put among its k nearest — what retrieval, clustering and deduplication see;
- cosine fidelity: mean cosine between a sentence's candidate and original embedding (what a
  drop-in replacement next to vectors already indexed with the original needs);
- pairwise Spearman: rank correlation of all pairwise cosine similarities, original vs
  candidate (whether the similarity scale keeps its order).
Plus the two scores that need labels: a linear probe's accuracy, and the Spearman
correlation of pair similarities with a gold score (STS).
"""

from __future__ import annotations

import numpy as np

NEIGHBOURS = 10  # k of neighbour recall@k
# Spearman over at most this many sentences' pairs (n·(n-1)/2 pairs: 2,000 give 2 million).
PAIRWISE_SENTENCES = 2000


def normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def nearest_neighbours(vectors: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """Indices of each row's k most cosine-similar other rows, [n, k] (unordered within)."""
    unit = normalize(vectors.astype(np.float32))
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argpartition(-similarity, k - 1, axis=1)[:, :k]


def neighbour_recall(reference: np.ndarray, candidate: np.ndarray, k: int = NEIGHBOURS) -> float:
    """Mean share of each sentence's k reference neighbours the candidate finds too."""
    expected, found = nearest_neighbours(reference, k), nearest_neighbours(candidate, k)
    shared = [len(set(a) & set(b)) for a, b in zip(expected.tolist(), found.tolist(), strict=True)]
    return float(np.mean(shared)) / k


def cosine_fidelity(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.mean(np.sum(normalize(reference) * normalize(candidate), axis=1)))


def pairwise_spearman(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Spearman correlation of the pairwise cosine similarities (upper triangle)."""
    reference, candidate = reference[:PAIRWISE_SENTENCES], candidate[:PAIRWISE_SENTENCES]
    upper = np.triu_indices(len(reference), k=1)
    a = (normalize(reference) @ normalize(reference).T)[upper]
    b = (normalize(candidate) @ normalize(candidate).T)[upper]
    return _spearman(a, b)


def geometry_names(prefix: str = "") -> tuple[str, str, str]:
    return (
        f"{prefix}cosine_fidelity",
        f"{prefix}recall@{NEIGHBOURS}",
        f"{prefix}pairwise_spearman",
    )


def geometry(reference: np.ndarray, candidate: np.ndarray, prefix: str = "") -> dict[str, float]:
    """The three figures above, named as the task reports them."""
    values = (
        cosine_fidelity(reference, candidate),
        neighbour_recall(reference, candidate),
        pairwise_spearman(reference, candidate),
    )
    return dict(zip(geometry_names(prefix), values, strict=True))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    # Undefined for a constant input (a collapsed model): no correlation, not NaN, which
    # no budget or JSON file could take.
    from scipy.stats import spearmanr  # here: scipy.stats costs 1-2 s of every start-up

    value = float(spearmanr(a, b).statistic)
    return value if np.isfinite(value) else 0.0


# --- scores with labels -------------------------------------------------------------------------
def fit_probe(embeddings: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """A logistic-regression probe on unit-length embeddings, as arrays a child can reload."""
    from sklearn.linear_model import LogisticRegression  # here: scikit-learn loads scipy

    probe = LogisticRegression(max_iter=2000, C=1.0)
    probe.fit(normalize(embeddings), labels)
    return {
        "coef": probe.coef_.astype(np.float64),
        "intercept": probe.intercept_.astype(np.float64),
        "classes": probe.classes_.astype(np.int64),
    }


def probe_correct(
    probe: dict[str, np.ndarray], embeddings: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """Per sentence, 1.0 where the probe labels its embedding right, else 0.0."""
    logits = normalize(embeddings) @ probe["coef"].T + probe["intercept"]
    # Binary probes have one decision function: positive picks the second class.
    picked = (logits[:, 0] > 0).astype(int) if logits.shape[1] == 1 else logits.argmax(1)
    return (probe["classes"][picked] == labels).astype(np.float64)


def pair_spearman(first: np.ndarray, second: np.ndarray, gold: np.ndarray) -> float:
    """Spearman correlation between the pairs' cosine similarities and their gold scores."""
    similarity = np.sum(normalize(first) * normalize(second), axis=1)
    return _spearman(similarity, gold)
