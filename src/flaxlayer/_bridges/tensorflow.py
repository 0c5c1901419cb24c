"""The TensorFlow backend: the pure function converted with jax2tf, once per input signature.

Unknown dimensions become symbolic (shape polymorphism): the leading dimension of every input
shares the symbol "batch", any other unknown dimension gets its own.

Gradients are the converted `jax.vjp` of the same function, attached with `tf.custom_gradient`
(as jax2tf's own `with_gradient=True` does; the backward function is converted the same way,
so gradients of gradients work too). The conversion is done here rather than by jax2tf so that
the backward module, converted when TensorFlow builds the gradient, is serialized for
TensorFlow too (next paragraph).

Our modules are made for the TensorFlow installed. JAX's serializer keeps CHLO operations that
have no StableHLO equivalent (`erf`: `lax.erf`, `jax.scipy.special.erf`, truncated-normal
sampling; `top_k`) as `composite` operations, in a form newer than TensorFlow 2.21 reads
("unregistered operation 'vhlo.composite_v2'"), whose bodies TensorFlow cannot refine to
concrete shapes either. For our conversions only, they are expanded into plain StableHLO
before serialization, and the module is serialized for the older of JAX's target version and
TensorFlow's own. Other jax2tf or `jax.export` users in the process are unaffected.

Eager calls (outside `tf.function`) run the converted function through a `tf.function` cached
per signature: a converted function called eagerly exports the JAX function again every time.
"""

import contextlib
import contextvars
import functools
import hashlib
import weakref
from collections.abc import Callable, Iterator, Sequence

import jax
import tensorflow as tf
from jax.experimental import jax2tf

from flaxlayer import _compat

# The StableHLO version our exports serialize for, while one of them runs (None: JAX's own).
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "flaxlayer_stablehlo_target", default=None
)


# The serializers we installed (so that a second install, or a reload, wraps nothing twice).
_HOOKS: set = set()

# The conversion running now, and each live conversion by the digest of the module it
# serialized: the ONNX exporter finds the JAX function behind an `XlaCallModule` op here.
_CONVERTING: contextvars.ContextVar["_Converted | None"] = contextvars.ContextVar(
    "flaxlayer_converting", default=None
)
_BY_MODULE: "weakref.WeakValueDictionary[bytes, _Converted]" = weakref.WeakValueDictionary()


def _poly_shape(leaf_index: int, shape) -> str | None:
    dims = list(shape)
    if all(d is not None for d in dims):
        return None
    names = [
        str(d) if d is not None else ("batch" if axis == 0 else f"d{leaf_index}_{axis}")
        for axis, d in enumerate(dims)
    ]
    return "(" + ", ".join(names) + (",)" if len(names) == 1 else ")")


def _signature(inputs) -> tuple:
    leaves, treedef = jax.tree.flatten(inputs)
    return treedef, tuple((tuple(x.shape.as_list()), x.dtype.name) for x in leaves)


# ---------------------------------------------------------------------------- serialization


@functools.cache
def _tensorflow_stablehlo_target() -> str:
    """The StableHLO version our modules are serialized for: the older of JAX's default
    target and TensorFlow's own version. Installs the serializer hook on first use."""
    from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo

    _install_serializer_hook()
    return _compat.jax_stablehlo_target(tf_stablehlo.get_current_version())


def _install_serializer_hook() -> None:
    """Routes JAX export's serialization through `_compat.serialize_portable` while `_TARGET`
    is set. Outside our conversions (`_TARGET` unset) the serializer does exactly what it did.

    Serialization keeps CHLO operations without a StableHLO equivalent (`erf`, `top_k`) as
    `composite` operations; TensorFlow 2.21 reads no `composite_v2`, and cannot refine the
    dynamic shapes inside a composite's body (shape polymorphism). Expanded beforehand into
    plain StableHLO (as XLA expands them before compiling), they leave nothing to wrap.
    """
    get, set_ = _compat.export_serializer()
    original = get()
    if original in _HOOKS:
        return

    def module_to_bytecode(module):
        target = _TARGET.get()
        if target is None:
            return original(module)
        data = _compat.serialize_portable(module, target)
        converting = _CONVERTING.get()
        if converting is not None:
            _BY_MODULE[hashlib.sha256(data).digest()] = converting
        return data

    _HOOKS.add(module_to_bytecode)
    set_(module_to_bytecode)


@contextlib.contextmanager
def _serialized_for_tensorflow() -> Iterator[None]:
    token = _TARGET.set(_tensorflow_stablehlo_target())
    try:
        yield
    finally:
        _TARGET.reset(token)


# ------------------------------------------------------------------------------ conversion


def _differentiable(dtype: tf.DType) -> bool:
    return dtype.is_floating or dtype.is_complex


class _Converted:
    """`fun` (flat arrays in, a flat list of arrays out) as a TensorFlow function.

    Its gradient is `jax.vjp(fun)` converted the same way (lazily, when TensorFlow first asks
    for it), with respect to the floating-point arguments and results; integer arguments (the
    rng key, token ids) get no gradient.
    """

    def __init__(self, fun: Callable, polys: Sequence[str | None], platforms, owner: str):
        self.fun, self.polys, self.platforms, self.owner = fun, list(polys), platforms, owner
        self.forward = jax2tf.convert(
            fun,
            polymorphic_shapes=self.polys,
            with_gradient=False,  # ours, below
            native_serialization_platforms=platforms,
        )
        self.backwards: dict = {}

    def __call__(self, *args) -> list:
        # Tensors of this graph: an argument may come from an enclosing graph (the forward
        # pass's, when this is the gradient of a tf.function); identity captures it here.
        tensors = [tf.identity(tf.convert_to_tensor(a)) for a in args]

        @tf.custom_gradient
        def call(*args):
            token = _CONVERTING.set(self)
            try:
                with _serialized_for_tensorflow():
                    outs = list(self.forward(*args))
            finally:
                _CONVERTING.reset(token)

            def grad(*cts):
                return self._gradient(args, outs, cts)

            return outs, grad

        return list(call(*tensors))

    def _gradient(self, args: list, outs: list, cts: Sequence) -> list:
        wrt = tuple(i for i, a in enumerate(args) if _differentiable(a.dtype))
        of = tuple(j for j, o in enumerate(outs) if _differentiable(o.dtype))
        grads: list = [None] * len(args)
        if not wrt or not of:
            return grads
        backward = self.backwards.get((wrt, of))
        if backward is None:
            backward = self.backwards[(wrt, of)] = self._backward(args, wrt, of)
        cts = [tf.zeros_like(outs[j]) if cts[j] is None else cts[j] for j in of]
        for i, g in zip(wrt, backward(*args, *cts), strict=True):
            grads[i] = g
        return grads

    def _backward(self, args: list, wrt: tuple, of: tuple) -> "_Converted":
        fun, n = self.fun, len(args)
        specs = [
            jax.ShapeDtypeStruct(tuple(a.shape.as_list()), a.dtype.as_numpy_dtype) for a in args
        ]
        outs, out_polys = jax2tf.eval_polymorphic_shape(fun, polymorphic_shapes=self.polys)(*specs)
        ct_polys = [
            None if all(isinstance(d, int) for d in outs[j].shape) else out_polys[j] for j in of
        ]

        def vjp(*args_and_cts):
            args, cts = list(args_and_cts[:n]), list(args_and_cts[n:])

            def of_wrt(*xs):
                full = list(args)
                for i, x in zip(wrt, xs, strict=True):
                    full[i] = x
                results = fun(*full)
                return [results[j] for j in of]

            _, pullback = jax.vjp(of_wrt, *(args[i] for i in wrt))
            return list(pullback(cts))

        return _Converted(vjp, self.polys + ct_polys, self.platforms, self.owner)

    def onnx_structs(self, args: Sequence) -> list:
        """jax2onnx's input specs: the arguments' shapes, with this conversion's symbolic
        dimensions named."""
        structs = []
        for arg, poly in zip(args, self.polys, strict=True):
            shape: list = list(arg.shape)
            if poly is not None:
                names = [d.strip() for d in poly.strip("()").split(",") if d.strip()]
                shape = [n if not n.isdigit() else int(n) for n in names]
            structs.append(jax.ShapeDtypeStruct(tuple(shape), arg.dtype))
        return structs


def _convert(
    pure: Callable,
    training: bool,
    counts: tuple[int, int, bool],
    x_def,
    x_leaves,
    platforms,
    owner: str,
) -> tuple[Callable, Callable]:
    """(in-graph, eager) versions of the function for one input signature."""
    n_params, n_state, has_rng = counts
    n_fixed = n_params + n_state + int(has_rng)
    out_def: list = [None]

    def flat(*args):
        rng = args[n_params + n_state] if has_rng else None
        inputs = x_def.unflatten(args[n_fixed:])
        result = pure(
            list(args[:n_params]), list(args[n_params : n_params + n_state]), rng, inputs, training
        )
        leaves, out_def[0] = jax.tree.flatten(result)
        return leaves

    polys = [None] * n_fixed + [_poly_shape(i, shape) for i, (shape, _) in enumerate(x_leaves)]
    converted_flat = _Converted(flat, polys, platforms, owner)

    def converted(params, state, rng, inputs):
        fixed = [*params, *state, *([rng] if has_rng else [])]
        outs = converted_flat(*fixed, *jax.tree.leaves(inputs))
        return out_def[0].unflatten(outs)

    return converted, tf.function(converted, autograph=False)


def compile_tensorflow(
    pure: Callable, owner: str, platforms: Sequence[str] | None = None
) -> Callable:
    """`run(params, state, rng, inputs, training)` through jax2tf.

    Args:
        pure: The layer's pure function.
        owner: The layer, as error messages name it.
        platforms: The platforms to lower for (`native_serialization_platforms` of
            `jax2tf.convert`, e.g. `("cpu", "tpu")`); None: the platform JAX runs on here.
    """
    platforms = None if platforms is None else tuple(platforms)
    converted: dict = {}

    @tf.autograph.experimental.do_not_convert
    def run(params, state, rng, inputs, training):
        inputs = jax.tree.map(tf.convert_to_tensor, inputs)
        if rng is not None:
            rng = tf.cast(rng, tf.int32)
        treedef, signature = _signature(inputs)
        key = (training, rng is not None, treedef, signature)
        fns = converted.get(key)
        if fns is None:
            counts = (len(params), len(state), rng is not None)
            fns = converted[key] = _convert(
                pure, training, counts, treedef, signature, platforms, owner
            )
        if not tf.executing_eagerly():
            _prepare_export(owner)
        # Eagerly, variables enter the tf.function as handles: it reads them in its graph.
        return fns[tf.executing_eagerly()](list(params), list(state), rng, inputs)

    return run


# ---------------------------------------------------------------------------------- export


def _prepare_export(owner: str) -> None:
    """Readies the Keras exporter tracing this call, if one is: ONNX gets our tf2onnx handler
    for the layer's `XlaCallModule` op; exporters that cannot read the op fail here."""
    from flaxlayer._bridges import check_export_format

    if check_export_format(owner) == "onnx":
        _register_tf2onnx_handler()


# Attributes of `XlaCallModule` tf2onnx cannot copy (empty lists of unknown type) and our
# handler does not read.
_XLA_CALL_MODULE_ATTRS = ("Sout", "dim_args_spec", "disabled_checks", "function_list", "platforms")


@functools.cache
def _register_tf2onnx_handler() -> None:
    from tf2onnx import tf_utils
    from tf2onnx.handler import tf_op

    tf_utils.TF_IGNORED_NODE_ATTRS.update(_XLA_CALL_MODULE_ATTRS)

    @tf_op("XlaCallModule")
    class _XlaCallModule:
        @classmethod
        def version_1(cls, ctx, node, **kwargs):
            _xla_call_module_to_onnx(ctx, node)

    # jax2tf marks results it computes no gradient for; in an inference graph, the identity.
    @tf_op("PreventGradient")
    class _PreventGradient:
        @classmethod
        def version_1(cls, ctx, node, **kwargs):
            node.type = "Identity"
            node.attr.pop("message", None)


class _Tf2OnnxEmitter:
    """`_onnx.Emitter` into a tf2onnx graph (handles are tensor names)."""

    def __init__(self, ctx, prefix: str):
        self.ctx, self.prefix, self.count = ctx, prefix, 0

    def _name(self) -> str:
        self.count += 1
        return f"{self.prefix}/{self.count}"

    def constant(self, array):
        return self.ctx.make_const(self._name(), array).output[0]

    def node(self, op_type, inputs, attrs, n_outputs, domain):
        made = self.ctx.make_node(
            op_type,
            list(inputs),
            attr=attrs,
            output_count=n_outputs,
            name=self._name(),
            domain=domain or None,
        )
        return list(made.output)


def _xla_call_module_to_onnx(ctx, node) -> None:
    """Replaces one of our `XlaCallModule` ops in a tf2onnx graph by the ONNX nodes jax2onnx
    makes of the same JAX function."""
    from onnx import helper

    from flaxlayer._onnx import onnx_graph, replay

    module = node.get_attr_value("module")
    converted = _BY_MODULE.get(hashlib.sha256(module).digest()) if module else None
    if converted is None:
        raise NotImplementedError(
            f"tf2onnx: the XlaCallModule op {node.name!r} was not made by a flaxlayer layer in "
            "this process (or its layer is gone); only those can be converted to ONNX."
        )
    args = [
        jax.ShapeDtypeStruct(
            tuple(d if d >= 0 else None for d in ctx.get_shape(i) or ()),
            helper.tensor_dtype_to_np_dtype(ctx.get_dtype(i)),
        )
        for i in node.input
    ]
    graph = onnx_graph(converted.fun, converted.onnx_structs(args), ctx.opset, converted.owner)
    outs = replay(graph, list(node.input), _Tf2OnnxEmitter(ctx, node.name), converted.owner)
    old = list(node.output)
    ctx.remove_node(node.name)
    for before, after in zip(old, outs, strict=True):
        ctx.replace_all_inputs(before, after)


def untouched_empty(shape, dtype) -> tf.Tensor:
    """An uninitialized tensor: its pages are not resident until something writes them."""
    return tf.raw_ops.Empty(shape=list(shape), dtype=tf.as_dtype(str(dtype)), init=False)
