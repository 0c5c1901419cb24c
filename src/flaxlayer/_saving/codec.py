"""The contract each module kind (Linen, NNX) implements to be saved and loaded."""

import abc
from collections.abc import Mapping
from typing import Any, ClassVar

from flaxlayer._saving.schema import Keys


class KindCodec(abc.ABC):
    """What one module kind (Linen, NNX) writes of its own objects, and how it reads them back.

    Each adapter module defines one; `Encoder` and `Decoder` ask the codecs they are given for
    every value and entry kind they do not handle themselves. A codec is made per `Encoder` or
    `Decoder` (it may keep state across one file, such as the NNX node ids seen) and uses the
    public methods of the coder it is given: `value`, `class_ref`, `fields` when saving;
    `check`, `check_class`, `check_fields`, `check_declared`, `value`, `construct`, `fail`
    when loading. Loading checks an entry completely (`check`, nothing constructed) before
    `decode` builds it.
    """

    #: The entry kinds this codec writes, with their keys (see `schema`).
    entries: ClassVar[Mapping[str, Keys]]
    #: Classes whose subclasses may be written as a class (a field holding a module class).
    class_bases: ClassVar[tuple[type, ...]]
    #: The module base class: what a `type[M]` or `Callable[..., M]` field may be bound to.
    module_base: ClassVar[type]

    def __init__(self, coder: Any):
        self.coder = coder

    @classmethod
    @abc.abstractmethod
    def encodes(cls, value: Any) -> bool:
        """Whether `value` is an object of this kind (a module, a graph node, a variable)."""

    @abc.abstractmethod
    def encode(self, value: Any, where: str) -> dict:
        """The entry for `value` (`where` names the field, for messages)."""

    @abc.abstractmethod
    def check(self, data: dict, path: tuple, depth: int, declared: Any) -> None:
        """Checks an entry of one of `entries` (keys already checked) without building it."""

    @abc.abstractmethod
    def decode(self, data: dict, path: tuple) -> Any:
        """Builds a checked entry."""

    def finish_check(self) -> None:  # noqa: B027 (most kinds have nothing to add)
        """Checks what only the whole file shows, after every entry is checked."""
