"""The offline instruction-tuning smoke task (``task=sft_smoke``): generated here, no download.

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
different random streams and share no prompt. Like the classification smoke task, it checks
that instruction tuning works and compares variants; it is not a benchmark.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

Example = dict[str, str]

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


def max_train_size(eval_size: int) -> int:
    """The largest ``train_size`` that, beside ``eval_size``, draws no prompt twice (beyond it the
    draw would never end)."""
    sequences_left = SEQUENCE_PROMPTS - (eval_size + 3) // 5
    return 5 * sequences_left + 1  # the examples before the (sequences_left + 1)-th sequence one


def _draw(n: int, seed: int, exclude: set[str]) -> list[Example]:
    rng, examples, seen = random.Random(seed), [], set(exclude)
    for _ in range(100 * (n + 100)):  # far more draws than max_train_size's sets need
        if len(examples) == n:
            return examples
        example = SKILLS[len(examples) % len(SKILLS)](rng)  # the skills in turn: equal shares
        if example["prompt"] not in seen:
            seen.add(example["prompt"])
            examples.append(example)
    raise RuntimeError(f"sft_smoke drew {len(examples)} of {n} distinct prompts and found no more (max_train_size)")


def generate(train_size: int, eval_size: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): ``{"prompt", "response"}`` dicts, the same on every call; no eval prompt
    occurs in training."""
    train = _draw(train_size, TRAIN_SEED, set())
    return train, _draw(eval_size, EVAL_SEED, {ex["prompt"] for ex in train})
