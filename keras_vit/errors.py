"""One-line user errors: what the library, the CLI and the examples raise and print for a mistake."""

import numbers


class UsageError(Exception):
    """A mistake in how keras_vit was called (a flag, a file, a name): printed as one line."""


def is_whole_number(value):
    """An int (Python or numpy), not a bool: what a count, a size or a step must be."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def first_line(error):
    """An exception's message, first line only: errors reach users as one line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
