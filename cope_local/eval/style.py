"""A style metric beside ROUGE: does a generated text read as its own user's?

ROUGE counts shared words and ignores what this product is for: the voice
(case, punctuation, spacing, emoticons, hashtags, favourite words). Authorship
attribution is the standard stylometric check (Stamatatos 2009; character
n-grams are its strongest simple features): a classifier trained on every
user's training history assigns each generated text to one user; accuracy is
the share of texts assigned to their own user. The real held-out texts give
the ceiling, the base model's outputs the floor.

The classifier: TF-IDF weighted character 1..4-grams (case and spacing kept:
they are style), one centroid per user (the mean of the user's L2-normalised
text vectors), a text goes to the most cosine-similar centroid. Deterministic,
numpy only, a second or two for 40 users.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

NGRAMS = (1, 2, 3, 4)  # character n-gram orders
MIN_DF = 2  # n-grams seen in fewer training texts carry no user signal (and would overfit to one text)
MAX_FEATURES = 60000  # the most frequent n-grams kept (by document frequency)


def char_ngrams(text: str, orders=NGRAMS) -> Counter:
    padded = f" {text} "
    return Counter(padded[i:i + n] for n in orders for i in range(len(padded) - n + 1))


class Attributor:
    """Trained on {user: [texts]}; attribute(text) -> the user whose style it is closest to."""

    def __init__(self, histories: dict[str, list[str]]):
        users = sorted(u for u, texts in histories.items() if any(t.strip() for t in texts))
        if len(users) < 2:
            raise ValueError("authorship attribution needs at least two users with texts")
        docs = [(u, char_ngrams(t)) for u in users for t in histories[u] if t.strip()]
        df = Counter(g for _, grams in docs for g in grams)
        kept = [g for g, c in df.most_common() if c >= MIN_DF][:MAX_FEATURES]
        self.index = {g: i for i, g in enumerate(kept)}
        self.idf = np.array([math.log(len(docs) / df[g]) + 1.0 for g in kept], dtype=np.float64)  # (F,)
        self.users = users
        centroids = np.zeros((len(users), len(kept)))  # (U, F)
        row = {u: i for i, u in enumerate(users)}
        counts = Counter(u for u, _ in docs)
        for u, grams in docs:
            centroids[row[u]] += self._vector(grams) / counts[u]
        norms = np.linalg.norm(centroids, axis=1, keepdims=True)
        self.centroids = centroids / np.where(norms > 0, norms, 1.0)

    def _vector(self, grams: Counter) -> np.ndarray:
        v = np.zeros(len(self.index))  # (F,)
        for g, c in grams.items():
            i = self.index.get(g)
            if i is not None:
                v[i] = 1.0 + math.log(c)  # sublinear term frequency
        v *= self.idf
        n = np.linalg.norm(v)
        return v / n if n > 0 else v

    def scores(self, text: str) -> np.ndarray:
        """Cosine similarity of `text` to every user's centroid. -> (U,)"""
        return self.centroids @ self._vector(char_ngrams(text))

    def attribute(self, text: str) -> str:
        """The most similar user; an empty text is nobody's: ""."""
        if not text.strip():
            return ""
        s = self.scores(text)
        return self.users[int(np.argmax(s))] if s.any() else ""

    def correct(self, user: str, text: str) -> bool:
        return self.attribute(text) == user


def length_ratio(output: str, reference: str) -> float:
    """Words in the output over words in the reference (1.0 = same length; an empty reference counts as 1 word)."""
    return len(output.split()) / max(1, len(reference.split()))
