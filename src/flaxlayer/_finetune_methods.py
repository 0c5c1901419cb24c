"""The fine-tuning methods every flaxlayer layer has: freeze, unfreeze, LoRA and int8, by
Flax path.

Only the public methods and their documentation live here; each checks its layer is built,
changes the layer's variables with a free function of `_finetune`, and has the layer compile a
new program. The engine knows fine-tuning only through the parameter-transform contract
(`_transforms`) its program applies.
"""

from collections.abc import Sequence
from typing import Any, Protocol

from flaxlayer import _finetune
from flaxlayer._store import LayerVariables, VariableFactory


class _Layer(Protocol):
    """What the methods below use of the layer."""

    def _owner_name(self) -> str: ...

    def _built_variables(self, what: str) -> LayerVariables: ...

    def _factory(self) -> VariableFactory: ...

    def _compile(self) -> None: ...


class FineTuningMethods:
    """`freeze`, `unfreeze`, `enable_lora`, `merge_lora` and `quantize` (on `JaxLayer`)."""

    def freeze(self: _Layer, paths: str | Sequence[str]) -> None:
        """Makes the params matching `paths` non-trainable (their values never change in `fit`).

        Args:
            paths: A regex, or a list of them, each matching whole Flax paths as
                `layer.describe()` shows them (`r"params/backbone/.*"`; NNX: `r"encoder/.*"`).

        Raises:
            ValueError: if the layer is not built, or a pattern matches no param.

        Call `model.compile(...)` after it, as after setting `trainable` on a Keras layer.

        >>> import flax.linen as nn
        >>> from flaxlayer import FlaxLayer
        >>> layer = FlaxLayer(nn.Dense(3))
        >>> layer.build((None, 4))
        >>> layer.freeze(r"params/kernel")
        >>> [w.path for w in layer.trainable_weights]
        ['flax_layer/params/bias']
        """
        _set_trainable(self, paths, False, "freeze")

    def unfreeze(self: _Layer, paths: str | Sequence[str]) -> None:
        """Makes the float params matching `paths` trainable again (see `freeze`).

        >>> import flax.linen as nn
        >>> from flaxlayer import FlaxLayer
        >>> layer = FlaxLayer(nn.Dense(3))
        >>> layer.build((None, 4))
        >>> layer.freeze(r"params/.*")
        >>> layer.unfreeze(r"params/bias")
        >>> [w.path for w in layer.trainable_weights]
        ['flax_layer/params/bias']
        """
        _set_trainable(self, paths, True, "unfreeze")

    def enable_lora(
        self: _Layer,
        rank: int,
        paths: str | Sequence[str] | None = None,
        alpha: float | None = None,
        a_initializer: Any = "he_uniform",
        b_initializer: Any = "zeros",
    ) -> None:
        """Freezes the selected kernels and trains a low-rank update of each instead.

        Each kernel gets two trainable variables, `<layer>/lora/<flax path>/a` and `.../b`,
        and the module sees `kernel + (a @ b).reshape(kernel.shape) * alpha / rank` (an N-D
        kernel as `(prod(all but last), last)`). `b` starts at zero: outputs are unchanged
        until training. Named after Keras's `Dense.enable_lora`; call `model.compile` after.

        Args:
            rank: The rank of the update, from 1 to the kernel's smaller side.
            paths: Regexes over the paths of `layer.describe()`; default: every float param
                of rank >= 2 whose path ends in `kernel` and whose smaller side is >= `rank`.
            alpha: Scale of the update (`alpha / rank`); default `rank`.
            a_initializer: Keras initializer of `a`.
            b_initializer: Keras initializer of `b`.

        Raises:
            ValueError: if the layer is not built, LoRA is already on a selected kernel, a
                selected param is not a float array of rank >= 2, or `rank` is out of range.

        >>> import flax.linen as nn
        >>> from flaxlayer import FlaxLayer
        >>> layer = FlaxLayer(nn.Dense(8))
        >>> layer.build((None, 16))
        >>> layer.enable_lora(2)
        >>> [(w.path, tuple(w.shape)) for w in layer.trainable_weights]
        [('flax_layer/params/bias', (8,)), ('flax_layer/lora/params/kernel/a', (16, 2)), \
('flax_layer/lora/params/kernel/b', (2, 8))]
        """
        store = self._built_variables("enable_lora")
        inits = (a_initializer, b_initializer)
        _finetune.enable_lora(store, self._factory(), rank, paths, alpha, inits)
        self._compile()

    def merge_lora(self: _Layer) -> None:
        """Folds every LoRA update into its kernel and removes the adapters; the kernels get
        back the trainability they had (outputs unchanged up to rounding; an int8 kernel is
        quantized again).

        >>> import flax.linen as nn
        >>> from flaxlayer import FlaxLayer
        >>> layer = FlaxLayer(nn.Dense(8))
        >>> layer.build((None, 16))
        >>> layer.enable_lora(2)
        >>> layer.merge_lora()
        >>> len(layer.weights)
        2
        """
        _finetune.merge_lora(self._built_variables("merge_lora"), self._factory())
        self._compile()

    def quantize(self: _Layer, mode=None, type_check=True, config=None, paths=None) -> None:
        """Stores the selected kernels as int8 with a float32 scale per output channel.

        Keras's `model.quantize("int8")` calls this on every layer. The module sees
        `int8 * scale` in the kernel's dtype (weight-only: inputs stay float); a kernel with
        LoRA is merged first. The `.keras` file holds the int8 values.

        Args:
            mode: `"int8"`, the one mode supported.
            type_check: Accepted for Keras's `model.quantize`; unused.
            config: A `keras.quantizers.Int8QuantizationConfig` or None; only its mode is used.
            paths: Regexes over the paths of `layer.describe()`; default: every float param of
                rank >= 2 whose path ends in `kernel`.

        Raises:
            NotImplementedError: for another mode.
            ValueError: if the layer is not built or a selected kernel is already int8.

        >>> import flax.linen as nn
        >>> from flaxlayer import FlaxLayer
        >>> layer = FlaxLayer(nn.Dense(8))
        >>> layer.build((None, 16))
        >>> layer.quantize("int8")
        >>> [(w.path, w.dtype) for w in layer.weights]
        [('flax_layer/params/bias', 'float32'), ('flax_layer/params/kernel', 'int8'), \
('flax_layer/int8/params/kernel/scale', 'float32')]
        """
        _finetune.check_quantize_mode(self._owner_name(), mode, config)
        _finetune.quantize(self._built_variables("quantize"), self._factory(), paths)
        self._compile()


def _set_trainable(layer: _Layer, paths: Any, trainable: bool, what: str) -> None:
    _finetune.require_paths(layer._owner_name(), paths, what)
    store = layer._built_variables(what)
    _finetune.set_trainable(store, layer._owner_name(), paths, trainable, what)
