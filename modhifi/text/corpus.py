"""Real English text for the text models: Debian's `fortunes` quotations in named categories.

Each category is one file of quotations separated by lines holding only `%`. A `Corpus` is a
seeded split of whole quotations, stratified by category: `train` (for the linear probe),
`calibration` (statistics, used unlabeled) and `test` (every reported figure).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from modhifi.errors import UserError

FORTUNES = Path("/usr/share/games/fortunes")
CATEGORIES = ("art", "computers", "definitions", "people", "politics", "science", "wisdom", "work")
SHARES = {"test": 0.2, "calibration": 0.2}  # of each category; the rest is train
SEED = 0


@dataclass(frozen=True)
class TextSplit:
    """Quotations and the index of each one's category."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, count: int) -> TextSplit:
        """The first `count` quotations (the split is already a seeded shuffle)."""
        return TextSplit(self.texts[:count], self.labels[:count])


@dataclass(frozen=True)
class Corpus:
    """A seeded split of the fortunes of some categories."""

    name: str
    categories: tuple[str, ...]
    train: TextSplit
    calibration: TextSplit
    test: TextSplit

    @property
    def classes(self) -> tuple[str, ...]:  # the same word the image datasets use
        return self.categories


def read_quotations(path: Path) -> list[str]:
    """The quotations of one fortunes file, each on one line with its whitespace collapsed."""
    text = path.read_text(encoding="utf-8", errors="replace")
    entries = (" ".join(entry.split()) for entry in text.split("\n%\n"))
    return [entry for entry in entries if entry and entry != "%"]


def load_fortunes(folder: Path = FORTUNES, categories: tuple[str, ...] = CATEGORIES,
                  seed: int = SEED) -> Corpus:
    """The fortunes corpus, split into train, calibration and test by a seeded shuffle.

    Raises:
        UserError: when the folder or a category file is missing.
    """
    missing = [name for name in categories if not (folder / name).is_file()]
    if missing:
        raise UserError(f"fortunes categories {', '.join(missing)} are missing from {folder}: "
                        "install Debian's fortunes package (apt-get install fortunes; ./setup.sh "
                        "does it)")
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "calibration": [], "test": []}
    generator = random.Random(seed)
    for label, name in enumerate(categories):
        quotes = sorted(set(read_quotations(folder / name)))  # sorted: the seed alone decides
        generator.shuffle(quotes)
        cut_test = round(SHARES["test"] * len(quotes))
        cut_calibration = cut_test + round(SHARES["calibration"] * len(quotes))
        splits["test"] += [(q, label) for q in quotes[:cut_test]]
        splits["calibration"] += [(q, label) for q in quotes[cut_test:cut_calibration]]
        splits["train"] += [(q, label) for q in quotes[cut_calibration:]]
    for rows in splits.values():  # mix the categories, so that a head of a split has them all
        generator.shuffle(rows)
    made = {key: TextSplit(tuple(q for q, _ in rows), tuple(c for _, c in rows))
            for key, rows in splits.items()}
    return Corpus("fortunes", tuple(categories), **made)
