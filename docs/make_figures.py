"""Draws the documentation's pictures that the commands in their captions do not write themselves.

    python docs/make_figures.py                   # needs matplotlib (the viz extra)
    keras-vit demo --output-dir keras_vit_demo    # then, for Figure 7 of the demo's trained model:
    python docs/make_figures.py --demo-model keras_vit_demo/digits_vit.keras

docs/images/masked_patch_digits.png: the two result tables of
docs/guides/masked-patch.md, read from that page (so the picture shows
exactly the figures the page states, and each keeps its command there).
With --demo-model: docs/images/attention_distance_digits.png and
position_similarity_digits.png, `keras_vit.visualize`'s Figure 7 plots of
the demo's trained digits ViT (attention distances on the first 64
held-out digits). The other pictures are written by the commands their
captions name.
"""

import argparse
import os
import re

import numpy as np

DOCS = os.path.dirname(os.path.abspath(__file__))
MEAN_STD = re.compile(r"(\d+(?:\.\d+)?) ± (\d+(?:\.\d+)?)")


def markdown_tables(path):
    """Every table of a Markdown page: a list of rows, each a list of cells (header row first)."""
    tables, rows = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line.startswith("|"):
                cells = [cell.strip() for cell in line.strip("|").split("|")]
                if not all(set(cell) <= set("-: ") for cell in cells):  # not the |---| line
                    rows.append(cells)
            elif rows:
                tables.append(rows)
                rows = []
    if rows:
        tables.append(rows)
    return tables


def masked_patch_results(path):
    """{panel title: {initialisation: [(label, mean, std), ...]}} from the page's two tables."""
    panels = {}
    for table in markdown_tables(path):
        header, body = table[0], table[1:]
        if header[0].startswith("linear few-shot"):
            panel = panels.setdefault("linear few-shot, class token", {})
            for row in body:
                if row[1] == "class token":
                    panel[row[0]] = [(shots, *map(float, MEAN_STD.match(cell).groups()))
                                     for shots, cell in zip(header[2:], row[2:])]
        elif header[0].startswith("fine-tuned on"):
            panel = panels.setdefault(header[0], {})
            for row in body:
                panel[row[0]] = [("fine-tuned", *map(float, MEAN_STD.match(row[1]).groups()))]
    if len(panels) != 2:
        raise ValueError(f"{path}: expected the few-shot and the fine-tuning tables, found {list(panels)}")
    return panels


def plot_masked_patch(path, output):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = masked_patch_results(path)
    figure = Figure(figsize=(8, 3.2))
    FigureCanvasAgg(figure)
    axes_list = figure.subplots(1, 2, gridspec_kw=dict(width_ratios=[3, 1.4]))
    for axes, (title, by_init) in zip(axes_list, panels.items()):
        inits = list(by_init)
        labels = [label for label, _, _ in by_init[inits[0]]]
        width = 0.8 / len(inits)
        for index, init in enumerate(inits):
            means = [mean for _, mean, _ in by_init[init]]
            stds = [std for _, _, std in by_init[init]]
            positions = np.arange(len(labels)) + (index - (len(inits) - 1) / 2) * width
            axes.bar(positions, means, width, yerr=stds, capsize=3, label=init)
        axes.set_xticks(np.arange(len(labels)), labels)
        axes.set_title(title, fontsize=9)
        axes.set_ylabel("test accuracy (%)")
        axes.set_ylim(0, 100)
        axes.grid(axis="y", alpha=0.3)
    axes_list[0].legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    return output


def plot_demo_model(path, images_dir):
    """Figure 7 (centre, right) of a model written by `keras-vit demo`."""
    import keras

    from keras_vit import demo, visualize

    model = keras.saving.load_model(path, safe_mode=True)
    _, (held_out, _) = demo.load_digits()
    outputs = [os.path.join(images_dir, name)
               for name in ("attention_distance_digits.png", "position_similarity_digits.png")]
    visualize.plot_attention_distance(visualize.attention_distances(model, held_out[:64]), outputs[0],
                                      title="Mean attention distance, the demo's digits ViT")
    visualize.plot_position_similarity(visualize.position_embedding_similarity(model), outputs[1],
                                       title="Position embedding similarity")
    return outputs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-model", help="digits_vit.keras written by `keras-vit demo`")
    args = parser.parse_args()
    images_dir = os.path.join(DOCS, "images")
    outputs = [plot_masked_patch(os.path.join(DOCS, "guides", "masked-patch.md"),
                                 os.path.join(images_dir, "masked_patch_digits.png"))]
    if args.demo_model:
        outputs += plot_demo_model(args.demo_model, images_dir)
    for output in outputs:
        print(f"wrote {os.path.relpath(output)}")


if __name__ == "__main__":
    main()
