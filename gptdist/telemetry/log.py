"""Messages for the user, on stderr, from rank 0 only: other ranks stay quiet unless they fail."""

from __future__ import annotations

import sys


class RankZeroLog:
    def __init__(self, is_main: bool):
        self.is_main = is_main

    def info(self, message: str) -> None:
        if self.is_main:
            print(message, file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        if self.is_main:
            print(f"gptdist | warning: {message}", file=sys.stderr, flush=True)

    def error(self, message: str) -> None:
        if self.is_main:
            print(f"gptdist | error: {message}", file=sys.stderr, flush=True)
