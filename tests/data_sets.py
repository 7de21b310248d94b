"""The registered data sets the test suite reads in full (``data_file`` fixture, ``data`` mark).

Run as a script, it prints those missing on this machine (``$ATTNEDIT_DATA`` or the cache) and exits 1
when any is: ``scripts/test.sh`` then runs the self-contained suite and says what to fetch."""

from __future__ import annotations

import sys

DATA_SETS = (
    "sadr-counterfact",
    "knowedit-counterfact",
    "knowedit-zsre",
    "counterfact-mend",
    "zsre-train-1k",
    "bmike53-ca",
    "bmike53-fr",
    "bmike53-es",
    "bmike53-de",
)


def missing() -> list[str]:
    """The sets of ``DATA_SETS`` not on this machine."""
    from attnedit.core.datasets import get_dataset, locate

    return [name for name in DATA_SETS if any(locate(f)[0] is None for f in get_dataset(name).files)]


if __name__ == "__main__":
    absent = missing()
    print(" ".join(absent))
    sys.exit(1 if absent else 0)
