"""The two offline tasks, generated here with no download: ``task=smoke`` (classification,
``generate_smoke``) and ``task=sft_smoke`` (instruction tuning, ``generate_sft_smoke``).

Both are deterministic (their own seeds, kept apart from the training seed, so every run sees the
same data), share no example between training and evaluation, and check that training works and
compare variants; neither is a benchmark.

## smoke: synthetic movie-review sentiment

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
knowledge of word meaning survives fine-tuning, and it does not saturate at 100%.

## sft_smoke: short instructions

Each example is a short instruction with one checkable answer, drawn from five skills:

* lookup:   "Values: red=4, blue=9, green=2. What is blue? Answer with the value only." -> "9"
* sequence: "Continue the sequence with its next number: 3, 7, 11, 15," -> "19"
* larger:   "Which is larger, 58 or 85? Answer with the number only." -> "85"
* sort:     "Sort these numbers in ascending order: 42 17 93" -> "17 42 93"
* count:    "How many times does the word 'cat' appear? dog cat cat fox cat" -> "3"

The answers are short and exact, so greedy generation can be scored by exact match. A small
instruction-tuned model gets some of the content right but answers in sentences ("The value of
blue is 9."), so it mostly fails exact match before fine-tuning; ``answer_in_output`` (the
answer appears in what it wrote) separates the two. Training and evaluation draw from
different random streams and share no prompt.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from schema import ConfigError

from .examples import Example

# ---------------------------------------------------------------- smoke: movie-review sentiment

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


def _draw_reviews(rng: random.Random, lexicon: Lexicon, n: int) -> list[Example]:
    seen: set[str] = set()
    examples: list[Example] = []
    for _ in range(50 * n):
        text, label = _sentence(rng, lexicon)
        if text not in seen:
            seen.add(text)
            examples.append({"sentence": text, "label": label})
            if len(examples) == n:
                return examples
    raise ValueError(f"cannot draw {n} distinct smoke-task sentences")


def generate_smoke(n_train: int, n_eval: int, seed: int = 1234) -> tuple[list[Example], list[Example]]:
    """Train and eval sets of ``{"sentence": str, "label": 0|1}``, balanced in expectation, with
    disjoint adjective vocabularies. Deterministic in ``seed``, which is kept apart from the
    training seed so that every run sees the same data."""
    (neg_train, neg_eval), (pos_train, pos_eval) = _split(NEGATIVE), _split(POSITIVE)
    rng = random.Random(seed)
    return _draw_reviews(rng, (neg_train, pos_train), n_train), _draw_reviews(rng, (neg_eval, pos_eval), n_eval)


# ---------------------------------------------------------------- sft_smoke: short instructions

NAMES = ("red", "blue", "green", "pink", "gold", "gray", "teal", "plum", "rose", "sand", "jade", "navy")
WORDS = ("cat", "dog", "fox", "owl", "bee", "cow", "elk", "ant")
TRAIN_SEED, EVAL_SEED = 1234, 98765


def _lookup(rng: random.Random) -> Example:
    names = rng.sample(NAMES, rng.randint(3, 5))
    values = {name: rng.randint(1, 9) for name in names}
    asked = rng.choice(names)
    pairs = ", ".join(f"{name}={value}" for name, value in values.items())
    return {"prompt": f"Values: {pairs}. What is {asked}? Answer with the value only.",
            "response": str(values[asked])}


SEQUENCE_RANGES = ((1, 30), (2, 9), (3, 5))  # start, step, terms shown: inclusive


def _sequence(rng: random.Random) -> Example:
    start, step, length = (rng.randint(low, high) for low, high in SEQUENCE_RANGES)
    terms = [start + step * i for i in range(length + 1)]
    shown = ", ".join(str(t) for t in terms[:-1])
    return {"prompt": f"Continue the sequence with its next number: {shown},", "response": str(terms[-1])}


def _larger(rng: random.Random) -> Example:
    a, b = rng.sample(range(10, 100), 2)
    return {"prompt": f"Which is larger, {a} or {b}? Answer with the number only.", "response": str(max(a, b))}


def _sort(rng: random.Random) -> Example:
    numbers = rng.sample(range(10, 100), rng.randint(3, 4))
    return {"prompt": "Sort these numbers in ascending order: " + " ".join(map(str, numbers)),
            "response": " ".join(map(str, sorted(numbers)))}


def _count(rng: random.Random) -> Example:
    target = rng.choice(WORDS)
    words = [rng.choice(WORDS) for _ in range(rng.randint(5, 9))]
    return {"prompt": f"How many times does the word '{target}' appear? " + " ".join(words),
            "response": str(words.count(target))}


SKILLS: tuple[Callable[[random.Random], Example], ...] = (_lookup, _sequence, _larger, _sort, _count)
# The skill with the fewest distinct prompts, sequence (every fifth example from the second):
# 30 starts x 8 steps x 3 lengths. Train and eval share none, so together they hold at most these.
SEQUENCE_PROMPTS = math.prod(high - low + 1 for low, high in SEQUENCE_RANGES)


def sft_smoke_max_train_size(eval_size: int) -> int:
    """The largest ``train_size`` that, beside ``eval_size``, draws no prompt twice (beyond it the
    draw would never end)."""
    sequences_left = SEQUENCE_PROMPTS - (eval_size + 3) // 5
    return 5 * sequences_left + 1  # the examples before the (sequences_left + 1)-th sequence one


def _draw_instructions(n: int, seed: int, exclude: set[str]) -> list[Example]:
    rng, examples, seen = random.Random(seed), [], set(exclude)
    for _ in range(100 * (n + 100)):  # far more draws than sft_smoke_max_train_size's sets need
        if len(examples) == n:
            return examples
        example = SKILLS[len(examples) % len(SKILLS)](rng)  # the skills in turn: equal shares
        if example["prompt"] not in seen:
            seen.add(example["prompt"])
            examples.append(example)
    raise RuntimeError(f"sft_smoke drew {len(examples)} of {n} distinct prompts and found no more "
                       "(sft_smoke_max_train_size)")


def generate_sft_smoke(train_size: int, eval_size: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): ``{"prompt", "response"}`` dicts, the same on every call; no eval prompt
    occurs in training."""
    if train_size > sft_smoke_max_train_size(eval_size):
        raise ConfigError(f"task.train_size={train_size} with task.eval_size={eval_size} asks for more distinct "
                          f"prompts than sft_smoke has; allowed: train_size <= {sft_smoke_max_train_size(eval_size)} "
                          "at this eval_size")
    train = _draw_instructions(train_size, TRAIN_SEED, set())
    return train, _draw_instructions(eval_size, EVAL_SEED, {ex["prompt"] for ex in train})
