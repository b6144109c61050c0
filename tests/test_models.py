"""Every architecture in harness.ARCHITECTURES through every harness check,
plus the constructors' parameter counts against the official configurations,
and the multiply-accumulates formula against a count of the traced forward pass."""

import inspect
import math
import re

import keras
import numpy as np
import pytest

import harness
import keras_vit
from keras_vit.sizes import multiply_accumulates, parameter_count

pytestmark = pytest.mark.multibackend


@pytest.mark.parametrize("check", list(harness.CHECKS))
@pytest.mark.parametrize("architecture", list(harness.ARCHITECTURES))
def test_architecture(architecture, check, tmp_path):
    run = harness.CHECKS[check]
    build = harness.ARCHITECTURES[architecture]
    if "tmp_path" in inspect.signature(run).parameters:
        run(build, tmp_path=str(tmp_path))
    else:
        run(build)


def test_published_counts():
    # The counts of the official models (and timm's) with a 1000-class head.
    assert parameter_count(**keras_vit.VARIANTS["B/16"]) == 86_567_656
    assert parameter_count(**keras_vit.VARIANTS["Ti/16"]) == 5_717_416


@pytest.mark.parametrize("name", list(keras_vit.models.CONSTRUCTORS))
def test_constructor_parameter_count(name):
    constructor = keras_vit.models.CONSTRUCTORS[name]
    model = constructor(weights=None)
    # parameter_count is the formula behind the README table; the built model must agree
    assert model.count_params() == parameter_count(**constructor.config)
    assert model.input_shape == (None, 224, 224, 3) and model.output_shape == (None, 1000)


def test_vit_b16_exact_counts():
    assert keras_vit.ViT_B16().count_params() == 86_567_656
    assert keras_vit.ViT_Ti16().count_params() == 5_717_416


def test_headless_outputs():
    kwargs = dict(harness.TINY_VIT, input_shape=(32, 32, 3), include_top=False)
    sequence = keras_vit.ViT(**kwargs)
    assert sequence.output_shape == (None, 17, 32)
    assert keras_vit.ViT(**kwargs, pooling="token").output_shape == (None, 32)
    gap = keras_vit.ViT(**kwargs, pooling="gap")
    x = harness.images()
    tokens = sequence.predict(x, verbose=0)
    gap.set_weights(sequence.get_weights())
    np.testing.assert_allclose(gap.predict(x, verbose=0), tokens[:, 1:].mean(axis=1), atol=1e-5)


def test_representation_layer_and_no_class_token():
    model = harness.tiny_vit(representation_size=16)
    assert model.get_layer("pre_logits").units == 16
    gap_only = harness.tiny_vit(class_token=False, pooling="gap")
    assert "class_token" not in [l.name for l in gap_only.layers]
    assert gap_only.get_layer("position_embedding").embedding.shape == (1, 16, 32)


def test_include_preprocessing_matches_preprocess_inputs():
    with_scaling = harness.tiny_vit()
    without = harness.tiny_vit(include_preprocessing=False)
    without.set_weights(with_scaling.get_weights())
    harness.randomize_head(with_scaling)
    without.get_layer("predictions").set_weights(with_scaling.get_layer("predictions").get_weights())
    x = harness.images()
    scaled = keras.ops.convert_to_numpy(keras_vit.preprocess_inputs(x))
    assert scaled.min() >= -1.0 and scaled.max() <= 1.0
    np.testing.assert_allclose(without.predict(scaled, verbose=0), with_scaling.predict(x, verbose=0), atol=1e-6)


def test_input_tensor():
    tensor = keras.Input(shape=(32, 32, 3))
    model = harness.tiny_vit(input_tensor=tensor, input_shape=None)
    assert model.inputs[0] is tensor


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_shape=(30, 32, 3)), "multiples of the patch size"),
        (dict(input_shape=(32, 32)), "(height, width, 3)"),
        (dict(pooling="max"), "Unknown pooling"),
        (dict(classes=0), "positive"),
        (dict(classes="10"), "classes must be a positive whole number, got '10'"),
        (dict(classes=10.0), "classes must be a positive whole number, got 10.0"),
        (dict(patch_size=0), "patch_size must be a positive whole number, got 0"),
        (dict(patch_size=(8, 0)), "patch_size must be a positive whole number, got (8, 0)"),
        (dict(depth=-1), "depth must be a positive whole number"),
        (dict(drop_path_rate=-1), "drop_path_rate must be a fraction in [0, 1), got -1"),
        (dict(dropout_rate=1.0), "dropout_rate must be a fraction in [0, 1)"),
        (dict(weights="nowhere.weights.h5"), "not found"),
        (dict(weights="bogus-tag"), "Unknown weights"),
        (dict(num_heads=5), "divisible"),
        (dict(dtype="bf16"), "dtype='bf16' is not a Keras dtype policy; use \"float32\""),
        (dict(dtype="int8_from_float32"), 'a quantized policy: build the model in float32 or mixed precision'),
        (dict(dtype="int4_from_mixed_bfloat16"), "is a quantized policy"),
        (dict(dtype="float8_from_float32"), "is a quantized policy"),
        (dict(dtype="int32"), "dtype='int32' does not compute in floats; use \"float32\""),
    ],
)
def test_bad_arguments_get_clear_errors(kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        harness.tiny_vit(**kwargs)


def test_dtype_is_the_models_own_policy_too():
    """Keras reads the model's own policy as well as its layers': compile()
    adds float16 loss scaling only to a mixed_float16 model."""
    model = harness.tiny_vit(dtype="mixed_float16")
    assert model.dtype_policy.name == "mixed_float16"
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert keras.config.dtype_policy().name == "float32"


def test_a_build_that_fails_under_dtype_gives_back_the_callers_policy():
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        with pytest.raises(ValueError, match="divisible"):
            harness.tiny_vit(num_heads=5, dtype="bfloat16")
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
        model = harness.tiny_vit(dtype="float32")
        assert {w.dtype for w in model.weights} == {"float32"} and model.layers[-2].compute_dtype == "float32"
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
    finally:
        keras.config.set_dtype_policy("float32")


@pytest.mark.parametrize(
    "build, kwargs, message",
    [
        # timm's and keras_hub's names get ours.
        (keras_vit.ViT_B16, dict(image_size=384), "ViT_B16() got an unknown argument 'image_size': use input_shape=(size, size, 3)"),
        (keras_vit.ViT_B16, dict(num_classes=10), "ViT_B16() got an unknown argument 'num_classes': use classes="),
        (keras_vit.ViT_B16, dict(drop_rate=0.1), "'drop_rate': use dropout_rate="),
        (keras_vit.ViT_B16, dict(pretrained=True), "'pretrained': use weights=\"in21k\" (see keras_vit.list_weights())"),
        (keras_vit.ViT, dict(embed_dim=64), "ViT() got an unknown argument 'embed_dim': use hidden_size="),
        # A constructor's sizes are fixed: it says where other sizes are built.
        (keras_vit.ViT_S16, dict(embed_dim=64), "ViT_S16 has a fixed hidden_size; build other sizes with keras_vit.ViT(hidden_size=...)"),
        # A typo gets the nearest argument the caller takes.
        (keras_vit.ViT_B16, dict(dropout=0.1), "'dropout': did you mean dropout_rate=?"),
        (keras_vit.ViT_B16, dict(keep_prelogits=True), "did you mean keep_pre_logits=?"),
        (keras_vit.ViT, dict(hidden_sise=64), "did you mean hidden_size=?"),
        (keras_vit.ViT_B16, dict(hidden_sise=64), "see help(keras_vit.ViT_B16) for the arguments"),
        # `architecture` is set by the constructors, not offered.
        (keras_vit.ViT_B16, dict(architectur="ViT_B16"), "see help(keras_vit.ViT_B16) for the arguments"),
        (keras_vit.ViT, dict(architectur="ViT_B16"), "see help(keras_vit.ViT) for the arguments"),
        (keras_vit.R50_ViT_B16, dict(colour=1), "R50_ViT_B16() got an unknown argument 'colour': see help"),
    ],
)
def test_unknown_arguments_name_what_to_write_instead(build, kwargs, message):
    # Checked before anything is built: a ViT-B/16 would take seconds.
    with pytest.raises(TypeError, match=re.escape(message)) as error:
        build(**kwargs)
    assert "\n" not in str(error.value)


# --- multiply-accumulates: keras_vit.sizes.multiply_accumulates against the traced forward pass ---
#
# The count below is independent of the formula: it traces the model's forward
# pass (a TensorFlow graph, or a JAX jaxpr) and adds up the multiply-accumulates
# of every matrix product and convolution in it, from the shapes the backend
# gives each operation. The formula counts exactly these (and nothing else: the
# additions of biases and residuals, normalisations, softmax and GELU are left
# out), so the two must agree exactly.

# Operation types that are matrix products or convolutions but that the graph
# count does not know: finding one fails the test instead of leaving it uncounted.
_TF_COUNTED = {"MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum", "Conv2D"}
_TF_CALLS = {"PartitionedCall", "StatefulPartitionedCall", "While", "StatelessWhile", "If", "StatelessIf"}


def _tf_op_macs(op):
    shape = lambda tensor: [int(d) for d in tensor.shape]  # noqa: E731 (static: fixed batch)
    out = shape(op.outputs[0])
    if op.type == "MatMul":
        a = shape(op.inputs[0])
        return math.prod(out) * a[0 if op.get_attr("transpose_a") else 1]
    if op.type.startswith("BatchMatMul"):
        a = shape(op.inputs[0])
        return math.prod(out) * a[-2 if op.get_attr("adj_x") else -1]
    if op.type == "Einsum":
        # every index appears once in the loop nest: the product of all distinct index sizes
        equation = op.get_attr("equation").decode()
        operands = equation.split("->")[0].split(",")
        assert "." not in equation, f"ellipsis einsum {equation!r}: not counted"
        sizes = {}
        for letters, tensor in zip(operands, op.inputs):
            for letter, size in zip(letters, shape(tensor)):
                assert sizes.setdefault(letter, size) == size, equation
        return math.prod(sizes.values())
    if op.type == "Conv2D":
        # each output element: kernel height x kernel width x input channels (per group)
        kernel_height, kernel_width, channels, _ = shape(op.inputs[1])
        return math.prod(out) * kernel_height * kernel_width * channels
    raise AssertionError(op.type)


def _tensorflow_traced_macs(model, batch_shape):
    import tensorflow as tf

    @tf.autograph.experimental.do_not_convert
    def forward(images):
        return model(images, training=False)

    graph = tf.function(forward).get_concrete_function(tf.TensorSpec(batch_shape, tf.float32)).graph
    total = 0
    for op in graph.get_operations():
        assert op.type not in _TF_CALLS, f"{op.type} in the forward graph: its body would go uncounted"
        if op.type in _TF_COUNTED:
            total += _tf_op_macs(op)
        else:
            assert not any(word in op.type for word in ("MatMul", "Conv", "Einsum")), f"uncounted {op.type}"
    return total


def _jaxpr_macs(jaxpr):
    from jax.extend.core import jaxprs_in_params

    total = 0
    for equation in jaxpr.eqns:
        name = equation.primitive.name
        shapes = [tuple(var.aval.shape) for var in equation.invars]
        if name == "dot_general":
            (lhs_contract, rhs_contract), (_, rhs_batch) = equation.params["dimension_numbers"]
            lhs, rhs = shapes
            free = [size for axis, size in enumerate(rhs) if axis not in rhs_contract and axis not in rhs_batch]
            total += math.prod(lhs) * math.prod(free)
        elif name == "conv_general_dilated":
            kernel = shapes[1]
            out_features = kernel[equation.params["dimension_numbers"].rhs_spec[0]]
            total += math.prod(equation.outvars[0].aval.shape) * math.prod(kernel) // out_features
        else:
            assert name not in ("while", "scan", "cond"), f"{name} in the jaxpr: a loop body is not counted once"
            convolution = name.startswith("conv") and not name.startswith("convert")
            assert "dot" not in name and not convolution, f"uncounted primitive {name}"
        for inner in jaxprs_in_params(equation.params):
            total += _jaxpr_macs(inner)
    return total


def _jax_traced_macs(model, batch_shape):
    import jax

    closed = jax.make_jaxpr(lambda images: model(images, training=False))(np.zeros(batch_shape, "float32"))
    return _jaxpr_macs(closed.jaxpr)


def traced_macs(model, batch=2):
    """Multiply-accumulates of the matmuls and convolutions of `batch` images' forward pass."""
    batch_shape = (batch,) + tuple(model.input_shape[1:])
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _tensorflow_traced_macs(model, batch_shape)
    if backend == "jax":
        return _jax_traced_macs(model, batch_shape)
    pytest.skip(f"the forward pass is traced on TensorFlow and JAX, not {backend}")


# A hybrid whose ResNet has two stages and an input that is no multiple of its
# stride: 36 -> 18 (root conv) -> 9 (pool) -> 9 -> 5 (SAME padding rounds up).
TWO_STAGE_RESNET = dict(block_sizes=(1, 1), width_factor=0.5)

TRACED = {
    "vit": (lambda: harness.tiny_vit(), dict(harness.TINY_VIT, image_size=32, classes=5)),
    "hybrid": (lambda: harness.tiny_hybrid(),
               dict(harness.TINY_VIT, patch_size=2, image_size=32, classes=5, **harness.TINY_RESNET)),
    "hybrid_two_stages_odd_size": (
        lambda: harness.tiny_vit((36, 36, 3), patch_size=1, stem=keras_vit.hybrid.stem_builder(**TWO_STAGE_RESNET)),
        dict(harness.TINY_VIT, patch_size=1, image_size=36, classes=5, **TWO_STAGE_RESNET),
    ),
}


@pytest.mark.parametrize("name", list(TRACED))
def test_multiply_accumulates_equal_the_traced_forward_pass(name):
    build, config = TRACED[name]
    model = build()
    harness.randomize_head(model)
    assert model.count_params() == parameter_count(**config)  # the config describes this model
    assert traced_macs(model, batch=2) == 2 * multiply_accumulates(**config)


def test_multiply_accumulates_of_a_full_size_hybrid_equal_the_traced_forward_pass():
    # R50+ViT-B/16: three ResNet stages, and ViT-B/16's Transformer on the same 197 tokens
    model = keras_vit.R50_ViT_B16(weights=None)
    assert traced_macs(model, batch=1) == multiply_accumulates(**keras_vit.R50_ViT_B16.config)


def test_multiply_accumulates_of_vit_b16_match_the_published_figure():
    # Published: 17.58 GMACs for timm's vit_base_patch16_224 (the same model:
    # 86.57 M parameters) at 224x224, the infer_gmacs column of timm's benchmark
    # table (huggingface/pytorch-image-models, results/benchmark-infer-amp-nchw-
    # pt240-cu124-rtx4090.csv, counted with fvcore); torchvision gives 17.564
    # for vit_b_16 (ViT_B_16_Weights.IMAGENET1K_V1.meta["_ops"], "GFLOPS" that
    # count a multiply-add once). fvcore also counts LayerNorm (5 operations per
    # element, about 0.02 G here), which the formula leaves out.
    # FLOPs (2x, 35.1 G) must not pass for MACs.
    gmacs = multiply_accumulates(**keras_vit.ViT_B16.config) / 1e9
    assert gmacs == pytest.approx(17.58, rel=0.01)


def test_constructors_table_shows_the_multiply_accumulates(capsys):
    from keras_vit import cli

    assert cli.main(["list", "models"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.endswith("GMACs @224")
    table = {row.split()[0]: row.split()[-1] for row in rows}
    assert set(table) == set(keras_vit.models.CONSTRUCTORS)
    for name, constructor in keras_vit.models.CONSTRUCTORS.items():
        assert float(table[name]) == pytest.approx(multiply_accumulates(**constructor.config) / 1e9, abs=0.05), name
    assert float(table["ViT_B16"]) == pytest.approx(17.58, rel=0.01)  # the published figure, above
