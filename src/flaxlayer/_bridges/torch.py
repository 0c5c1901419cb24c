"""The PyTorch backend: torch tensors handed to JAX without a copy, with autograd.

A call that needs no gradient runs the jitted pure function alone. A training call that needs
one runs a jitted `jax.vjp` inside a `torch.autograd.Function` whose backward applies the saved
vjp (also jitted): torch's `loss.backward()` reaches the Flax params. Only what torch asks a
gradient for is differentiated (a batch of data or a frozen param costs no backward pass). An
inference call that needs one (an eager `layer(x)` outside `torch.no_grad()`: Keras's params
require grad) runs the plain function, and its backward, should one come, recomputes the
forward pass. JAX compiles each once per input signature.

On CPU the layer's variables reach JAX as cached views of their memory (`_Views`), inputs as
NumPy views that jit takes without a copy, and results come back through DLPack's two native
calls: a DLPack import through the public wrappers costs ~50 us per tensor, and a call hands
over and back several.
"""

import functools
import itertools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from flaxlayer import _compat

# The dtypes of the tensors `Tensor.numpy()` views (bfloat16 has no NumPy dtype; a complex
# tensor may be a lazily conjugated view, which `numpy()` refuses): the others go by DLPack.
_NUMPY_DTYPES = frozenset(
    {
        torch.bool,
        torch.float16,
        torch.float32,
        torch.float64,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint8,
        torch.uint16,
        torch.uint32,
        torch.uint64,
    }
)


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


def _argument(tensor: torch.Tensor, owner: str, host: bool):
    """`tensor` as an argument of a jitted call. In a host call (`_Program.host`), a NumPy view
    of it: jit takes an aligned one without a copy, in ~2 us."""
    if host and tensor.dtype in _NUMPY_DTYPES:
        return tensor.detach().numpy()
    return to_jax(tensor, owner)


def _layout(tensor: torch.Tensor) -> tuple:
    return tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype


# torch's in-place write counter of a tensor.
_tensor_version = _compat.torch_tensor_version()


class _View:
    """A tensor's value as the compiled functions take it, and how it stays current.

    `SHARED`: a CPU array whose buffer is the tensor's memory (the DLPack import made no copy):
    it reads every in-place write that keeps the tensor's layout. `COPY`: an uncommitted JAX
    copy, for CPU memory JAX cannot share (misaligned): written since, the tensor goes over as
    its NumPy view (`STAGED`, which jit copies on each call, far cheaper than an import) until a
    call finds it unwritten again and copies it once more. `IMPORTED`: a DLPack import (another
    device), made again after a write.
    """

    __slots__ = ("kind", "layout", "pointer", "tensor", "value", "version", "written")

    def __init__(self, tensor, version, value, kind, layout, written=None):
        self.tensor, self.value, self.kind, self.layout = tensor, value, kind, layout
        self.pointer, self.written = layout[0], written
        # A staged view is checked on every call (see `_Views.refresh`).
        self.version = -1 if kind is _STAGED else version


_SHARED, _COPY, _STAGED, _IMPORTED = "shared", "copy", "staged", "imported"


class _Views:
    """The layer's own tensors (params, state) as the compiled functions take them, remade only
    when a tensor changed.

    A DLPack import costs tens of microseconds per tensor; an eager `layer(x)` would pay it
    for every variable on every call, and a training step for every param. A view is reused
    while its position holds the same tensor with the same storage and in-place version counter
    (torch bumps it on every in-place write, e.g. an optimizer step or `Variable.assign`); after
    a write, see `_View`. JAX never reads a tensor's memory while torch writes it: every call
    waits for its results before returning, and CPU tensors are written synchronously. NumPy
    and uncommitted values take the same compiled function: a position keeps its signature.
    """

    def __init__(self, owner: str, host: bool):
        self.owner, self.host = owner, host
        self.entries: list[_View | None] = []
        self.off_host = 0  # how many views are of tensors on another device than the CPU

    def __call__(self, tensors, start: int = 0) -> list:
        entries = self.entries
        if len(entries) < start + len(tensors):
            entries.extend([None] * (start + len(tensors) - len(entries)))
        out = []
        for i, t in enumerate(tensors, start):
            v = entries[i]
            if (
                v is None
                or v.tensor is not t
                or v.version != _tensor_version(t)
                or v.pointer != t.data_ptr()
            ):
                if v is None or v.tensor is not t:
                    self.off_host += (not t.is_cpu) - (v is not None and not v.tensor.is_cpu)
                v = entries[i] = self.refresh(t, v)
            out.append(v.value)
        return out

    def refresh(self, tensor: torch.Tensor, old: _View | None) -> _View:
        version, layout = _tensor_version(tensor), _layout(tensor)
        if old is None or old.tensor is not tensor or old.layout != layout:
            return self._import(tensor, version, layout)
        if old.kind is _SHARED:  # written in place: the shared buffer holds the new values
            return _View(tensor, version, old.value, _SHARED, layout)
        if old.kind is _STAGED and old.written == version:  # settled: copy it once
            return _View(tensor, version, jnp.array(old.value, copy=True), _COPY, layout)
        if old.kind is _IMPORTED:
            return self._import(tensor, version, layout)
        return _View(tensor, version, tensor.detach().numpy(), _STAGED, layout, written=version)

    def _import(self, tensor: torch.Tensor, version: int, layout: tuple) -> _View:
        array = to_jax(tensor, self.owner)
        if tensor.is_cpu and array.unsafe_buffer_pointer() == layout[0]:
            return _View(tensor, version, array, _SHARED, layout)
        if self.host and tensor.is_cpu and tensor.dtype in _NUMPY_DTYPES:
            copy = jnp.array(tensor.detach().numpy(), copy=True)
            return _View(tensor, version, copy, _COPY, layout)
        return _View(tensor, version, array, _IMPORTED, layout)


_to_torch_on_host = _compat.jax_host_array_to_torch()


def to_torch(array: jax.Array) -> torch.Tensor:
    return torch.from_dlpack(array)


def _converter(host: bool) -> Callable[[jax.Array], torch.Tensor]:
    """How a call's results become torch tensors. Both wait until the array is computed: by
    then the whole computation has run (its results are ready together)."""
    return _to_torch_on_host if host else to_torch


@functools.cache
def _differentiable(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.inexact)


def _pick(leaves: list, mask: tuple) -> list:
    return [x for x, m in zip(leaves, mask, strict=True) if m]


def _merge(leaves: list, picked: list, mask: tuple) -> list:
    it = iter(picked)
    return [next(it) if m else x for x, m in zip(leaves, mask, strict=True)]


def _vjp(pure, params, state, rng, inputs, training, wrt):
    """`jax.vjp` of the pure function with respect to the params and input leaves `wrt` marks:
    (differentiable outputs, vjp, new state leaves). The state is an auxiliary result: no
    cotangent is ever built for it."""
    p_mask, x_mask = wrt
    x_leaves, x_def = jax.tree.flatten(inputs)

    def f(diff_p, diff_x):
        p = _merge(params, diff_p, p_mask)
        x = jax.tree.unflatten(x_def, _merge(x_leaves, diff_x, x_mask))
        outputs, new_state, loss = pure(p, state, rng, x, training)
        return (outputs, loss), new_state

    return jax.vjp(f, _pick(params, p_mask), _pick(x_leaves, x_mask), has_aux=True)


def _cotangents(given: list, spec: tuple):
    """The cotangent of (outputs, loss): torch's gradients where it gave one, zeros (built in
    the compiled function, not per call) where it gave None. `spec`: (tree, per leaf None where
    given, else (shape, dtype))."""
    out_def, missing = spec
    it = iter(given)
    leaves = [next(it) if m is None else _zero(*m) for m in missing]
    return out_def.unflatten(leaves)


def _zero(shape, dtype):
    if _differentiable(dtype):
        return jnp.zeros(shape, dtype)
    return np.zeros(shape, jax.dtypes.float0)


def _forward(pure, params, state, rng, inputs, training, wrt):
    primals, vjp, new_state = _vjp(pure, params, state, rng, inputs, training, wrt)
    return primals, new_state, vjp


def _backward_of(vjp, given, spec):
    return vjp(_cotangents(given, spec))


def _recompute(pure, params, state, rng, inputs, given, training, wrt, spec):
    _, vjp, _ = _vjp(pure, params, state, rng, inputs, training, wrt)
    return vjp(_cotangents(given, spec))


class _Call:
    """One differentiated call's arguments and bookkeeping, shared by forward and backward."""

    __slots__ = (
        "avals",
        "host",
        "inputs",
        "out_def",
        "params",
        "program",
        "retain",
        "rng",
        "state",
        "tensors",
        "training",
        "wrt",
    )

    def __init__(self, program, views, rng, inputs, training, wrt, host, tensors):
        self.program, (self.params, self.state), self.rng = program, views, rng
        self.inputs, self.training, self.wrt, self.host = inputs, training, wrt, host
        self.tensors, self.retain = tensors, program.retains(training)
        self.out_def: Any = None  # the treedef of (outputs, loss), once forward has run
        self.avals: tuple[tuple[Any, Any], ...] = ()


class _JaxFunction(torch.autograd.Function):
    """The layer's call as one torch op over the tensors torch differentiates (`call.wrt`)."""

    @staticmethod
    def forward(ctx, call: _Call, *diff):
        ctx.set_materialize_grads(False)  # None, not zeros, for an output with no gradient
        program = call.program
        args = (call.params, call.state, call.rng, call.inputs)
        if call.retain:  # residuals are the computation's own buffers (jit copies inputs)
            primals, new_state, ctx.vjp = program.fwd(*args, training=call.training, wrt=call.wrt)
        else:
            outputs, new_state, loss = program.plain(*args, training=call.training)
            primals = (outputs, loss)
            _save_for_recompute(ctx, call, bool(new_state))
        flat, call.out_def = jax.tree.flatten(primals)
        if not call.host:
            jax.block_until_ready((flat, new_state))
        call.avals = tuple((x.shape, x.dtype) for x in flat)
        convert = _converter(call.host)
        outs = [convert(x) for x in flat]
        states = [convert(x) for x in new_state]
        ctx.mark_non_differentiable(
            *states, *(o for o, x in zip(outs, flat, strict=True) if not _differentiable(x.dtype))
        )
        ctx.call = call
        return (*outs, *states)

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, grads)


@torch.compiler.disable  # compiled backward graphs (jit_compile=True) must not trace into JAX
def _backward(ctx, grads):
    call, program = ctx.call, ctx.call.program
    owner = program.owner
    given, missing = [], []
    # The new state's grads (None: marked non-differentiable) come after the outputs'.
    for g, aval in zip(grads[: len(call.avals)], call.avals, strict=True):
        missing.append(None if g is not None else aval)
        if g is not None:
            given.append(_argument(g, owner, call.host))
    spec = (call.out_def, tuple(missing))
    if call.retain:
        g_params, g_inputs = program.bwd(ctx.vjp, given, spec=spec)
    else:
        ctx.saved_tensors  # noqa: B018 (torch raises if one was written in place since)
        program.recomputed = True
        g_params, g_inputs = program.recompute(
            call.params,
            call.state,
            call.rng,
            call.inputs,
            given,
            training=call.training,
            wrt=call.wrt,
            spec=spec,
        )
    convert = _converter(call.host)
    return (None, *(convert(g) for g in g_params), *(convert(g) for g in g_inputs))


def _save_for_recompute(ctx, call: _Call, writes_state: bool) -> None:
    """What a recomputing backward reads is the tensors' memory as it is then (the views share
    it): torch's saved-tensor check makes a backward after an in-place write to any of them
    fail as torch's own ops do, rather than differentiate at other values. State this call
    writes (the caller writes it into the tensors next) is copied instead."""
    params, state, inputs = call.tensors
    if writes_state:
        copies = [jnp.array(s, copy=True) for s in call.state]
        call.state, state = jax.block_until_ready(copies), []
    ctx.save_for_backward(*params, *state, *inputs)


def _torch_dtype(dtype) -> torch.dtype:
    return getattr(torch, np.dtype(dtype).name)


def _struct(tensor: torch.Tensor) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(tensor.shape), jnp.dtype(str(tensor.dtype).split(".")[-1]))


def _on_meta(tensors) -> bool:
    return any(t.is_meta for t in tensors)


class _Program:
    """The layer's compiled functions on the PyTorch backend; `run` is the bridge's call."""

    def __init__(self, pure: Callable, owner: str):
        self.pure, self.owner = pure, owner
        # Results come back as CPU arrays when JAX computes on CPU by default and every tensor
        # handed over is a CPU tensor: NumPy arguments then land on the same device as views.
        self.host = jax.default_backend() == "cpu"
        self.views = _Views(owner, self.host)
        self.plain = jax.jit(pure, static_argnames=("training",))
        self.fwd = jax.jit(functools.partial(_forward, pure), static_argnames=("training", "wrt"))
        self.bwd = jax.jit(_backward_of, static_argnames=("spec",))
        self.recompute = jax.jit(
            functools.partial(_recompute, pure), static_argnames=("training", "wrt", "spec")
        )
        self.recomputed = False

    def retains(self, training: bool) -> bool:
        """Whether a differentiated call keeps the vjp's residuals for its backward pass.

        A training call does (a backward pass follows). An inference call does only once an
        inference call's backward pass has run here: until then, an eager `layer(x)` outside
        `torch.no_grad()` computes no residuals it will most likely never use."""
        return training or self.recomputed

    def run(self, params, state, rng, inputs, training):
        flat_x, x_def = jax.tree.flatten(inputs)
        flat_x = [x if isinstance(x, torch.Tensor) else torch.as_tensor(x) for x in flat_x]
        if _on_meta(flat_x) or _on_meta(params) or (rng is not None and rng.is_meta):
            return self.symbolic(params, state, rng, jax.tree.unflatten(x_def, flat_x), training)
        if torch.jit.is_tracing():
            return _traced(
                self.plain, self.pure, self.owner, params, state, rng, flat_x, x_def, training
            )
        p_views = self.views(params)
        s_views = self.views(state, len(params))
        host = (
            self.host
            and not self.views.off_host
            and all(t.is_cpu for t in flat_x)
            and (rng is None or rng.is_cpu)
        )
        owner = self.owner
        x = jax.tree.unflatten(x_def, [_argument(t, owner, host) for t in flat_x])
        r = None if rng is None else _argument(rng, owner, host)
        if torch.is_grad_enabled():
            wrt = (tuple(t.requires_grad for t in params), tuple(t.requires_grad for t in flat_x))
            if any(wrt[0]) or any(wrt[1]):
                views = (p_views, s_views)
                return self._differentiated(params, state, flat_x, views, r, x, training, wrt, host)
        out = self.plain(p_views, s_views, r, x, training=training)
        if not host:
            jax.block_until_ready(out)
        return jax.tree.map(_converter(host), out)

    def _differentiated(self, params, state, flat_x, views, rng, x, training, wrt, host):
        diff = [*_pick(params, wrt[0]), *_pick(flat_x, wrt[1])]
        tensors = (params, state, flat_x)
        call = _Call(self, views, rng, x, training, wrt, host, tensors)
        outs = _JaxFunction.apply(call, *diff)
        n_out = call.out_def.num_leaves
        outputs, loss = call.out_def.unflatten(outs[:n_out])
        return outputs, list(outs[n_out:]), loss

    def symbolic(self, params, state, rng, inputs, training):
        """Keras's torch backend infers shapes by calling layers on "meta" tensors (no data)."""
        out = jax.eval_shape(
            lambda p, s, r, x: self.pure(p, s, r, x, training),
            [_struct(t) for t in params],
            [_struct(t) for t in state],
            None if rng is None else jax.ShapeDtypeStruct((2,), jnp.uint32),
            jax.tree.map(_struct, inputs),
        )
        return jax.tree.map(
            lambda s: torch.empty(s.shape, dtype=_torch_dtype(s.dtype), device="meta"), out
        )


def compile_torch(pure: Callable, owner: str) -> Callable:
    """`run(params, state, rng, inputs, training)` -> (outputs, new state leaves, summed loss).

    Under torch.compile (Keras's jit_compile=True), dynamo cannot trace into JAX: it runs the
    call as it is (already compiled by XLA) and compiles the torch code around it."""
    return torch.compiler.disable(_Program(pure, owner).run)


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
    """A placeholder that holds no memory whatever its shape: one zero seen at every index
    (stride 0). `fill_placeholder` gives the variable its own memory once the weights come."""
    return torch.zeros((), dtype=_torch_dtype(keras_dtype_name(dtype))).expand(tuple(shape))


def fill_placeholder(variable, value) -> None:
    """The value of a variable that holds `untouched_empty`: its parameter's data replaced
    (the parameter object stays the one Keras's torch module tracks); others assigned."""
    param = variable.value
    if param.numel() > 1 and not any(param.stride()):
        param.data = torch.as_tensor(np.array(value), dtype=param.dtype).to(param.device)
    else:
        variable.assign(value)


def keras_dtype_name(dtype) -> str:
    return str(dtype).split(".")[-1]
