"""The `keras-vit` command line (also `python -m keras_vit`).

Each subcommand is a pair: `_add_NAME(subparsers)` declares its arguments and
`_run_NAME(args)` does the work. User mistakes raise `UsageError` (or
ValueError / FileNotFoundError from the library) and are printed as one line,
never as a traceback.
"""

import argparse
import os
import sys


class UsageError(Exception):
    """A mistake in how the command was called: printed as one line."""


# ---------------------------------------------------------------------------
# list
# ---------------------------------------------------------------------------


def _add_list(subparsers):
    parser = subparsers.add_parser("list", help="list the model constructors and the official checkpoints")
    parser.add_argument("what", nargs="?", choices=("all", "models", "weights"), default="all")


def _run_list(args):
    import keras_vit

    if args.what in ("all", "models"):
        print(keras_vit.models.format_constructors_table())
    if args.what in ("all", "weights"):
        if args.what == "all":
            print()
        print(keras_vit.list_weights(print_table=False))


SUBCOMMANDS = {"list": (_add_list, _run_list)}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-vit",
        description="Vision Transformers for Keras 3, with Google's official checkpoints.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add, _ in SUBCOMMANDS.values():
        add(subparsers)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print(f"keras-vit: error: choose a command: {', '.join(SUBCOMMANDS)} (see keras-vit --help)", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        SUBCOMMANDS[args.command][1](args)
    except (UsageError, ValueError, FileNotFoundError, PermissionError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"keras-vit {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("keras-vit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
