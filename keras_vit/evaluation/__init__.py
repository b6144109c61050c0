"""Measuring representations as the paper does. Its modules:

    linear    the closed-form ridge classifier on frozen features and the nested shot sampling
    fewshot   the few-shot protocol: features of a model, per-seed accuracies, the table
    vtab      VTAB-1k: the 19 tasks' TFDS splits and labels, the paper's fine-tuning protocol, Table 9
"""

from keras_vit.evaluation.fewshot import (
    FEWSHOT_DATASETS,
    SEEDS,
    SHOTS,
    check_protocol,
    check_shots,
    dataset_sources,
    features,
    fed_image_size,
    few_shot,
    format_results,
    representation_model,
)
from keras_vit.evaluation.linear import LinearFewShot, linear_few_shot, sample_shots
from keras_vit.evaluation import vtab  # noqa: E402,F401
