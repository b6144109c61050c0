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


# ---------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------

CONVERT_SUFFIXES = (".keras", ".weights.h5")


def _add_convert(subparsers):
    parser = subparsers.add_parser(
        "convert",
        help="convert an official .npz checkpoint (file or tag) into a .keras model or .weights.h5 file",
        description="Loads an official checkpoint strictly into a keras_vit model and saves it. "
        "CHECKPOINT is a .npz file or a checkpoint tag/official name (see `keras-vit list weights`).",
    )
    parser.add_argument("checkpoint", help="official .npz file, or a checkpoint tag such as in21k+in1k")
    parser.add_argument("output", help="OUT.keras (whole model) or OUT.weights.h5 (weights only)")
    parser.add_argument("--model", required=True, help="constructor name, e.g. ViT_B16")
    parser.add_argument("--classes", type=int, default=None,
                        help="head size (default the checkpoint's; another count gets a zero-initialised head)")
    parser.add_argument("--image-size", type=int, nargs="+", metavar="PIXELS", default=None,
                        help="input size: SIDE or HEIGHT WIDTH (default the checkpoint's resolution)")
    parser.add_argument("--no-top", action="store_true", help="drop the head (include_top=False)")
    pre_logits = parser.add_mutually_exclusive_group()
    pre_logits.add_argument("--keep-pre-logits", dest="keep_pre_logits", action="store_const", const=True)
    pre_logits.add_argument("--drop-pre-logits", dest="keep_pre_logits", action="store_const", const=False)
    parser.add_argument("--sha256", default=None, help="SHA-256 the checkpoint file must have")


def _run_convert(args):
    import keras_vit

    if not args.output.endswith(CONVERT_SUFFIXES):
        raise UsageError(f"OUTPUT must end with {' or '.join(CONVERT_SUFFIXES)}, got {args.output!r}.")
    if args.image_size is not None and len(args.image_size) not in (1, 2):
        raise UsageError("--image-size takes SIDE or HEIGHT WIDTH.")
    input_shape = None
    if args.image_size:
        height, width = (args.image_size * 2)[:2]
        input_shape = (height, width, 3)
    constructor = keras_vit.get_constructor(args.model)
    model = constructor(
        weights=args.checkpoint,
        include_top=not args.no_top,
        classes=args.classes,
        input_shape=input_shape,
        keep_pre_logits=args.keep_pre_logits,
        expected_sha256=args.sha256,
    )
    folder = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(folder, exist_ok=True)
    if args.output.endswith(".keras"):
        model.save(args.output)
    else:
        model.save_weights(args.output)
    print(f"{args.model} ({model.count_params():,} parameters, input {model.input_shape[1:]}, "
          f"output {model.output_shape[1:]}) -> {args.output}")


SUBCOMMANDS = {"list": (_add_list, _run_list), "convert": (_add_convert, _run_convert)}


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
    except (UsageError, ValueError, OSError) as error:  # OSError: missing files, downloads
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"keras-vit {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("keras-vit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
