"""Who uses each disk's backups in the repository, and the prune that must have
them to itself (`Uses`)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from .errors import RepositoryError


class Uses:
    """Who uses each disk's backups: a copy writing a new one (over one of them), a
    restore or a verify reading them, and a prune changing them. A prune needs them
    unused, and nothing else may use them while it runs (a new backup over a file it
    drops, a restore reading a file as it is replaced by its flattened copy, would be
    wrong). Neither waits for the other: the later one gets RepositoryError saying
    what to wait for. Used from the event loop's thread only.

    And one copy at a time writes a disk's next backup: each takes the number after
    the newest and removes the partial files it finds (a crash's), so a second would
    take the first's number and its file. One job at a time per domain keeps to it
    (admission.py); this keeps the repository's files right whoever calls it."""

    def __init__(self) -> None:
        self._users: Counter[Path] = Counter()
        self._pruning: set[Path] = set()
        self._writing: set[Path] = set()

    def take(self, folder: Path) -> None:
        if folder in self._pruning:
            raise RepositoryError(str(folder), "a prune of these backups runs: try again "
                                               "once it ended")
        self._users[folder] += 1

    def give(self, folder: Path) -> None:
        self._users[folder] -= 1
        if not self._users[folder]:
            del self._users[folder]

    def write(self, folder: Path) -> None:
        """A copy begins the next backup in `folder` (a use, until `written`)."""
        if folder in self._writing:
            raise RepositoryError(str(folder), "a backup of this disk is being written: "
                                               "start this one once it ended")
        self.take(folder)
        self._writing.add(folder)

    def written(self, folder: Path) -> None:
        self._writing.discard(folder)
        self.give(folder)

    @contextlib.contextmanager
    def using(self, folder: Path) -> Iterator[None]:
        self.take(folder)
        try:
            yield
        finally:
            self.give(folder)

    @contextlib.contextmanager
    def pruning(self, folder: Path) -> Iterator[None]:
        if folder in self._pruning or self._users[folder]:
            raise RepositoryError(str(folder), "in use by a backup being written, a restore "
                                               "or a verify: prune once it ended")
        self._pruning.add(folder)
        try:
            yield
        finally:
            self._pruning.discard(folder)

