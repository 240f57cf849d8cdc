"""How every command answers a user's mistake: one line on stderr, ``<prog>: error: <problem>``.

A problem's text may come from a library (a config class's validator, a JSON decoder, an OS
error) and carry newlines or a page of detail; a cluster user reads the last line of a job's log
on every rank, so the line is made one line here, once, for every command.
"""
from __future__ import annotations

import argparse
import sys

MAX_CHARS = 1000  # transformers lists its ~400 model types in one message: the start says enough


def one_line(problem: object) -> str:
    """``problem`` as one line: whitespace runs (newlines included) become one space; past
    MAX_CHARS the rest is cut and marked."""
    text = " ".join(str(problem).split())
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS - 5].rstrip() + " ... "


def say_error(prog: str, problem: object) -> None:
    """Write ``prog: error: problem`` as one line with one write (ranks share the pipe, and
    print's separate writes of text and newline interleave between processes)."""
    sys.stderr.write(f"{prog}: error: {one_line(problem)}\n")
    sys.stderr.flush()


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose command-line mistakes are one line too (argparse prints the
    whole usage first: a screenful per rank under a launcher), pointing to ``--help``."""

    def error(self, message: str):
        say_error(self.prog, f"{message} (see {self.prog} --help)")
        sys.exit(2)


def whole_number(minimum: int = 1):
    """An argparse ``type``: an integer of at least ``minimum``. A count given as 0 or -1 is
    refused when the command line is read (``argument --nproc: -1 must be at least 1``),
    before any work, rather than taken as "the default" or failing minutes later as a
    derived config value the user never wrote."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value

    return parse


def positive_number(text: str) -> float:
    """An argparse ``type``: a finite number above 0 (a size or an amount of memory)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a number above 0")
    return value
