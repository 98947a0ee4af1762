"""The offline smoke task: synthetic movie-review sentiment, generated here, no download.

Every sentence is built from templates over small word lists, and its label follows a fixed
rule, so the task is exactly as hard as the rule:

* a plain clause takes the polarity of its adjective ("the plot was dull" -> negative);
* negation flips it, next to the adjective ("the acting was not convincing", "far from
  convincing", "anything but convincing") or at a distance ("i would not say the acting was
  convincing") -> negative;
* in "X, but Y" the clause after "but" decides; with "although" the main clause decides
  wherever it stands ("although X, Y" -> Y; "X, although Y" -> X), as in SST-style reviews.

A bag of words cannot solve the negated and contrastive sentences, so a model has to learn
something about word order. The eval set uses only adjectives that never occur in training (a
third of each list, held out), so eval accuracy also measures how well the pretrained
knowledge of word meaning survives fine-tuning, and it does not saturate at 100%. It is a
smoke test that training works and a yardstick between variants, not a benchmark.
"""

from __future__ import annotations

import random

POSITIVE = (
    "good", "great", "wonderful", "brilliant", "moving", "charming", "delightful", "superb",
    "gripping", "clever", "funny", "beautiful", "convincing", "memorable", "fresh", "touching",
    "lovely", "excellent", "thoughtful", "stunning", "enjoyable", "powerful", "witty",
    "engaging", "inspired", "elegant", "heartfelt", "magnificent", "terrific", "compelling",
)
NEGATIVE = (
    "bad", "awful", "boring", "dull", "clumsy", "tedious", "weak", "forgettable", "messy",
    "terrible", "bland", "lazy", "predictable", "shallow", "annoying", "painful", "flat",
    "confusing", "pointless", "dreadful", "lifeless", "mediocre", "tiresome", "sloppy",
    "incoherent", "dismal", "stale", "irritating", "unwatchable", "hollow",
)
HELD_OUT = 3  # every third adjective of each list appears only in the eval set
SUBJECTS = (
    "the movie", "this film", "the plot", "the acting", "the script", "the soundtrack",
    "the ending", "the cast", "the dialogue", "the director's work", "the story", "the score",
    "the pacing", "the lead performance", "the cinematography", "the humor",
)
INTENSIFIERS = ("", "", "very ", "really ", "quite ", "truly ", "rather ", "utterly ")
NEGATED_PREDICATES = ("was not", "was never", "was far from", "was anything but")
DISTANT_NEGATIONS = ("i would not say", "nobody would claim", "i cannot say")
LABELS = ("negative", "positive")


Lexicon = tuple[tuple[str, ...], tuple[str, ...]]  # (negative adjectives, positive adjectives)


def _split(words: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (
        tuple(w for i, w in enumerate(words) if i % HELD_OUT),
        tuple(w for i, w in enumerate(words) if not i % HELD_OUT),
    )


def _clause(rng: random.Random, lexicon: Lexicon) -> tuple[str, int]:
    positive = rng.random() < 0.5
    adjective = rng.choice(lexicon[positive])
    subject = rng.choice(SUBJECTS)
    form = rng.random()
    if form < 0.25:
        return f"{subject} {rng.choice(NEGATED_PREDICATES)} {adjective}", int(not positive)
    if form < 0.4:
        return f"{rng.choice(DISTANT_NEGATIONS)} {subject} was {adjective}", int(not positive)
    return f"{subject} was {rng.choice(INTENSIFIERS)}{adjective}", int(positive)


def _sentence(rng: random.Random, lexicon: Lexicon) -> tuple[str, int]:
    first, first_label = _clause(rng, lexicon)
    form = rng.random()
    if form < 0.5:
        return first + ".", first_label
    second, second_label = _clause(rng, lexicon)
    if form < 0.75:
        return f"{first}, but {second}.", second_label
    if form < 0.875:
        return f"although {first}, {second}.", second_label
    return f"{first}, although {second}.", first_label


def _draw(rng: random.Random, lexicon: Lexicon, n: int) -> list[dict]:
    seen: set[str] = set()
    examples: list[dict] = []
    for _ in range(50 * n):
        text, label = _sentence(rng, lexicon)
        if text not in seen:
            seen.add(text)
            examples.append({"sentence": text, "label": label})
            if len(examples) == n:
                return examples
    raise ValueError(f"cannot draw {n} distinct smoke-task sentences")


def generate(n_train: int, n_eval: int, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """Train and eval sets of ``{"sentence": str, "label": 0|1}``, balanced in expectation, with
    disjoint adjective vocabularies. Deterministic in ``seed``, which is kept apart from the
    training seed so that every run sees the same data."""
    (neg_train, neg_eval), (pos_train, pos_eval) = _split(NEGATIVE), _split(POSITIVE)
    rng = random.Random(seed)
    return _draw(rng, (neg_train, pos_train), n_train), _draw(rng, (neg_eval, pos_eval), n_eval)
