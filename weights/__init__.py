"""Files shipped with keras_vit: the checkpoint registry and label lists."""
