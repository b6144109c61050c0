"""The documentation site (docs/, mkdocs.yml) and the README stay true to the code.

The site is built once per session with `mkdocs build --strict` (a broken
link, a missing anchor or an API object mkdocstrings cannot find fails it),
or read from $KERAS_VIT_SITE_DIR, where `.ci/run` has just built it. The
pages' code blocks run in their own step (`pytest --markdown-docs`, see
conftest.py); here: the API reference covers the public API, the README
is short and its links resolve, and the tables the code prints are shown
as it prints them.
"""

import importlib
import inspect
import os
import re
import subprocess
import sys

import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPOSITORY, "docs")
README = os.path.join(REPOSITORY, "README.md")

# The modules with an API reference page (docs/reference/); keras_vit's own
# top-level names are checked separately.
REFERENCE_MODULES = (
    "keras_vit.models", "keras_vit.hybrid", "keras_vit.layers", "keras_vit.data", "keras_vit.training",
    "keras_vit.evaluation", "keras_vit.evaluation.vtab", "keras_vit.pretraining", "keras_vit.serving",
    "keras_vit.runtimes", "keras_vit.visualize",
)
SKIP_FIXTURES = {"needs_network", "needs_accelerator"}  # conftest.py's reasons not to run a block
FENCE_OPTIONS = re.compile(r"^(continuation|fixture:\w+)$")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
ANCHOR_ID = re.compile(r'id="([^"]+)"')


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _markdown_files():
    pages = [os.path.join(root, name) for root, _, names in os.walk(DOCS) for name in names if name.endswith(".md")]
    return sorted(pages) + [README]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The built site's folder."""
    built = os.environ.get("KERAS_VIT_SITE_DIR")
    if built:
        return built
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
    site_dir = str(tmp_path_factory.mktemp("site"))
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", site_dir],
                            cwd=REPOSITORY, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return site_dir


@pytest.fixture(scope="module")
def reference_ids(site):
    """Every anchor of the API reference pages: mkdocstrings gives each object its dotted path."""
    ids = set()
    for root, _, names in os.walk(os.path.join(site, "reference")):
        for name in names:
            if name.endswith(".html"):
                ids.update(ANCHOR_ID.findall(_read(os.path.join(root, name))))
    return ids


def _is_documentable(value):
    return inspect.isfunction(value) or inspect.isclass(value)


def _public_api():
    """(module, name, object) of every public function and class: keras_vit's
    top-level names (its __all__ where it has one) and those each reference
    module defines, or, for a package, re-exports from its own modules."""
    import keras_vit

    names = getattr(keras_vit, "__all__", None) or [n for n in vars(keras_vit) if not n.startswith("_")]
    api = [("keras_vit", n, getattr(keras_vit, n)) for n in names]
    for module_name in REFERENCE_MODULES:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            origin = getattr(value, "__module__", None) or ""
            if not name.startswith("_") and (origin == module_name or origin.startswith(module_name + ".")):
                api.append((module_name, name, value))
    return [(m, n, v) for m, n, v in api if _is_documentable(v)]


def test_the_api_reference_documents_every_public_function_and_class(reference_ids):
    api = _public_api()
    assert len(api) > 100  # the constructors, the layers, training, evaluation, serving, ...
    missing = [
        f"{module}.{name}" for module, name, value in api
        if not {f"{module}.{name}", f"{value.__module__}.{value.__qualname__}"} & reference_ids
    ]
    assert not missing, f"not in the API reference (add a ::: entry or a docstring): {missing}"


def test_every_constructor_has_its_own_entry_with_its_docstring(site):
    from keras_vit import models

    page = _read(os.path.join(site, "reference", "models", "index.html"))
    for name, constructor in [("ViT", models.ViT), *models.CONSTRUCTORS.items()]:
        assert f'id="keras_vit.models.{name}"' in page, name
        title = constructor.__doc__.strip().splitlines()[0]  # "Builds ViT-B/16, the B/16 Vision Transformer ..."
        assert title.split(",")[0] in page, name
    assert "{application_args}" not in page  # ViT's docstring as the code formats it


def test_readme_is_short_and_opens_with_the_two_commands():
    lines = _read(README).splitlines()
    assert len(lines) <= 250
    first_screen = "\n".join(lines[:30])
    assert "bash .ci/demo" in first_screen and "bash .ci/run" in first_screen


def _page_of(path):
    """docs/guides/serving.md -> (the site's HTML file of that page)."""
    relative = os.path.relpath(path, DOCS)[: -len(".md")]
    return "index.html" if relative == "index" else os.path.join(relative, "index.html")


def test_readme_links_reach_existing_files_and_anchors(site):
    links = [link for link in MARKDOWN_LINK.findall(_read(README)) if "://" not in link]
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        target, _, anchor = link.partition("#")
        path = os.path.normpath(os.path.join(REPOSITORY, target))
        assert os.path.exists(path), f"README links to {target}, which does not exist"
        if anchor:
            assert target.startswith("docs/") and target.endswith(".md"), link
            page = _read(os.path.join(site, _page_of(path)))
            assert f'id="{anchor}"' in page, f"README links to #{anchor}, which {target} does not have"


def test_code_blocks_are_fenced_and_every_python_block_runs_or_says_why_not():
    """Indented code blocks are neither highlighted nor tested: every block is
    a fence with a language; a Python fence runs, or names a skip fixture."""
    MarkdownIt = pytest.importorskip("markdown_it", reason="the docs extra is not installed").MarkdownIt
    plugin = pytest.importorskip("pytest_markdown_docs.plugin", reason="the docs extra is not installed")
    parse_superfences_block_info = plugin.parse_superfences_block_info

    python_blocks = 0
    for path in _markdown_files():
        for token in MarkdownIt().parse(_read(path)):
            where = f"{os.path.relpath(path, REPOSITORY)}:{token.map[0] + 1 if token.map else '?'}"
            assert token.type != "code_block", f"{where}: an indented code block; fence it (```bash, ```python)"
            if token.type != "fence":
                continue
            info = parse_superfences_block_info(token.info)
            assert info, f"{where}: a fence without a language"
            if info[0] in ("python", "py", "python3"):
                python_blocks += 1
                options = info[1:]
                assert all(FENCE_OPTIONS.match(option) for option in options), f"{where}: {options}"
                fixtures = {option.partition(":")[2] for option in options if option.startswith("fixture:")}
                assert fixtures <= SKIP_FIXTURES, f"{where}: unknown fixture {fixtures - SKIP_FIXTURES}"
    assert python_blocks > 20


def _between(text, start, end):
    return text[text.index(start): text.index(end, text.index(start))]


def test_the_full_registry_table_is_what_list_weights_prints():
    from keras_vit import registry

    page = _read(os.path.join(DOCS, "guides", "pretrained-weights.md"))
    assert registry.list_weights(print_table=False, markdown=True) in page


def test_the_constructors_table_is_what_the_command_line_prints():
    from keras_vit import cli

    table = cli.constructors_table(markdown=True)
    assert table in _read(README)
    assert table in _read(os.path.join(DOCS, "guides", "models.md"))


def test_the_brief_checkpoint_tables_agree_with_the_registry():
    """docs' short table: each reported top-1 with its source marker; the
    README's tag table: which architectures each tag has."""
    from keras_vit import models, registry

    entries = registry.registry()
    sources = registry.accuracy_sources()
    page = _read(os.path.join(DOCS, "guides", "pretrained-weights.md"))
    brief = _between(page, "## The checkpoints in brief", "## Downloads")
    rows = re.findall(r"^\| (\w+) \| `([^`]+)` \|.*\| ([\d.]+) \[(\d)\] \|$", brief, flags=re.M)
    assert len(rows) == sum(e.imagenet_top1 is not None for e in entries)
    for architecture, tag, top1, marker in rows:
        entry = next(e for e in entries if (e.architecture, e.tag) == (architecture, tag))
        assert (float(top1), sources[int(marker) - 1]) == (entry.imagenet_top1, entry.accuracy_source), tag
    for number, source in enumerate(sources, 1):
        assert f"[{number}] {source}" in brief

    variant = {name: constructor.variant for name, constructor in models.CONSTRUCTORS.items()}
    readme_tags = re.findall(r"^\| `([^`]+)` \| [^|]+ \| ([^|]+) \|$", _read(README), flags=re.M)
    assert len(readme_tags) == len({e.tag for e in entries})
    for tag, architectures in readme_tags:
        expected = {variant[e.architecture] for e in entries if e.tag == tag}
        assert set(architectures.strip().split(", ")) == expected, tag


def test_the_command_line_page_names_every_subcommand_and_option():
    import argparse

    from keras_vit import cli

    page = _read(os.path.join(DOCS, "guides", "command-line.md"))
    subparsers = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, parser in subparsers.choices.items():
        assert f"## keras-vit {command}" in page, command
        section = page[page.index(f"## keras-vit {command}"):]
        section = section[: section.find("\n## ", 1) if "\n## " in section[1:] else len(section)]
        for action in parser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert option in section, f"keras-vit {command} {option} is not on the command-line page"


FENCED_BLOCK = re.compile(r"^\s*```\W*(\w*)[^\n`]*\n(.*?)^\s*```", re.M | re.S)  # (language, body)
SHELL_LANGUAGES = ("bash", "sh", "shell", "console", "")


def test_every_keras_vit_command_in_the_docs_parses():
    """Each `keras-vit ...` line of a shell block in docs/ and the README
    (a synopsis with [optional] parts or `...` aside) is one the command
    line accepts: no renamed flag, no removed choice."""
    import shlex

    from keras_vit import cli

    checked = []
    for path in _markdown_files():
        for language, block in FENCED_BLOCK.findall(_read(path)):
            if language not in SHELL_LANGUAGES:
                continue
            for line in block.replace("\\\n", " ").splitlines():
                line = re.split(r"\s#|\s\|\s|&&|;|\s>", line.strip().removeprefix("$ "))[0].strip()
                if not line.startswith("keras-vit ") or "[" in line or "..." in line:
                    continue
                try:
                    cli.build_parser().parse_args(shlex.split(line)[1:])
                except SystemExit as exit:
                    assert not exit.code, f"{os.path.relpath(path, REPOSITORY)}: `{line}` is refused by keras-vit"
                checked.append(line)
    assert len(checked) >= 15, checked


def test_every_list_starts_after_a_blank_line():
    """Python-Markdown (unlike GitHub) runs a list straight after a paragraph
    line into that paragraph: "text:\n- a\n- b" renders as one run-on line."""
    stuck = []
    for path in _markdown_files():
        lines, fenced = _read(path).split("\n"), False
        for number, (before, line) in enumerate(zip(lines, lines[1:]), 2):
            fenced ^= before.lstrip().startswith("```")
            if (not fenced and re.match(r"(- |\d+\. )", line) and before.strip() and not before.startswith(" ")
                    and not re.match(r"(- |\d+\. |\|)", before)):
                stuck.append(f"{os.path.relpath(path, REPOSITORY)}:{number}")
    assert not stuck, f"a list right after a paragraph line (add a blank line): {stuck}"


def test_the_masked_patch_figure_reads_both_tables_of_its_page():
    sys.path.insert(0, DOCS)
    try:
        import make_figures
    finally:
        sys.path.remove(DOCS)
    panels = make_figures.masked_patch_results(os.path.join(DOCS, "guides", "masked-patch.md"))
    few_shot, fine_tuned = panels.values()
    assert [len(bars) for bars in few_shot.values()] == [3, 3]  # 1-, 5-, 10-shot, for both initialisations
    assert [len(bars) for bars in fine_tuned.values()] == [1, 1]
