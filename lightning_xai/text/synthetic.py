"""A generated text-classification task with a planted spurious token (the text analogue of a shortcut).

Sentences are sequences of word ids. The label is carried by a few "sentiment" words (noisily: a
share of them come from the other class), and in the training split a meaningless token ``"zz"`` is
added to most positive sentences, so a model can get high training accuracy by reading ``"zz"``
alone. In the ``"random"`` split the token appears independently of the label, so a model that took
the shortcut loses accuracy there, and token attributions land on it. Pure torch, seeded, offline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch import Tensor

from lightning_xai._utils import check_choice, check_positive_int, expected

__all__ = ["MODES", "NEGATIVE_WORDS", "NEUTRAL_WORDS", "PAD", "POSITIVE_WORDS", "SPURIOUS", "VOCAB", "TokenData",
           "spurious_token_data", "vocab"]

PAD, SPURIOUS = "<pad>", "zz"
POSITIVE_WORDS = ("good", "great", "fine", "superb", "lovely", "fun")
NEGATIVE_WORDS = ("bad", "awful", "poor", "dull", "boring", "weak")
NEUTRAL_WORDS = ("the", "a", "film", "plot", "actor", "scene", "it", "was", "and", "story", "music", "end")
VOCAB: Tuple[str, ...] = (PAD, SPURIOUS) + POSITIVE_WORDS + NEGATIVE_WORDS + NEUTRAL_WORDS
MODES = ("planted", "random", "none")


@dataclass
class TokenData:
    """One split: ``input_ids (N, T)`` (int64, no padding), ``labels (N,)`` and ``marked (N,)`` (has ``"zz"``)."""

    input_ids: Tensor
    labels: Tensor
    marked: Tensor

    def tensors(self) -> Tuple[Tensor, Tensor]:
        return self.input_ids, self.labels


def spurious_token_data(n: int = 512, length: int = 12, shortcut: str = "planted", spurious_rate: float = 0.95,
                        sentiment_words: int = 2, label_noise_words: float = 0.25, seed: int = 0) -> TokenData:
    """Generate ``n`` sentences of ``length`` word ids over :data:`VOCAB` with binary labels.

    Args:
        n: number of sentences.
        length: tokens per sentence.
        shortcut: ``"planted"`` (``"zz"`` in ``spurious_rate`` of positives and no negatives),
            ``"random"`` (``"zz"`` in half the sentences, whatever the label) or ``"none"``.
        spurious_rate: share of positive sentences carrying ``"zz"`` when planted.
        sentiment_words: sentiment words per sentence.
        label_noise_words: probability that a sentiment word comes from the other class.
        seed: seed of a private generator (the global RNG is untouched).

    Example:
        >>> data = spurious_token_data(8, length=6)
        >>> data.input_ids.shape, data.labels.tolist()[:4]
        (torch.Size([8, 6]), [0, 1, 0, 1])
    """
    check_positive_int("n", n)
    check_positive_int("length", length)
    check_choice("shortcut", shortcut, MODES)
    check_positive_int("sentiment_words", sentiment_words)
    if length < sentiment_words + 1:
        raise ValueError(expected("length", f"at least sentiment_words + 1 = {sentiment_words + 1}", length))
    if not 0 <= spurious_rate <= 1 or not 0 <= label_noise_words <= 1:
        raise ValueError(expected("spurious_rate and label_noise_words", "probabilities in [0, 1]",
                                  (spurious_rate, label_noise_words)))
    gen = torch.Generator().manual_seed(seed)
    index = {w: i for i, w in enumerate(VOCAB)}
    pos = torch.tensor([index[w] for w in POSITIVE_WORDS])
    neg = torch.tensor([index[w] for w in NEGATIVE_WORDS])
    neutral = torch.tensor([index[w] for w in NEUTRAL_WORDS])
    labels = torch.arange(n) % 2  # balanced: 0, 1, 0, 1, ...
    ids = neutral[torch.randint(len(neutral), (n, length), generator=gen)]  # (N, T)
    flip = torch.rand(n, sentiment_words, generator=gen) < label_noise_words
    cls = torch.where(flip, 1 - labels.unsqueeze(1), labels.unsqueeze(1))  # (N, S) class of each sentiment word
    words = torch.where(cls == 1, pos[torch.randint(len(pos), (n, sentiment_words), generator=gen)],
                        neg[torch.randint(len(neg), (n, sentiment_words), generator=gen)])
    slots = torch.rand(n, length, generator=gen).argsort(1)  # a random permutation of positions per sentence
    ids.scatter_(1, slots[:, :sentiment_words], words)
    if shortcut == "planted":
        marked = (labels == 1) & (torch.rand(n, generator=gen) < spurious_rate)
    elif shortcut == "random":
        marked = torch.rand(n, generator=gen) < 0.5
    else:
        marked = torch.zeros(n, dtype=torch.bool)
    rows = marked.nonzero().view(-1)
    ids[rows, slots[rows, sentiment_words]] = index[SPURIOUS]
    return TokenData(ids, labels, marked)


def vocab() -> List[str]:
    """The vocabulary as a list (id -> word)."""
    return list(VOCAB)
