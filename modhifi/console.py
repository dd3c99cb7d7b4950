"""What the command line tells people and how it reads what they type: progress lines on
stderr (from process 0 alone when torchrun starts several), progress in tenths, and a class
given by index or by name. Shared by the image commands (`modhifi.__main__`) and the text ones
(`modhifi.text.commands`).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable

from modhifi.errors import UserError

# This process's place among those torchrun started (0 of 1 alone), read once.
RANK, WORLD = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def progress(line: str) -> None:
    """One line on stderr, `modhifi: ` first."""
    if RANK == 0:  # one voice when torchrun starts several processes
        print(f"modhifi: {line}", file=sys.stderr, flush=True)


def tenths(what: str) -> Callable[[float], None]:
    """A progress line at every tenth of the way (streamed image folders take a while), again
    from the start for each round of `--steps`."""
    shown: set[int] = set()

    def report(share: float) -> None:
        tenth = int(share * 10)
        if shown and tenth < max(shown):  # the next round's statistics
            shown.clear()
        if tenth not in shown:
            shown.add(tenth)
            progress(f"{what}: {share:.0%}")
    return report


def class_index(dataset, name: str) -> int:
    """A class given by name (`Sandal`, any case) or by index (`5`). A name comes first: in an
    image folder whose classes are `1, 10, 2`, `1` is the class named 1, not the second."""
    classes = list(dataset.classes)
    if name in classes:
        return classes.index(name)
    lowered = [c.lower() for c in classes]
    if name.lower() in lowered:
        return lowered.index(name.lower())
    if name.isascii() and name.isdigit():
        if int(name) >= len(dataset.classes):
            raise UserError(f"forget class {name} is out of range for {dataset.name}: use "
                            f"0..{len(dataset.classes) - 1} or a class name")
        return int(name)
    raise UserError(f"no class {name!r} in {dataset.name}: use an index "
                    f"0..{len(dataset.classes) - 1} or one of {', '.join(dataset.classes)}")
