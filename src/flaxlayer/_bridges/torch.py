"""The PyTorch backend: torch tensors handed to JAX through DLPack (no copy), with autograd.

A training call runs a jitted `jax.vjp` of the pure function inside a `torch.autograd.Function`
whose backward applies the saved vjp (also jitted): torch's `loss.backward()` reaches the Flax
params. Calls that need no gradient run the jitted function alone. JAX compiles each once per
input signature.
"""

import itertools
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch


def _jax_sees(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    platform = {"cuda": "gpu", "mps": "METAL"}.get(device.type, device.type)
    return any(d.platform.lower() == platform.lower() for d in jax.devices())


def to_jax(tensor: torch.Tensor, owner: str) -> jax.Array:
    if not _jax_sees(tensor.device):
        raise RuntimeError(
            f"{owner}: on the PyTorch backend, a tensor is on device {tensor.device}, which "
            f"JAX cannot see (JAX devices: {', '.join(str(d) for d in jax.devices())}). "
            "Install a JAX build for that device, or move the model and data to a device "
            "both frameworks see (e.g. CPU)."
        )
    tensor = tensor.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return jax.dlpack.from_dlpack(tensor)


class _Views:
    """JAX views of the layer's own tensors (params, state), remade only when a tensor changed.

    A DLPack hand-off costs tens of microseconds per tensor; an eager `layer(x)` would pay it
    for every variable on every call. A view is reused while its position holds the same tensor
    with the same storage and in-place version counter (torch bumps it on every in-place write,
    e.g. an optimizer step or `Variable.assign`).
    """

    def __init__(self, owner: str):
        self.owner = owner
        self.cache: dict[int, tuple] = {}

    def __call__(self, tensors, offset: int = 0) -> list:
        out = []
        for i, t in enumerate(tensors, offset):
            hit = self.cache.get(i)
            version, pointer = t._version, t.data_ptr()
            if hit is not None and hit[0] is t and hit[1] == version and hit[2] == pointer:
                out.append(hit[3])
                continue
            array = to_jax(t, self.owner)
            self.cache[i] = (t, version, pointer, array)
            out.append(array)
        return out


def to_torch(array: jax.Array) -> torch.Tensor:
    return torch.from_dlpack(array)


def _is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


class _Call:
    """One call's bookkeeping, shared by forward and backward (`out_def` is set by forward)."""

    __slots__ = (
        "bwd",
        "fwd",
        "n_params",
        "n_state",
        "out_def",
        "owner",
        "rng",
        "training",
        "views",
        "x_def",
    )

    def __init__(self, fwd, bwd, owner, views, training, n_params, n_state, rng, x_def):
        self.fwd, self.bwd, self.owner, self.views = fwd, bwd, owner, views
        self.training, self.n_params, self.n_state = training, n_params, n_state
        self.rng, self.x_def, self.out_def = rng, x_def, None


class _JaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: _Call, *tensors):
        n_p, n_s = call.n_params, call.n_state
        params = call.views(tensors[:n_p])
        state = call.views(tensors[n_p : n_p + n_s], n_p)
        inputs = call.x_def.unflatten([to_jax(t, call.owner) for t in tensors[n_p + n_s :]])
        primals, vjp = call.fwd(params, state, call.rng, inputs, training=call.training)
        flat, call.out_def = jax.tree.flatten(primals)
        jax.block_until_ready(flat)
        ctx.call, ctx.vjp = call, vjp
        ctx.avals = [(x.shape, x.dtype) for x in flat]
        outs = tuple(to_torch(x) for x in flat)
        n_out = call.out_def.num_leaves
        n_new_state = len(jax.tree.leaves(primals[1]))
        no_grad = [
            o
            for i, (o, x) in enumerate(zip(outs, flat, strict=True))
            if not _is_float(x.dtype) or (n_out - 1 - n_new_state) <= i < n_out - 1
        ]
        ctx.mark_non_differentiable(*no_grad)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, grads)


@torch.compiler.disable  # compiled backward graphs (jit_compile=True) must not trace into JAX
def _backward(ctx, grads):
    call = ctx.call
    cotangents = []
    for g, (shape, dtype) in zip(grads, ctx.avals, strict=True):
        if not _is_float(dtype):
            cotangents.append(np.zeros(shape, jax.dtypes.float0))
        elif g is None:
            cotangents.append(jnp.zeros(shape, dtype))
        else:
            cotangents.append(to_jax(g.to(_torch_dtype(dtype)), call.owner))
    g_params, g_inputs = call.bwd(ctx.vjp, call.out_def.unflatten(cotangents))
    grads_p = [to_torch(g) if _is_float(g.dtype) else None for g in g_params]
    grads_x = [to_torch(g) if _is_float(g.dtype) else None for g in jax.tree.leaves(g_inputs)]
    return (None, *grads_p, *([None] * call.n_state), *grads_x)


def _torch_dtype(dtype) -> torch.dtype:
    return getattr(torch, np.dtype(dtype).name)


def _struct(tensor: torch.Tensor) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(tensor.shape), jnp.dtype(str(tensor.dtype).split(".")[-1]))


def _on_meta(tensors) -> bool:
    return any(t.device.type == "meta" for t in tensors)


def compile_torch(pure: Callable, owner: str) -> Callable:
    plain = jax.jit(pure, static_argnames=("training",))
    views = _Views(owner)

    def forward_with_vjp(params, state, rng, inputs, training):
        def f(p, x):
            return pure(p, state, rng, x, training)

        return jax.vjp(f, params, inputs)

    fwd = jax.jit(forward_with_vjp, static_argnames=("training",))
    bwd = jax.jit(lambda vjp, cotangents: vjp(cotangents))

    def symbolic(params, state, rng, inputs, training):
        # Keras's torch backend infers shapes by calling layers on "meta" tensors (no data).
        out = jax.eval_shape(
            lambda p, s, r, x: pure(p, s, r, x, training),
            [_struct(t) for t in params],
            [_struct(t) for t in state],
            None if rng is None else jax.ShapeDtypeStruct((2,), jnp.uint32),
            jax.tree.map(_struct, inputs),
        )
        return jax.tree.map(
            lambda s: torch.empty(s.shape, dtype=_torch_dtype(s.dtype), device="meta"), out
        )

    def run(params, state, rng, inputs, training):
        flat_x, x_def = jax.tree.flatten(inputs)
        flat_x = [x if isinstance(x, torch.Tensor) else torch.as_tensor(x) for x in flat_x]
        if _on_meta(flat_x) or _on_meta(params) or (rng is not None and _on_meta([rng])):
            return symbolic(params, state, rng, x_def.unflatten(flat_x), training)
        if torch.jit.is_tracing():
            return _traced(plain, pure, owner, params, state, rng, flat_x, x_def, training)
        rng_jax = None if rng is None else to_jax(rng, owner)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*params, *flat_x))
        if not needs_grad:
            out = plain(
                views(params),
                views(state, len(params)),
                rng_jax,
                x_def.unflatten([to_jax(t, owner) for t in flat_x]),
                training=training,
            )
            jax.block_until_ready(out)
            return jax.tree.map(to_torch, out)
        call = _Call(fwd, bwd, owner, views, training, len(params), len(state), rng_jax, x_def)
        outs = _JaxFunction.apply(call, *params, *state, *flat_x)
        return call.out_def.unflatten(list(outs))

    # Under torch.compile (Keras's jit_compile=True), dynamo cannot trace into JAX: it runs this
    # call as it is (already compiled by XLA) and compiles the torch code around it.
    return torch.compiler.disable(run)


# ---------------------------------------------------------------------------------- export


def _traced(plain, pure, owner, params, state, rng, flat_x, x_def, training):
    """A call under torch's tracer. torch.onnx's exporter (TorchScript) gets the call as one
    `_OnnxExport` op, which it turns into the ONNX nodes jax2onnx makes of the same function;
    anything else tracing (torch.jit.trace, OpenVINO's converter) cannot see into JAX."""
    from flaxlayer._bridges import check_export_format

    check_export_format(owner)
    if not torch.onnx.is_in_onnx_export():
        raise RuntimeError(
            f"{owner}: torch.jit.trace cannot record this layer: its computation runs in JAX, "
            "outside torch's tracer. Export the model to ONNX instead: "
            'model.export("model.onnx", format="onnx").'
        )
    fixed = [*params, *state, *([rng] if rng is not None else [])]
    n_params, n_state = len(params), len(state)
    out_def: list = [None]

    def flat(*args):
        r = args[n_params + n_state] if rng is not None else None
        x = x_def.unflatten(list(args[len(fixed) :]))
        result = pure(
            list(args[:n_params]), list(args[n_params : n_params + n_state]), r, x, training
        )
        leaves, out_def[0] = jax.tree.flatten(result)
        return leaves

    # Every input's leading dimension is its batch: the exported graph takes any batch size.
    structs = [_struct(t) for t in fixed] + [
        jax.ShapeDtypeStruct(("batch", *t.shape[1:]) if t.ndim else (), _struct(t).dtype)
        for t in flat_x
    ]
    key = next(_KEYS)
    _EXPORTS[key] = (flat, structs, owner)
    while len(_EXPORTS) > _KEEP_EXPORTS:
        del _EXPORTS[next(iter(_EXPORTS))]
    outs = _OnnxExport.apply(key, *fixed, *flat_x)
    return out_def[0].unflatten(list(outs))


# The calls traced for export, by key: (flat function, jax2onnx input specs, owner). The
# exporter turns a traced op into ONNX (`symbolic`) after tracing: the latest few are kept.
_EXPORTS: dict[int, tuple] = {}
_KEYS = itertools.count()
_KEEP_EXPORTS = 64


class _OnnxExport(torch.autograd.Function):
    @staticmethod
    def forward(ctx, key, *tensors):
        flat, _, owner = _EXPORTS[key]
        outs = jax.jit(flat)(*[to_jax(t, owner) for t in tensors])
        # Copies: torch's tracer cannot record a tensor imported through DLPack. It warns that
        # these are constants; `symbolic` replaces them by the computation.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            return tuple(torch.from_numpy(np.array(x)) for x in outs)

    @staticmethod
    def symbolic(g, key, *values):
        from flaxlayer._onnx import onnx_graph, replay

        flat, structs, owner = _EXPORTS[key]
        graph = onnx_graph(flat, structs, g.opset, owner)
        outs = replay(graph, values, _TorchEmitter(g), owner)
        return outs[0] if len(outs) == 1 else tuple(outs)


class _TorchEmitter:
    """`_onnx.Emitter` into a TorchScript ONNX graph (handles are graph values)."""

    def __init__(self, g):
        self.g = g

    def constant(self, array):
        return self.g.op("Constant", value_t=torch.from_numpy(np.array(array)))

    def node(self, op_type, inputs, attrs, n_outputs, domain):
        kwargs = dict(_torch_attribute(k, v) for k, v in attrs.items())
        name = f"{domain}::{op_type}" if domain else op_type
        out = self.g.op(name, *inputs, outputs=n_outputs, **kwargs)
        return list(out) if n_outputs > 1 else [out]


def _torch_attribute(name: str, value) -> tuple[str, object]:
    """An ONNX attribute as TorchScript's `g.op` takes it: the name suffixed with its kind."""
    from onnx import TensorProto, numpy_helper

    if isinstance(value, TensorProto):
        return f"{name}_t", torch.from_numpy(np.array(numpy_helper.to_array(value)))
    items = value if isinstance(value, list) else [value]
    if isinstance(value, bytes) or (items and isinstance(items[0], bytes)):
        decoded = [v.decode() for v in items]
        return f"{name}_s", decoded if isinstance(value, list) else decoded[0]
    kind = "f" if any(isinstance(v, float) for v in items) else "i"
    return f"{name}_{kind}", value


def untouched_empty(shape, dtype) -> torch.Tensor:
    """An uninitialized tensor: its pages are not resident until something writes them."""
    return torch.empty(tuple(shape), dtype=_torch_dtype(keras_dtype_name(dtype)))


def keras_dtype_name(dtype) -> str:
    return str(dtype).split(".")[-1]
