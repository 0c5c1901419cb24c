"""A layer's JAX computation as ONNX nodes, for the exporters that cannot read XLA.

On the JAX backend Keras exports ONNX with jax2onnx, which reads the layer's JAX code directly.
On TensorFlow (tf2onnx) and PyTorch (torch.onnx) the exporter sees the layer as one opaque
operation: an `XlaCallModule` op, a custom autograd function. The bridges hand such an
exporter the same computation converted by jax2onnx (`onnx_graph`), emitted node by node into
the exporter's own graph (`replay`) through a small `Emitter` each bridge writes.
"""

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np


class Emitter(Protocol):
    """Writes ONNX nodes into an exporter's graph; a handle is whatever that graph names a
    value by (a tf2onnx tensor name, a TorchScript value)."""

    def constant(self, array: np.ndarray) -> Any:
        """A handle of a constant tensor."""
        ...

    def node(
        self, op_type: str, inputs: Sequence[Any], attrs: dict, n_outputs: int, domain: str
    ) -> list:
        """Emits one node; returns the handles of its outputs."""
        ...


def onnx_graph(fun: Callable, structs: Sequence[Any], opset: int, owner: str) -> Any:
    """`fun` (flat arrays in, flat arrays out) as an `onnx.GraphProto` at `opset`.

    `structs` are `jax.ShapeDtypeStruct`s whose shapes may name symbolic dimensions (strings).
    Local functions are inlined: the exporter's graph receives plain nodes.
    """
    try:
        import jax2onnx
        import onnx.inliner
    except ImportError as e:
        raise ImportError(
            f"{owner}: exporting this layer to ONNX converts its JAX computation with "
            'jax2onnx, which is not installed. Install it with: pip install "flaxlayer[onnx]"'
        ) from e
    model = jax2onnx.to_onnx(fun, inputs=list(structs), opset=opset)
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    return model.graph


def replay(graph: Any, inputs: Sequence[Any], emit: Emitter, owner: str) -> list:
    """Emits `graph`'s nodes through `emit`, its inputs bound to `inputs` (handles, in order);
    returns the handles of its outputs."""
    from onnx import AttributeProto, helper, numpy_helper

    names = [i.name for i in graph.input]
    if len(names) != len(inputs):
        raise ValueError(
            f"{owner}: the ONNX graph of the layer takes {len(names)} inputs, but the "
            f"exporter's graph passes {len(inputs)}."
        )
    env = dict(zip(names, inputs, strict=True))
    for init in graph.initializer:
        env[init.name] = emit.constant(numpy_helper.to_array(init))
    for node in graph.node:
        if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
            raise NotImplementedError(
                f"{owner}: the layer's ONNX graph has a {node.op_type} node with a subgraph "
                "(control flow), which this exporter cannot take. Export on the JAX backend "
                "(KERAS_BACKEND=jax), whose ONNX exporter reads JAX code directly."
            )
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        args = [env[n] for n in node.input if n]
        outs = emit.node(node.op_type, args, attrs, len(node.output), node.domain)
        env.update(zip(node.output, outs, strict=True))
    return [env[o.name] for o in graph.output]
