"""`python -m keras_vit ...`: the `keras-vit` command line."""

import sys

from keras_vit.cli import main

if __name__ == "__main__":  # imported (the docs' API reference reads every module), it runs nothing
    sys.exit(main())
