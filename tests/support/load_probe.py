"""What a child process that loads untrusted files watches: the process-wide settings a load
must not change (observed, snapshotted and restored between files), calls of Flax API methods
a file might name, and peak resident memory (reset per file through /proc's clear_refs).

Imported by the loading children of the attack tests (attack_kit.CHILD) and of the fuzz test
(fuzz_child.py); it imports nothing heavy until a function runs.
"""

JAX_FLAGS = ("jax_enable_x64", "jax_debug_nans", "jax_disable_jit")


def observe():
    """Process-wide settings a load must not change."""
    import flax.core.spmd as spmd
    import flax.serialization as serialization
    import jax
    import numpy as np
    from flax.linen import module as linen_module
    from flax.nnx import pytreelib, variablelib

    return {
        "numpy print options": {k: repr(v) for k, v in np.get_printoptions().items()},
        "NNX variable-type registry": {
            k: repr(v) for k, v in variablelib.VariableTypeCache.items()
        },
        "NNX data-type registry": sorted(repr(t) for t in pytreelib.DATA_REGISTRY),
        "Flax state-dict registry": sorted(repr(t) for t in serialization._STATE_DICT_REGISTRY),
        "Linen named_call": repr(linen_module._use_named_call),
        "logical axis rules": repr(spmd._axis_rules.rules),
        "jax.config": {k: repr(getattr(jax.config, k)) for k in JAX_FLAGS},
    }


def snapshot():
    import flax.core.spmd as spmd
    import flax.serialization as serialization
    import jax
    import numpy as np
    from flax.linen import module as linen_module
    from flax.nnx import pytreelib, variablelib

    return (
        np.get_printoptions(),
        dict(variablelib.VariableTypeCache),
        set(pytreelib.DATA_REGISTRY),
        dict(serialization._STATE_DICT_REGISTRY),
        linen_module._use_named_call,
        spmd._axis_rules.rules,
        {k: getattr(jax.config, k) for k in JAX_FLAGS},
    )


def restore(snapshot):
    """Undoes what an attack changed, so that the next file starts from the same state."""
    import flax.core.spmd as spmd
    import flax.serialization as serialization
    import jax
    import numpy as np
    from flax.linen import module as linen_module
    from flax.nnx import pytreelib, variablelib

    printoptions, names, data, registry, named_call, rules, config = snapshot
    np.set_printoptions(**printoptions)
    variablelib.VariableTypeCache.clear()
    variablelib.VariableTypeCache.update(names)
    pytreelib.DATA_REGISTRY.clear()
    pytreelib.DATA_REGISTRY.update(data)
    serialization._STATE_DICT_REGISTRY.clear()
    serialization._STATE_DICT_REGISTRY.update(registry)
    linen_module._use_named_call = named_call
    spmd._axis_rules.rules = rules
    for k, v in config.items():
        if getattr(jax.config, k) != v:
            jax.config.update(k, v)


API_CALLS = []


def monitor_flax_api():
    """Records calls of Flax API methods a file might name as the layer's `method`."""
    import functools

    import flax.linen as nn
    from flax import nnx

    for owner, names in (
        (nn.Module, ("tabulate", "bind", "sow")),
        (nnx.Module, ("sow", "perturb")),
    ):
        for name in names:
            original = getattr(owner, name)

            def wrapper(*args, __original=original, __name=f"{owner.__module__}.{name}", **kw):
                API_CALLS.append(__name)
                return __original(*args, **kw)

            setattr(owner, name, functools.wraps(original)(wrapper))


def status_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_kib():
    import resource

    peak = status_kib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
