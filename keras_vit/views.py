"""Views of a built model that share its weights: intermediate outputs and attention maps."""

import keras
from keras import layers, ops

from keras_vit.layers import TransformerBlock


def transformer_blocks(model):
    """The model's Transformer blocks, in order."""
    return [layer for layer in model.layers if isinstance(layer, TransformerBlock)]


def feature_extractor(model, outputs=None):
    """A model with the same weights that returns a dict of intermediate tensors.

    Keys (as big_vision's ViT): "stem" (patch tokens), "with_posemb",
    "block_00".. (each block's output tokens), "encoded" (after the final
    LayerNorm), "pre_logits" (pooled features; after the representation layer
    when there is one) and, when the model has a head, "logits" (the head
    before its activation) and "predictions" (after it: what the model
    returns). `outputs` picks a subset of the keys.
    """
    available = {"stem": "patch_embed", "with_posemb": "position_embedding"}
    available.update({block.name: block.name for block in transformer_blocks(model)})
    available["encoded"] = "encoder_norm"
    names = {layer.name for layer in model.layers}
    for key in ("pre_logits", "pool"):
        if key in names:
            available["pre_logits"] = key
            break
    if "predictions" in names:
        available["logits"] = available["predictions"] = "predictions"
    if outputs is None:
        outputs = list(available)
    unknown = [key for key in outputs if key not in available]
    if unknown:
        raise ValueError(f"Unknown outputs {unknown}; this model has {list(available)}.")
    tensors = {key: model.get_layer(available[key]).output for key in outputs}
    if "logits" in tensors:
        head = model.get_layer("predictions")
        tensors["logits"] = _HeadLogits(head)(head.input)
    return keras.Model(model.input, tensors, name=f"{model.name}_features")


def attention_model(model):
    """A model with the same weights that returns every block's attention.

    Output: a list with one (batch, heads, tokens, tokens) tensor per
    Transformer block, the softmax attention probabilities.
    """
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"Model {model.name!r} has no TransformerBlock layers.")
    scores = [_AttentionScores(block)(block.input) for block in blocks]
    return keras.Model(model.input, scores, name=f"{model.name}_attention")


class _HeadLogits(layers.Layer):
    """The head's pre-activation output, computed with the head's own weights."""

    def __init__(self, head):
        super().__init__(name=f"{head.name}_logits", dtype=head.dtype_policy)
        self.head = head

    def call(self, features):
        logits = ops.matmul(ops.cast(features, self.head.compute_dtype), self.head.kernel)
        return logits + self.head.bias if self.head.use_bias else logits


class _AttentionScores(layers.Layer):
    """Calls a block for its attention probabilities alone.

    Calling the block itself a second time with another output structure
    trips Keras' functional graph check, which reads a layer's first call.
    """

    def __init__(self, block):
        super().__init__(name=f"{block.name}_attention", dtype=block.dtype_policy)
        self.block = block

    def call(self, tokens):
        return self.block(tokens, return_attention_scores=True)[1]
