"""Where a layer is between construction and real values: one phase, assigned only here.

A layer made by a user is `FRESH` for its whole life: its build computes real values. A layer
rebuilt from a `.keras` config is `CONFIGURED` right after its construction; its build creates
variables without values (`DEFERRED`), sized by the file, so that nothing the file names is
allocated before the weights file confirms it. The weights then fill them (`FILLED`). Two
detours: Keras reads variables of a model it is still loading on TensorFlow and PyTorch, which
get placeholders that hold no memory (`PLACEHOLDERS`); and a layer used before any weights came
gets its initial values, as a fresh build would have made them (`FILLED` too).

    FRESH                                   (a user's layer stays so)
      |  from_config
    CONFIGURED --build--> DEFERRED --weights / set_weights / first use--> FILLED
                              |                                              ^
                              +--read while Keras loads--> PLACEHOLDERS -----+
"""

import enum


class Phase(enum.Enum):
    """The phase of a layer's values."""

    #: Made by a user: built from the module's init or the values given.
    FRESH = "fresh"
    #: Made by `from_config`: not built yet; its build allocates nothing the file sizes.
    CONFIGURED = "configured from a file"
    #: Built from a config: variables exist without values.
    DEFERRED = "variables deferred"
    #: Built from a config, its variables read by Keras while loading: placeholders.
    PLACEHOLDERS = "placeholders"
    #: Built from a config, its variables then given values (a weights file, `set_weights`,
    #: or the initial values of a first use).
    FILLED = "filled"


#: Each phase's next phases.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.FRESH: frozenset({Phase.CONFIGURED}),
    Phase.CONFIGURED: frozenset({Phase.DEFERRED}),
    Phase.DEFERRED: frozenset({Phase.PLACEHOLDERS, Phase.FILLED}),
    Phase.PLACEHOLDERS: frozenset({Phase.FILLED}),
    Phase.FILLED: frozenset(),
}


class Lifecycle:
    """The phase of one layer; every change goes through `move_to`, checked against
    `TRANSITIONS` (a wrong order is a bug in flaxlayer, never a user's error)."""

    __slots__ = ("has_values", "phase")

    def __init__(self) -> None:
        self.phase = Phase.FRESH
        #: The variables hold real values (neither absent nor placeholders): read by every
        #: eager call, so kept as a plain attribute next to the phase it follows.
        self.has_values = True

    def move_to(self, phase: Phase) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise RuntimeError(
                f"flaxlayer internal error: a layer cannot go from {self.phase.value!r} to "
                f"{phase.value!r}. Please report this with the code that led here."
            )
        self.phase = phase
        self.has_values = phase in (Phase.FRESH, Phase.FILLED)

    @property
    def from_file(self) -> bool:
        """Rebuilt from a config and still waiting for its values: errors while building or
        applying the module are the file's (a SerializationError)."""
        return self.phase in (Phase.CONFIGURED, Phase.DEFERRED, Phase.PLACEHOLDERS)

    @property
    def awaits_values(self) -> bool:
        """Built from a config, without real values yet (deferred or placeholders)."""
        return self.phase in (Phase.DEFERRED, Phase.PLACEHOLDERS)
