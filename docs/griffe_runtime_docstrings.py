"""A griffe extension for the API reference: docstrings written at import time.

keras_vit.models gives every constructor one docstring template, filled in
when the module is imported (and `ViT`'s shares its arguments' text with
them), so reading the source (griffe's static analysis, what the rest of
the reference uses) finds none. For the modules in RUNTIME_DOCSTRINGS, each
function's docstring is taken from the imported function instead.
"""

import importlib
import inspect
import os
import sys

import griffe

RUNTIME_DOCSTRINGS = ("keras_vit.models",)
# The checkout these docs describe, first: not another keras_vit installed in the environment.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class RuntimeDocstrings(griffe.Extension):
    def on_function(self, *, func, loader, **kwargs):
        if func.parent is None or func.parent.path not in RUNTIME_DOCSTRINGS:
            return
        text = inspect.getdoc(getattr(importlib.import_module(func.parent.path), func.name, None))
        if text and (func.docstring is None or func.docstring.value != text):
            func.docstring = griffe.Docstring(text, parent=func, parser=loader.docstring_parser,
                                              parser_options=loader.docstring_options)
