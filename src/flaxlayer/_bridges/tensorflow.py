"""The TensorFlow backend: the pure function converted with jax2tf, once per input signature.

Unknown dimensions become symbolic (shape polymorphism): the leading dimension of every input
shares the symbol "batch", any other unknown dimension gets its own.

Gradients are attached with `tf.custom_gradient`, and converted the same way as the function
(so gradients of gradients work too, and the backward module, converted when TensorFlow builds
the gradient, is serialized for TensorFlow as well: next paragraph). A call that a gradient tape
records (Keras's train step) runs a forward module that also returns the residuals of
`jax.vjp` (the leaves of its pullback), and the backward module applies the pullback to them
and the cotangents: the forward is not computed twice, and gradients are computed only with
respect to the arguments the tape watches (the variables, not the batch). A call no tape
records (predict, export) runs the plain forward; a gradient asked of it later (a `tf.function`
differentiated as a whole) is `jax.vjp` of the whole function, converted.

Our modules are made for the TensorFlow installed. JAX's serializer keeps CHLO operations that
have no StableHLO equivalent (`erf`: `lax.erf`, `jax.scipy.special.erf`, truncated-normal
sampling; `top_k`) as `composite` operations, in a form newer than TensorFlow 2.21 reads
("unregistered operation 'vhlo.composite_v2'"), whose bodies TensorFlow cannot refine to
concrete shapes either. For our conversions only, they are expanded into plain StableHLO
before serialization, and the module is serialized for the older of JAX's target version and
TensorFlow's own. Other jax2tf or `jax.export` users in the process are unaffected.

Eager calls (outside `tf.function`) run the converted function through `tf.function`s cached
per signature (a converted function called eagerly exports the JAX function again every time):
without a tape, one XLA-compiled function that reads the layer's variables itself (`_Eager`).
"""

import contextlib
import contextvars
import functools
import hashlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
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


def _tensors(inputs) -> tuple[list, Any]:
    """The inputs' leaves as tensors (those that are not yet), and their structure."""
    leaves, treedef = jax.tree.flatten(inputs)
    return [x if isinstance(x, tf.Tensor) else tf.convert_to_tensor(x) for x in leaves], treedef


def _signature(leaves: list) -> tuple:
    return tuple((tuple(x.shape.as_list()), x.dtype.name) for x in leaves)


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


def _inexact(dtype) -> bool:
    """`_differentiable`, of a JAX dtype: the same results get cotangents on both sides."""
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def _in_current_graph(value) -> tf.Tensor:
    """`value` as a tensor of the graph being built (`tf.custom_gradient` needs that).

    An argument may come from an enclosing graph (the forward pass's, when this is the gradient
    of a `tf.function`): an identity captures it here.
    """
    tensor = tf.convert_to_tensor(value)
    if tf.executing_eagerly() or tensor.graph is tf.compat.v1.get_default_graph():
        return tensor
    return tf.identity(tensor)


def _kept_for(tensors: Sequence[tf.Tensor], residuals: bool | None) -> tuple:
    """The arguments a call keeps residuals for (see `_Converted.__call__`).

    A tape records gradients for the tensors it watches and those computed from them: Keras's
    train step watches the variables, not the batch, whose gradient (a convolution's backward
    with respect to its input, say) nobody needs.
    """
    if residuals is False:
        return ()
    return tuple(
        i
        for i, t in enumerate(tensors)
        if _differentiable(t.dtype) and (residuals or _compat.tensorflow_tape_records([t]))
    )


def _struct(tensor: tf.Tensor) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(tensor.shape.as_list()), tensor.dtype.as_numpy_dtype)


def _poly_or_none(shape, poly: str) -> str | None:
    """A result's polymorphic shape, as a later conversion takes it: None where it is static."""
    return None if all(isinstance(d, int) for d in shape) else poly


class _Converted:
    """`fun` (flat arrays in, a flat list of arrays out) as a TensorFlow function.

    Differentiable with respect to its floating-point arguments and results; integer arguments
    (the rng key, token ids) get no gradient. A call that a gradient tape records runs
    `_Split`'s forward, which also returns what the backward needs from it. Any other call
    runs `fun` alone; a gradient asked of it later (a `tf.function` differentiated as a whole,
    `tf.gradients`) is `jax.vjp(fun)` converted the same way, which computes the forward again.
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
        self.splits: dict = {}

    def __call__(self, *args, residuals: bool | None = None) -> list:
        """`residuals`: whether to keep the forward's residuals for a gradient with respect to
        every floating-point argument (None: for those a gradient tape records)."""
        tensors = [_in_current_graph(a) for a in args]
        wrt = _kept_for(tensors, residuals)
        split = self._split(tensors, wrt) if wrt else None
        if split is not None:
            return split(tensors)

        @tf.custom_gradient
        def call(*args):
            outs = self.run(args)

            def grad(*cts):
                return self._gradient(args, outs, cts)

            return outs, grad

        return list(call(*tensors))

    def run(self, args: Sequence[tf.Tensor]) -> list:
        """The converted function's op (without a gradient of its own)."""
        token = _CONVERTING.set(self)
        try:
            with _serialized_for_tensorflow():
                return list(self.forward(*args))
        finally:
            _CONVERTING.reset(token)

    def _split(self, args: list, wrt: tuple) -> "_Split | None":
        if wrt not in self.splits:
            self.splits[wrt] = _Split.make(self, [_struct(a) for a in args], wrt)
        return self.splits[wrt]

    def _gradient(self, args: Sequence, outs: list, cts: Sequence) -> list:
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

    def _backward(self, args: Sequence, wrt: tuple, of: tuple) -> "_Converted":
        """`jax.vjp(fun)` of the arguments and cotangents (the forward computed again)."""
        fun, n = self.fun, len(args)
        specs = [_struct(a) for a in args]
        outs, out_polys = jax2tf.eval_polymorphic_shape(fun, polymorphic_shapes=self.polys)(*specs)
        ct_polys = [_poly_or_none(outs[j].shape, out_polys[j]) for j in of]

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


# ------------------------------------------------------------ forward and backward, split


def _linearize(fun: Callable, args: Sequence, wrt: tuple) -> tuple[list, Any]:
    """`fun`'s results at `args`, and the vjp of its inexact results with respect to `args[i]`
    for `i` in `wrt`: a pytree whose leaves are the residuals."""

    def at(*xs):
        full = list(args)
        for i, x in zip(wrt, xs, strict=True):
            full[i] = x
        results = [jnp.asarray(r) for r in fun(*full)]
        return [r for r in results if _inexact(r.dtype)], results

    _, pullback, results = jax.vjp(at, *(args[i] for i in wrt), has_aux=True)
    return results, pullback


def _residual_sources(known: list, leaves: list) -> tuple[list, list[int]]:
    """(the residuals not in `known`, the index of each leaf in `known` followed by those).

    A residual is often an argument itself (a kernel, the layer's input) or a result: it is
    passed on as it is rather than copied into another output.
    """
    where = {id(v): i for i, v in enumerate(known)}
    extra: list = []
    sources = []
    for leaf in leaves:
        i = where.get(id(leaf))
        if i is None:
            i = where[id(leaf)] = len(known) + len(extra)
            extra.append(leaf)
        sources.append(i)
    return extra, sources


def _pullback_from(
    fun: Callable, args: Sequence, wrt: tuple, known: Sequence, sources: list, owner: str
):
    """The pullback `_linearize` makes at `args`, its residuals taken from `known` rather than
    computed: the forward is only traced (`jax.eval_shape`), for the pullback's structure."""
    found = []

    def trace(*xs):
        results, pullback = _linearize(fun, xs, wrt)
        leaves, treedef = jax.tree.flatten(pullback)
        found.append((treedef, _residual_sources([*xs, *results], leaves)[1]))
        return leaves

    jax.eval_shape(trace, *args)
    treedef, traced_sources = found[0]
    _check_same_trace(sources, traced_sources, owner)
    return jax.tree.unflatten(treedef, [known[i] for i in sources])


def _check_same_trace(first, found, owner: str) -> None:
    """The backward takes each residual from where the forward's first trace put it: every
    trace of the same function must find them in the same places."""
    if found != first:
        raise RuntimeError(
            f"{owner}: two traces of the layer's function gave different vjp residuals (does "
            "it depend on Python state that changes between calls?)."
        )


class _Split:
    """A gradient without the forward computed twice: `forward` returns `fun`'s results and the
    residuals of its vjp (the leaves of `jax.vjp`'s pullback); `backward` takes the arguments,
    what `forward` returned and the cotangents, and applies the pullback.

    Both are `_Converted`, hence differentiable (gradients of gradients), with the same symbolic
    dimensions as `fun`'s conversion: the residuals' shapes are expressions in them.
    """

    def __init__(self, parent: _Converted, specs: list, wrt: tuple):
        fun, n, self.wrt = parent.fun, len(specs), wrt
        layouts: list = []  # (number of results, sources) as the first trace found them

        def forward(*args):
            results, pullback = _linearize(fun, args, wrt)
            extra, sources = _residual_sources([*args, *results], jax.tree.leaves(pullback))
            if not layouts:
                layouts.append((len(results), sources))
            _check_same_trace(layouts[0], (len(results), sources), parent.owner)
            return [*results, *extra]

        structs, polys = jax2tf.eval_polymorphic_shape(forward, polymorphic_shapes=parent.polys)(
            *specs
        )
        self.n_results, sources = layouts[0]
        self.of = [j for j in range(self.n_results) if _inexact(structs[j].dtype)]
        self.extended = any(jax.dtypes.issubdtype(s.dtype, jax.dtypes.extended) for s in structs)
        produced = [_poly_or_none(s.shape, p) for s, p in zip(structs, polys, strict=True)]
        n_known = n + len(structs)

        def backward(*flat):
            args, known, cts = flat[:n], flat[:n_known], flat[n_known:]
            pullback = _pullback_from(fun, args, wrt, known, sources, parent.owner)
            return list(pullback(list(cts)))

        self.forward = _Converted(forward, parent.polys, parent.platforms, parent.owner)
        self.backward = _Converted(
            backward,
            parent.polys + produced + [produced[j] for j in self.of],
            parent.platforms,
            parent.owner,
        )

    @classmethod
    def make(cls, parent: _Converted, specs: list, wrt: tuple) -> "_Split | None":
        """The split of `parent`'s function, or None where the plain call serves: nothing to
        differentiate, residuals TensorFlow cannot hold (PRNG keys), or a function JAX cannot
        differentiate (`lax.while_loop`), whose error then comes if a gradient is asked for."""
        if not wrt:
            return None
        try:
            split = cls(parent, specs, wrt)
        except Exception:  # the same trace again, without the vjp, raises what is the caller's
            return None
        return split if split.of and not split.extended else None

    def __call__(self, args: list) -> list:
        @tf.custom_gradient
        def call(*args):
            produced = self.forward(*args, residuals=False)

            def grad(*cts):
                return self._gradient(args, produced, cts)

            return produced[: self.n_results], grad

        return list(call(*args))

    def _gradient(self, args: Sequence, produced: list, cts: Sequence) -> list:
        cts = [tf.zeros_like(produced[j]) if cts[j] is None else cts[j] for j in self.of]
        grads: list = [None] * len(args)
        for i, g in zip(self.wrt, self.backward(*args, *produced, *cts), strict=True):
            grads[i] = g
        return grads


class _Functions(NamedTuple):
    """The function for one input signature: in a graph being built, and in eager calls without
    and with a gradient tape recording. Eager calls go through `tf.function`s: a converted
    function called eagerly exports the JAX function again every time."""

    graph: Callable
    eager: "_Eager"
    taped: Callable


def _same(a: Sequence, b: Sequence) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


class _Eager:
    """Eager calls without a gradient tape: one XLA computation that reads the layer's variables
    and runs the converted function, a concrete function of the rng and the inputs.

    Handed to a `tf.function` as arguments, ~40 variables cost more than a small model's
    computation (TensorFlow works out each one's trace type on every call); closed over, and
    read inside one compiled cluster (rather than by ~40 graph nodes), next to nothing. Values
    that are not variables (a stateless call's) go through `generic`.
    """

    def __init__(self, converted: _Converted, out_def: list, generic: Callable):
        self.converted, self.out_def, self.generic = converted, out_def, generic
        self.variables: tuple = ()
        self.function: Callable | None = None

    def __call__(self, params, state, rng, inputs):
        variables = (*params, *state)
        args = [*([] if rng is None else [rng]), *jax.tree.leaves(inputs)]
        if self.function is None or not _same(variables, self.variables):
            if not all(isinstance(v, tf.Variable) for v in variables):
                return self.generic(params, state, rng, inputs)
            self.function = self._closed_over(variables, args)
            self.variables = variables
        return self.out_def[0].unflatten(self.function(args))

    def _closed_over(self, variables: tuple, args: list) -> Callable:
        converted = self.converted

        def call(*args):
            return converted.run([*(tf.convert_to_tensor(v) for v in variables), *args])

        specs = [tf.TensorSpec(a.shape, a.dtype) for a in args]
        function = tf.function(call, autograph=False, jit_compile=True)
        return _compat.tensorflow_flat_call(function.get_concrete_function(*specs))


def _convert(
    pure: Callable,
    training: bool,
    counts: tuple[int, int, bool],
    x_def,
    x_leaves,
    platforms,
    owner: str,
) -> _Functions:
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

    def converted(params, state, rng, inputs, residuals=None):
        fixed = [*params, *state, *([rng] if has_rng else [])]
        outs = converted_flat(*fixed, *jax.tree.leaves(inputs), residuals=residuals)
        return out_def[0].unflatten(outs)

    # Traced under an eager tape, a tf.function sees no tape of its own: `taped` keeps the
    # residuals for the gradient TensorFlow derives from its graph. Eagerly, variables enter
    # these as handles: they read them in their graphs.
    return _Functions(
        graph=converted,
        eager=_Eager(converted_flat, out_def, tf.function(converted, autograph=False)),
        taped=tf.function(functools.partial(converted, residuals=True), autograph=False),
    )


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
        leaves, treedef = _tensors(inputs)
        inputs = treedef.unflatten(leaves)
        if rng is not None:
            rng = tf.cast(rng, tf.int32)
        signature = _signature(leaves)
        key = (training, rng is not None, treedef, signature)
        fns = converted.get(key)
        if fns is None:
            counts = (len(params), len(state), rng is not None)
            fns = converted[key] = _convert(
                pure, training, counts, treedef, signature, platforms, owner
            )
        args = (list(params), list(state), rng, inputs)
        if not tf.executing_eagerly():
            _prepare_export(owner)
            return fns.graph(*args)
        return (fns.taped if _compat.tensorflow_tape_records() else fns.eager)(*args)

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
