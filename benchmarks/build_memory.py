"""Peak memory while building a layer over 1 GiB of float32 params.

A Linen module with 64 bias-free Dense(1024) layers over a (1, 4096) input holds 64 kernels of
shape (4096, 1024): 16 MiB each, 1 GiB in all. Activations are (1, 1024): negligible. Three
ways of getting those params into memory are compared:

- `flaxlayer.FlaxLayer`: the layer built with `layer.build((1, 4096))`;
- `keras.layers.FlaxLayer`: the same with Keras's own layer (the reference to beat);
- plain `module.init`: eager `module.init(key, x)`, no Keras at all (the floor).

Every measurement runs in its own fresh Python process (memory freed in one is not reliably
returned to the OS, so no measurement may follow another in the same process). The process
imports everything, starts the XLA CPU client, reads its resident memory (the baseline),
builds, and reports the peak resident memory minus that baseline. The peak is the kernel's
high-water mark (VmHWM in /proc/self/status, reset by writing "5" to /proc/self/clear_refs just
before building); a thread sampling RSS every millisecond gives a second reading (the only one
where the reset is refused). Two modes:

- `warm`: a tiny build of the same kind (same class, a 2-leaf module) runs before the baseline,
  so only what grows with the params is measured. The target applies to this mode.
- `first`: the big build is the first in the process, so one-time costs count too (for
  `keras.layers.FlaxLayer` that includes importing and starting TensorFlow, ~0.45 GiB here).

The glibc allocator makes single readings vary by about +-0.07x from run to run, so each
(case, mode) is measured `--repeats` times (default 3) and the median is reported.

Goal (from the issue): flaxlayer's warm peak at most 1.2x the param bytes. The script prints
a table, writes `benchmarks/results_build_memory.md` and exits non-zero if the median warm
peak of flaxlayer exceeds 1.2x.

Usage: python benchmarks/build_memory.py [--repeats N] [--no-write]
(JAX_PLATFORMS=cpu and KERAS_BACKEND=jax are set for the measuring processes.)
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

N_LEAVES = 64
KERNEL_SHAPE = (4096, 1024)  # float32: 16 MiB per leaf
PARAM_BYTES = N_LEAVES * KERNEL_SHAPE[0] * KERNEL_SHAPE[1] * 4  # 1 GiB
INPUT_SHAPE = (1, KERNEL_SHAPE[0])
TARGET_RATIO = 1.2
GIB = 1024**3

CASES = {
    "flaxlayer": "flaxlayer.FlaxLayer",
    "keras": "keras.layers.FlaxLayer",
    "init": "plain eager module.init",
}
MODES = ("warm", "first")
RESULTS = Path(__file__).with_name("results_build_memory.md")


# ----------------------------------------------------------------------- in a measuring process


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") * 1024 <= _rss_bytes() + (1 << 20)


class _Sampler(threading.Thread):
    """Samples RSS every `interval` seconds, keeping the maximum."""

    def __init__(self, interval: float = 0.001):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = _rss_bytes()
        self._done = threading.Event()

    def run(self):
        while not self._done.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def finish(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, _rss_bytes())
        return self.peak


def _measure(case: str, mode: str, sample: bool = True) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import keras

    import flaxlayer

    class Wide(nn.Module):
        """`n` bias-free Dense layers side by side: n kernels, tiny activations."""

        n: int = N_LEAVES
        features: int = KERNEL_SHAPE[1]

        @nn.compact
        def __call__(self, inputs):
            out = 0.0
            for i in range(self.n):
                out = out + nn.Dense(self.features, use_bias=False, name=f"dense_{i}")(inputs)
            return out

    def build_flaxlayer(module, input_shape):
        layer = flaxlayer.FlaxLayer(module)
        layer.build(input_shape)
        return [v.value for v in layer.weights], layer

    def build_keras(module, input_shape):
        layer = keras.layers.FlaxLayer(module)
        layer.build(input_shape)
        return [v.value for v in layer.weights], layer

    def build_init(module, input_shape):
        variables = module.init(jax.random.key(0), jnp.zeros(input_shape, jnp.float32))
        return jax.tree.leaves(variables), variables

    build = {"flaxlayer": build_flaxlayer, "keras": build_keras, "init": build_init}[case]

    # Any JAX program has the XLA CPU client running: start it before the baseline.
    jax.block_until_ready(jnp.zeros(()) + 1)
    if mode == "warm":
        jax.block_until_ready(build(Wide(n=2, features=8), (1, 8))[0])

    baseline = _rss_bytes()
    hwm_ok = _reset_peak()
    # Without `sample` (for timing: the sampling thread takes the GIL every millisecond), the
    # kernel's high-water mark alone gives the peak; the sampler still runs where it cannot.
    sampler = _Sampler() if sample or not hwm_ok else None
    if sampler is not None:
        sampler.start()
    start = time.perf_counter()
    arrays, keep = build(Wide(), INPUT_SHAPE)
    jax.block_until_ready(arrays)
    seconds = time.perf_counter() - start
    sampled_peak = sampler.finish() if sampler is not None else None
    hwm_peak = _status_kib("VmHWM") * 1024
    after = _rss_bytes()

    total = sum(int(a.size) * a.dtype.itemsize for a in arrays)
    if total != PARAM_BYTES or len(arrays) != N_LEAVES:
        raise RuntimeError(f"{case}: built {len(arrays)} leaves, {total} bytes; expected more")
    del keep
    return {
        "case": case,
        "mode": mode,
        "peak": (hwm_peak if hwm_ok else sampled_peak) - baseline,
        "sampled_peak": None if sampled_peak is None else sampled_peak - baseline,
        "kept": after - baseline,
        "peak_source": "VmHWM" if hwm_ok else "sampled RSS",
        "seconds": seconds,
        "versions": {
            "jax": jax.__version__,
            "flax": _version("flax"),
            "keras": keras.__version__,
            "flaxlayer": flaxlayer.__version__,
        },
    }


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


# -------------------------------------------------------------------------- in the main process


def _run(case: str, mode: str, sample: bool = True) -> dict:
    """Measures one build in a fresh process (`benchmarks/run.py` calls this too)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, __file__, "--measure", case, mode, *([] if sample else ["--no-sample"])],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{CASES[case]} ({mode}): the measuring process failed.")
    return json.loads(lines[-1][len("RESULT ") :])


def _ratio(x: float) -> str:
    return f"{x / PARAM_BYTES:.2f}x"


def _table(summary: dict) -> list[str]:
    rows = [
        "| build | warm peak | warm peak range | first-build peak | kept after build "
        "| warm time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case, label in CASES.items():
        warm, first = summary[case, "warm"], summary[case, "first"]
        rows.append(
            f"| {label} | {_ratio(warm['peak'])} ({warm['peak'] / GIB:.2f} GiB) "
            f"| {_ratio(warm['min'])}-{_ratio(warm['max'])} "
            f"| {_ratio(first['peak'])} ({first['peak'] / GIB:.2f} GiB) "
            f"| {_ratio(warm['kept'])} | {warm['seconds']:.1f} |"
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", nargs=2, metavar=("CASE", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--no-sample", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help="processes per (case, mode)")
    parser.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS.name}")
    args = parser.parse_args(argv)

    if args.measure:
        case, mode = args.measure
        if case not in CASES or mode not in MODES:
            parser.error(f"--measure takes one of {sorted(CASES)} and one of {MODES}")
        print("RESULT " + json.dumps(_measure(case, mode, not args.no_sample)), flush=True)
        return 0

    print(
        f"Building {N_LEAVES} float32 leaves of shape {KERNEL_SHAPE} "
        f"({PARAM_BYTES / GIB:.2f} GiB of params); {args.repeats} fresh process(es) per "
        "build and mode, interleaved. Peak = peak RSS during the build minus RSS before it."
    )
    runs: dict = {(case, mode): [] for case in CASES for mode in MODES}
    for i in range(args.repeats):
        for mode in MODES:
            for case in CASES:
                r = _run(case, mode)
                runs[case, mode].append(r)
                print(
                    f"  [{i + 1}/{args.repeats}] {CASES[case]:<24} {mode:<5}: peak "
                    f"{_ratio(r['peak'])} (sampled {_ratio(r['sampled_peak'])}), kept "
                    f"{_ratio(r['kept'])}, {r['seconds']:.1f} s",
                    flush=True,
                )

    summary = {}
    for key, rs in runs.items():
        summary[key] = {
            "peak": statistics.median(r["peak"] for r in rs),
            "min": min(r["peak"] for r in rs),
            "max": max(r["peak"] for r in rs),
            "kept": statistics.median(r["kept"] for r in rs),
            "seconds": statistics.median(r["seconds"] for r in rs),
        }
    table = _table(summary)
    print()
    print("\n".join(table))
    ours = summary["flaxlayer", "warm"]["peak"] / PARAM_BYTES
    ok = ours <= TARGET_RATIO
    verdict = (
        f"flaxlayer.FlaxLayer: median warm peak {ours:.2f}x the param bytes, "
        f"{'within' if ok else 'OVER'} the {TARGET_RATIO}x target."
    )
    print()
    print(verdict)

    if not args.no_write:
        first = next(iter(runs.values()))[0]
        versions = ", ".join(f"{k} {v}" for k, v in first["versions"].items())
        text = [
            "# Peak memory while building over 1 GiB of params",
            "",
            "Written by `benchmarks/build_memory.py` (`make bench`); rerun it rather than edit.",
            "",
            f"{N_LEAVES} float32 leaves of shape {KERNEL_SHAPE} ({PARAM_BYTES / GIB:.2f} GiB) "
            f"built for a {INPUT_SHAPE} input. Each number is the median of {args.repeats} "
            "fresh processes: peak resident memory during the build "
            f"({first['peak_source']}) minus resident memory just before it, as a multiple "
            "of the param bytes. *Warm*: a tiny build of the same kind ran first, so one-time "
            "costs are excluded (the 1.2x target applies here). *First build*: the big build "
            "is the first in the process (for `keras.layers.FlaxLayer` this includes starting "
            "TensorFlow). *Kept*: resident memory left after the build (warm).",
            "",
            *table,
            "",
            verdict,
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}; {versions}; JAX_PLATFORMS=cpu.",
            "",
        ]
        RESULTS.write_text("\n".join(text))
        print(f"wrote {RESULTS}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
