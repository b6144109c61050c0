"""One-line user errors: what the library, the CLI and the examples raise and print for a mistake."""


class UsageError(Exception):
    """A mistake in how keras_vit was called (a flag, a file, a name): printed as one line."""


def first_line(error):
    """An exception's message, first line only: errors reach users as one line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
