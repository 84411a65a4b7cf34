"""How stages report progress without knowing who is watching.

The API takes any object with these methods; the CLI passes a rich progress bar
on a terminal and plain one-line-per-step output in CI or pipes. Library users
pass nothing and get silence.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def stage(self, message: str) -> None: ...

    def start(self, total_bytes: int, total_tensors: int) -> None: ...

    def advance(self, name: str, nbytes: int) -> None: ...

    def finish(self) -> None: ...


class Silent:
    def stage(self, message: str) -> None:
        pass

    def start(self, total_bytes: int, total_tensors: int) -> None:
        pass

    def advance(self, name: str, nbytes: int) -> None:
        pass

    def finish(self) -> None:
        pass
