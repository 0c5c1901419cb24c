"""flaxlayer under `keras.distribution`: DataParallel, ModelParallel with a LayoutMap, and Flax
partitioning annotations (Linen `nn.with_partitioning` / `nn.with_logical_partitioning`, NNX
`nnx.with_partitioning`) turned into variable layouts.

Needs the JAX backend (keras.distribution runs on it only) and 8 devices: on CPU,
XLA_FLAGS=--xla_force_host_platform_device_count=8 set before JAX is imported.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import distribution_models as dm
from flaxlayer import FlaxLayer, JaxLayer
from sample_data import make_data

N_DEVICES = 8
BATCH = 16
ATOL = 1e-5


@pytest.fixture(autouse=True)
def distribution_env():
    if keras.backend.backend() != "jax":
        pytest.skip("keras.distribution runs on the JAX backend only")
    if jax.device_count() < N_DEVICES:
        pytest.skip(
            f"needs {N_DEVICES} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), "
            f"found {jax.device_count()}"
        )
    dm.SEEN_INPUT_SHARDINGS.clear()
    yield
    keras.distribution.set_distribution(None)
    dm.SEEN_INPUT_SHARDINGS.clear()


# ------------------------------------------------------------------------------------ helpers


def mesh_2x4():
    return keras.distribution.DeviceMesh(
        (2, 4), ["batch", "model"], devices=keras.distribution.list_devices()
    )


def model_parallel(entries=None):
    """ModelParallel on a (batch=2, model=4) mesh; `entries`: {regex: axes} for the LayoutMap."""
    mesh = mesh_2x4()
    layout_map = keras.distribution.LayoutMap(mesh)
    for key, axes in (entries or {}).items():
        layout_map[key] = axes
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")


def build(make_layer, distribution, in_dim=dm.IN_DIM):
    """The layer and a Sequential model around it, built under `distribution` (None: one device).

    Names are fixed ("m", "f") so the single-device and distributed runs have the same paths.
    """
    keras.distribution.set_distribution(distribution)
    keras.utils.set_random_seed(0)
    layer = make_layer()
    model = keras.Sequential([keras.Input((in_dim,)), layer], name="m")
    return model, layer


def train(model, x, y, epochs=2):
    """A few deterministic SGD steps (64 rows, batch 16, no shuffling), then predictions."""
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
    return model.predict(x, batch_size=BATCH, verbose=0)


def weights_of(model):
    return {v.path: np.asarray(v.value) for v in model.weights}


def run(make_layer, distribution, x, y):
    """(weights by path, predictions, {path: sharding} right after build)."""
    model, _ = build(make_layer, distribution, in_dim=x.shape[1])
    shardings = {v.path: v.value.sharding for v in model.weights}
    predictions = train(model, x, y)
    weights = weights_of(model)
    keras.distribution.set_distribution(None)
    return weights, predictions, shardings


def assert_same_training(reference, distributed):
    ref_weights, ref_predictions, _ = reference
    dist_weights, dist_predictions, _ = distributed
    assert sorted(ref_weights) == sorted(dist_weights)
    for path, value in ref_weights.items():
        np.testing.assert_allclose(dist_weights[path], value, atol=ATOL, err_msg=path)
    np.testing.assert_allclose(dist_predictions, ref_predictions, atol=ATOL)


def spec_of(model, suffix):
    (variable,) = [v for v in model.weights if v.path.endswith(suffix)]
    return variable.value.sharding.spec


def padded(spec, ndim):
    """A PartitionSpec with trailing Nones made explicit (P("x") == P("x", None) as a layout)."""
    return tuple(spec) + (None,) * (ndim - len(spec))


def linen_bn():
    return FlaxLayer(dm.LinenBNNet(), seed=1, name="f")


def nnx_bn():
    return FlaxLayer(dm.NNXBNNet(nnx.Rngs(0)), name="f")


def jax_mlp():
    return JaxLayer(dm.mlp_call, dm.mlp_init, seed=1, name="f")


MODELS = {"linen": linen_bn, "nnx": nnx_bn, "jax": jax_mlp}

# Paths (regexes over the full variable paths) for a ModelParallel LayoutMap, per model:
# one kernel split over "model" along its columns, and one piece of state split too.
LAYOUTS = {
    "linen": {".*Dense_0/kernel": (None, "model"), ".*BatchNorm_0/mean": ("model",)},
    "nnx": {".*up/kernel": (None, "model"), ".*bn/var": ("model",)},
    "jax": {".*params/up/kernel": (None, "model"), ".*state/mean": ("model",)},
}
SHARDED = {
    "linen": ("m/f/params/Dense_0/kernel", "m/f/batch_stats/BatchNorm_0/mean"),
    "nnx": ("m/f/up/kernel", "m/f/bn/var"),
    "jax": ("m/f/params/up/kernel", "m/f/state/mean"),
}


# ----------------------------------------------------------------------- 1. DataParallel


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_data_parallel_matches_single_device(kind):
    x, y = make_data(64, dm.IN_DIM, dm.OUT_DIM)
    reference = run(MODELS[kind], None, x, y)
    dm.SEEN_INPUT_SHARDINGS.clear()
    distribution = keras.distribution.DataParallel(devices=keras.distribution.list_devices())
    distributed = run(MODELS[kind], distribution, x, y)

    # Every variable (params and BatchNorm statistics / state) is replicated on the 8 devices.
    shardings = distributed[2]
    assert len(shardings) == len(reference[0])
    for path, sharding in shardings.items():
        assert len(sharding.device_set) == N_DEVICES, path
        assert sharding.is_fully_replicated, path
    # The batch the wrapped model sees inside the train step is split over the 8 devices.
    batch_sharded = [
        s
        for s in dm.SEEN_INPUT_SHARDINGS
        if len(s.device_set) == N_DEVICES and tuple(s.spec)[:1] == ("batch",)
    ]
    assert batch_sharded, dm.SEEN_INPUT_SHARDINGS
    # Same weights, BatchNorm statistics and predictions as on one device.
    assert_same_training(reference, distributed)


# -------------------------------------------------------------- 2. ModelParallel + LayoutMap


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_model_parallel_layout_map_shards_variables_and_matches(kind):
    x, y = make_data(64, dm.IN_DIM, dm.OUT_DIM)
    reference = run(MODELS[kind], None, x, y)
    dm.SEEN_INPUT_SHARDINGS.clear()
    distributed = run(MODELS[kind], model_parallel(LAYOUTS[kind]), x, y)

    shardings = distributed[2]
    kernel, state = SHARDED[kind]
    assert padded(shardings[kernel].spec, 2) == (None, "model")
    assert padded(shardings[state].spec, 1) == ("model",)
    for path, sharding in shardings.items():
        assert len(sharding.device_set) == N_DEVICES, path
        if path not in (kernel, state):
            assert sharding.is_fully_replicated, path
    # Each device holds a quarter of the kernel's columns: (4, 16) -> (4, 4).
    assert shardings[kernel].shard_shape((dm.IN_DIM, dm.HIDDEN)) == (dm.IN_DIM, dm.HIDDEN // 4)
    # The batch is split over the mesh's "batch" axis.
    assert any(tuple(s.spec)[:1] == ("batch",) for s in dm.SEEN_INPUT_SHARDINGS)
    assert_same_training(reference, distributed)


def _wide_layer(kind, hidden, full_shape, concrete):
    """A layer whose one (5, 24) kernel records, per init call, whether it was concrete."""
    if kind == "linen":

        def kernel_init(key, shape, dtype=jnp.float32):
            value = nn.initializers.lecun_normal()(key, shape, dtype)
            concrete.append(not isinstance(value, jax.core.Tracer))
            return value

        def make_layer():
            return FlaxLayer(dm.LinenBNNet(hidden=hidden, kernel_init=kernel_init), name="f")

        return make_layer, ".*Dense_0/kernel"

    def init(rng, inputs):
        params, state = dm.mlp_init(rng, inputs)
        params["wide"] = {"kernel": jax.random.normal(rng, full_shape)}
        concrete.append(not isinstance(params["wide"]["kernel"], jax.core.Tracer))
        return params, state

    def call(params, state, inputs, training):
        outputs, state = dm.mlp_call(params, state, inputs, training)
        return outputs + (inputs @ params["wide"]["kernel"]).sum(-1, keepdims=True), state

    def make_layer():
        return JaxLayer(call, init, seed=1, name="f")

    return make_layer, ".*wide/kernel"


@pytest.mark.parametrize("kind", ["linen", "jax"])
def test_model_parallel_init_creates_variables_already_sharded(kind, monkeypatch):
    """A variable with a sharded layout is never materialised whole on one device.

    Why these checks: what the library promises is observable without looking at how it is
    done. (a) The initializer that computes the (5, 24) kernel only ever sees tracers: the
    kernel is never computed eagerly, as a concrete whole array. (b) The array handed to
    `keras.Variable` for it is already laid out as the LayoutMap asks (Keras has nothing left
    to move). (c) No whole (single-device) array of that shape is `jax.device_put` onto the mesh
    during build, neither by the library nor by Keras's `distribute_variable`. An eager init
    followed by a transfer (what Keras alone would do) fails (a)-(c); a jitted init without
    out_shardings followed by a transfer fails (c). The shape (5, 24) is used by no other
    variable, so nothing else is counted.
    """
    in_dim, hidden = 5, 24
    full_shape = (in_dim, hidden)
    concrete = []  # per initializer call: whether it produced a concrete (not traced) array
    make_layer, key = _wide_layer(kind, hidden, full_shape, concrete)

    handed = []  # shardings of the values handed to keras.Variable with the full shape
    moved = []  # shardings of whole full-shape arrays passed to jax.device_put
    original_init, original_put = keras.Variable.__init__, jax.device_put

    def spying_init(self, *args, **kwargs):
        value = kwargs.get("initializer", args[0] if args else None)
        if isinstance(value, jax.Array) and tuple(value.shape) == full_shape:
            handed.append(value.sharding)
        return original_init(self, *args, **kwargs)

    def spying_put(x, *args, **kwargs):
        if (
            isinstance(x, jax.Array)
            and tuple(x.shape) == full_shape
            and len(x.sharding.device_set) == 1
        ):
            moved.append(x.sharding)
        return original_put(x, *args, **kwargs)

    monkeypatch.setattr(keras.Variable, "__init__", spying_init)
    monkeypatch.setattr(jax, "device_put", spying_put)
    model, _ = build(make_layer, model_parallel({key: (None, "model")}), in_dim=in_dim)
    monkeypatch.undo()

    assert concrete and not any(concrete), "the kernel was computed eagerly, whole"
    assert len(handed) == 1, handed
    assert isinstance(handed[0], jax.sharding.NamedSharding), handed[0]
    assert padded(handed[0].spec, 2) == (None, "model")
    assert not moved, f"a whole {full_shape} array was moved onto the mesh: {moved}"
    (variable,) = [v for v in model.weights if tuple(v.shape) == full_shape]
    shard_shapes = {tuple(s.data.shape) for s in variable.value.addressable_shards}
    assert shard_shapes == {(in_dim, hidden // 4)}


# ---------------------------------------------------------------- 3. Flax annotations


def linen_partitioned():
    return FlaxLayer(dm.LinenPartitioned(), seed=1, name="f")


def linen_mesh_axes_only():
    return FlaxLayer(dm.LinenPartitioned(logical=False), seed=1, name="f")


def test_linen_with_partitioning_becomes_the_layout():
    x, y = make_data(64, dm.IN_DIM, dm.OUT_DIM)
    reference = run(linen_mesh_axes_only, None, x, y)
    distributed = run(linen_mesh_axes_only, model_parallel(), x, y)
    shardings = distributed[2]
    assert padded(shardings["m/f/params/Dense_0/kernel"].spec, 2) == (None, "model")
    assert shardings["m/f/params/Dense_0/kernel"].shard_shape((dm.IN_DIM, dm.HIDDEN)) == (
        dm.IN_DIM,
        dm.HIDDEN // 4,
    )
    for path in ("Dense_0/bias", "Dense_1/kernel", "Dense_2/kernel"):
        assert shardings[f"m/f/params/{path}"].is_fully_replicated, path
    assert_same_training(reference, distributed)


def test_linen_logical_partitioning_is_mapped_by_logical_axis_rules():
    x, y = make_data(64, dm.IN_DIM, dm.OUT_DIM)
    reference = run(linen_partitioned, None, x, y)
    with nn.logical_axis_rules([("embed", None), ("mlp", "model")]):
        model, layer = build(linen_partitioned, model_parallel())
    # ("embed", "mlp") -> (None, "model") by the rules active while the model was built.
    assert padded(spec_of(model, "Dense_1/kernel"), 2) == (None, "model")
    assert padded(spec_of(model, "Dense_0/kernel"), 2) == (None, "model")
    # flax_variables: boxed again as init returned them, with the logical names.
    boxed = layer.flax_variables["params"]["Dense_1"]["kernel"]
    assert isinstance(boxed, nn.LogicallyPartitioned)
    assert tuple(boxed.names) == ("embed", "mlp")
    # Training (outside the rules context: the layouts were fixed at build) matches one device.
    predictions = train(model, x, y)
    assert_same_training(reference, (weights_of(model), predictions, None))


def test_linen_flax_variables_are_boxed_again():
    x, _ = make_data(64, dm.IN_DIM, dm.OUT_DIM)
    # Dense_1's logical annotation is overridden by a LayoutMap entry (replicated), so this
    # test does not depend on logical-name mapping.
    model, layer = build(linen_partitioned, model_parallel({".*Dense_1/kernel": (None, None)}))
    variables = layer.flax_variables
    kernel = variables["params"]["Dense_0"]["kernel"]
    assert type(kernel) is nn.Partitioned
    assert tuple(kernel.names) == (None, "model")
    assert padded(kernel.value.sharding.spec, 2) == (None, "model")
    np.testing.assert_array_equal(
        np.asarray(kernel.value), np.asarray(layer.params["params"]["Dense_0"]["kernel"].value)
    )
    logical = variables["params"]["Dense_1"]["kernel"]
    assert isinstance(logical, nn.LogicallyPartitioned)
    assert tuple(logical.names) == ("embed", "mlp")
    # Unannotated leaves stay plain arrays.
    assert isinstance(variables["params"]["Dense_2"]["kernel"], jax.Array)
    assert isinstance(variables["params"]["Dense_0"]["bias"], jax.Array)
    # Back to pure Flax: the boxed variables apply as they are.
    flax_out = dm.LinenPartitioned().apply(variables, x[:BATCH])
    np.testing.assert_allclose(np.asarray(flax_out), model.predict(x[:BATCH], verbose=0), atol=ATOL)


def _nnx_partitioned_eager_off():
    with nnx.use_eager_sharding(False):
        module = dm.NNXPartitioned(nnx.Rngs(0))
    return FlaxLayer(module, name="f")


def _nnx_partitioned_in_mesh():
    # The module is created sharded on the same devices (Flax's eager sharding, on by default).
    mesh = keras.distribution.distribution().device_mesh.backend_mesh
    with jax.set_mesh(mesh):
        module = dm.NNXPartitioned(nnx.Rngs(0))
    return FlaxLayer(module, name="f")


@pytest.mark.parametrize(
    "make_layer", [_nnx_partitioned_eager_off, _nnx_partitioned_in_mesh], ids=["eager", "mesh"]
)
def test_nnx_sharding_metadata_becomes_the_layout(make_layer):
    x, y = make_data(64, dm.IN_DIM, dm.OUT_DIM)
    reference = run(_nnx_partitioned_eager_off, None, x, y)
    distributed = run(make_layer, model_parallel(), x, y)
    shardings = distributed[2]
    assert padded(shardings["m/f/up/kernel"].spec, 2) == (None, "model")
    assert padded(shardings["m/f/down/kernel"].spec, 2) == ("model", None)
    assert shardings["m/f/up/bias"].is_fully_replicated
    assert_same_training(reference, distributed)


def test_nnx_flax_variables_keep_sharding_metadata():
    _, layer = build(_nnx_partitioned_eager_off, model_parallel())
    state = layer.flax_variables
    assert isinstance(state, nnx.State)
    up = state["up"]["kernel"]
    assert isinstance(up, nnx.Param)
    assert up.get_metadata()["out_sharding"] == (None, "model")
    assert state["down"]["kernel"].get_metadata()["out_sharding"] == ("model", None)
    assert padded(up.get_value().sharding.spec, 2) == (None, "model")
    specs = nnx.get_partition_spec(state)
    assert specs["up"]["kernel"].get_value() == P(None, "model")


def test_layout_map_entry_wins_over_linen_annotation():
    # Dense_0 is annotated (None, "model"), Dense_1 with logical names no rule maps: the
    # LayoutMap entries are used instead, and Dense_1's annotation is not even looked at.
    model, _ = build(
        linen_partitioned,
        model_parallel({".*Dense_0/kernel": ("model", None), ".*Dense_1/kernel": (None, None)}),
    )
    assert padded(spec_of(model, "Dense_0/kernel"), 2) == ("model", None)
    assert padded(spec_of(model, "Dense_1/kernel"), 2) == (None, None)


def test_layout_map_entry_wins_over_nnx_metadata():
    model, _ = build(_nnx_partitioned_eager_off, model_parallel({".*up/kernel": ("model", None)}))
    assert padded(spec_of(model, "up/kernel"), 2) == ("model", None)
    assert padded(spec_of(model, "down/kernel"), 2) == ("model", None)  # its own annotation


def _nnx_unknown_axis():
    with nnx.use_eager_sharding(False):
        module = dm.NNXPartitioned(nnx.Rngs(0), up_axes=(None, "tensor"))
    return FlaxLayer(module, name="f")


@pytest.mark.parametrize(
    ("make_layer", "path"),
    [
        (lambda: FlaxLayer(dm.LinenUnknownAxis(), name="f"), "m/f/params/Dense_0/kernel"),
        (_nnx_unknown_axis, "m/f/up/kernel"),
    ],
    ids=["linen", "nnx"],
)
def test_annotation_naming_an_unknown_mesh_axis_raises(make_layer, path):
    with pytest.raises(ValueError, match=f"{path}.*tensor|tensor.*{path}") as info:
        build(make_layer, model_parallel())
    message = str(info.value)
    assert "'batch', 'model'" in message  # the mesh's axes are shown


def test_data_parallel_ignores_annotations():
    # A DataParallel mesh has no "model" axis: annotations are not layouts there, every
    # variable is replicated (as with any other model).
    with nn.logical_axis_rules([("embed", None), ("mlp", "model")]):
        model, _ = build(linen_partitioned, keras.distribution.DataParallel())
    model_nnx, _ = build(_nnx_partitioned_eager_off, keras.distribution.DataParallel())
    for variable in model.weights + model_nnx.weights:
        assert variable.value.sharding.is_fully_replicated, variable.path
        assert len(variable.value.sharding.device_set) == N_DEVICES, variable.path


# --------------------------------------------------------------- fine-tuning transforms


def test_lora_and_int8_variables_follow_their_kernels_layout():
    """Adapters take the LayoutMap entry of their base kernel, with the low-rank axis
    replicated; an int8 kernel keeps its layout and its scale follows the output axis."""
    x, y = make_data(64, dm.IN_DIM, dm.OUT_DIM)
    entries = {".*Dense_0/kernel": (None, "model"), ".*Dense_1/kernel": ("model", None)}
    model, layer = build(linen_bn, model_parallel(entries))
    layer.quantize("int8")  # both kernels
    layer.enable_lora(2, paths=r"params/Dense_0/kernel")  # QLoRA
    expected = {
        "f/params/Dense_0/kernel": (None, "model"),
        "int8/params/Dense_0/kernel/scale": ("model",),
        "lora/params/Dense_0/kernel/a": (None, None),
        "lora/params/Dense_0/kernel/b": (None, "model"),
        "f/params/Dense_1/kernel": ("model", None),
        "int8/params/Dense_1/kernel/scale": (None,),
    }
    specs = {path: padded(spec_of(model, path), len(axes)) for path, axes in expected.items()}
    assert specs == expected
    before = weights_of(model)
    train(model, x, y, epochs=1)
    after = weights_of(model)
    for path in ("m/f/params/Dense_0/kernel", "m/f/params/Dense_1/kernel"):
        assert np.array_equal(before[path], after[path]), path
    assert not np.array_equal(
        before["m/f/lora/params/Dense_0/kernel/b"], after["m/f/lora/params/Dense_0/kernel/b"]
    )
