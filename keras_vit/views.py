"""Views of a built model that share its weights: intermediate outputs and attention maps."""

import keras
from keras import layers, ops

from keras_vit.layers import TransformerBlock, serializable


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
    Transformer block, the softmax attention probabilities (for a model of
    one block, Keras returns that one tensor, not in a list).
    """
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"Model {model.name!r} has no TransformerBlock layers.")
    scores = [_AttentionScores(block)(block.input) for block in blocks]
    return keras.Model(model.input, scores, name=f"{model.name}_attention")


class _SharedLayerCall(layers.Layer):
    """Computes with another layer of the model, on its weights: the view
    shares them. In a `.keras` file it carries that layer's config and
    weights, so a saved view loads on its own (with its own copy of them)."""

    NAME_SUFFIX = None  # this layer's name: the shared layer's, with this suffix

    def __init__(self, layer, **kwargs):
        if isinstance(layer, dict):  # from a .keras file
            layer = keras.saving.deserialize_keras_object(layer)
        kwargs.setdefault("name", f"{layer.name}_{self.NAME_SUFFIX}")
        kwargs.setdefault("dtype", layer.dtype_policy)
        super().__init__(**kwargs)
        # Held outside Keras's tracking (and no attribute returns it: saving
        # walks them all): the model saves the layer's weights where the layer
        # itself sits, and this layer saves its own copy below.
        self._shared = _Untracked(layer)

    def build(self, input_shape):
        if not self._shared.layer.built:  # loaded from a file: the layer's own copy
            self._shared.layer.build(input_shape)

    def get_config(self):
        config = super().get_config()
        config["layer"] = keras.saving.serialize_keras_object(self._shared.layer)
        return config

    def save_own_variables(self, store):
        for index, variable in enumerate(self._shared.layer.weights):  # its nested layers' too
            store[str(index)] = variable

    def load_own_variables(self, store):
        weights = self._shared.layer.weights
        if len(store.keys()) != len(weights):
            raise ValueError(
                f"{self.name}: the file holds {len(store.keys())} weights for {self._shared.layer.name!r}, "
                f"which has {len(weights)}."
            )
        for index, variable in enumerate(weights):
            variable.assign(store[str(index)])


class _Untracked:
    """A plain holder: Keras tracks layers set as attributes, not inside this."""

    def __init__(self, layer):
        self.layer = layer


@serializable
class _HeadLogits(_SharedLayerCall):
    """The head's pre-activation output, computed with the head's own weights."""

    NAME_SUFFIX = "logits"

    def call(self, features):
        head = self._shared.layer
        logits = ops.matmul(ops.cast(features, head.compute_dtype), head.kernel)
        return logits + head.bias if head.use_bias else logits

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self._shared.layer.units)


@serializable
class _AttentionScores(_SharedLayerCall):
    """Calls a block for its attention probabilities alone.

    Calling the block itself a second time with another output structure
    trips Keras' functional graph check, which reads a layer's first call.
    """

    NAME_SUFFIX = "attention"

    def call(self, tokens):
        return self._shared.layer(tokens, return_attention_scores=True)[1]
