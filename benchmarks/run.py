"""flaxlayer's benchmark suite (`make bench`): ours vs keras.layers.FlaxLayer vs hand-written Flax.

Measures, side by side in one run:

(a) `fit` throughput, JAX backend: the seed's first example (a CNN, compute-bound) and a tiny MLP
    (overhead-bound), each with `steps_per_execution` 1 and 32, for `flaxlayer.FlaxLayer` and
    `keras.layers.FlaxLayer`, against a hand-written Flax + Optax loop with data already on
    device: one jitted step per batch (`optax/step`), and one jitted `lax.scan` over the epoch
    (`optax/scan`, the limit for an overhead-bound model);
(b) eager `layer(x)` latency on device arrays and on NumPy arrays, and `predict_on_batch`
    latency, on the benchmark MLP (6 blocks of Dense + BatchNorm, 64 wide) at batch 1, 32 and
    256, against the module's own `jax.jit(module.apply)` on the same inputs; at batch 1 and 32
    also an NNX FlaxLayer and a JaxLayer;
(c) build time and peak memory over 1 GiB of parameters (each build in a fresh process, see
    `build_memory.py`) against a plain `module.init`;
(d) the TensorFlow and PyTorch backends' `fit` step time for the CNN against the same CNN
    written in Keras's own layers on each backend (and both relative to JAX's), and their eager
    `layer(x)` latency on the benchmark MLP at batch 32.

Timing on a shared machine drifts, so every comparison is interleaved: each repeat times every
variant once, in alternating order (forward, then backward), and ratios are taken within a
repeat. Reported: the median over repeats with the min-max range. Variants live in long-running
worker processes (`worker.py`, one per Keras backend); each is compiled and warmed before the
first repeat, so no timing includes compilation. Data are synthetic (fixed seeds).

Targets (from the performance issue; the run exits 1 if one is missed):
  T1  eager `layer(x)` at batch 1 and 32 costs at most 2x `jax.jit(module.apply)` on the same
      inputs, device arrays and NumPy arrays (FlaxLayer on Linen and NNX, JaxLayer), with the
      same outputs; on the TensorFlow and PyTorch backends at most 3x (batch 32);
  T2  `fit` throughput at least keras.layers.FlaxLayer's on every workload, and at least 0.85x
      the hand-written per-step loop's on the CNN (`steps_per_execution` 1, Keras's default);
  T3  building over 1 GiB: peak memory at most 1.2x the param bytes, time at most a plain
      `module.init`'s;
  T4  the CNN's `fit` step on TensorFlow at most the same CNN in Keras's own layers' step there
      (1.0x), on PyTorch at most 1.1x.
"At least" / "at most" against an equal reference allow for measurement noise: the median ratio
may miss by up to NOISE (5%) and still pass (marked "within noise"): here, single timings of
identical code vary 0.88-1.17x, and medians of ours / keras.layers.FlaxLayer on the tiny MLP,
whose compiled steps are identical, varied 0.96-1.07x from run to run.

Usage: python benchmarks/run.py [--quick] [--only SECTIONS] [--repeats N] [--output PATH]
                                [--no-write]
Writes benchmarks/results.md and benchmarks/results.png (the chart needs matplotlib; without it
the chart is skipped with a message). `--quick` is a smoke test: small sizes, 2 repeats, and it
writes nothing unless --output is given.
"""

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import build_memory  # benchmarks/ is on sys.path: run.py runs as a script

HERE = Path(__file__).resolve().parent

NOISE = 0.05
EAGER_TARGET = 2.0
BACKEND_EAGER_TARGET = 3.0
OPTAX_TARGET = 0.85
BACKEND_TARGETS = {"tensorflow": 1.0, "torch": 1.1}  # step time vs Keras's own layers
MEMORY_TARGET = build_memory.TARGET_RATIO
SECTIONS = ("fit", "eager", "build", "backends")
SNIPPET = "results"  # the section of results.md that docs/performance.md includes
DOCS_CHART = HERE.parent / "docs" / "assets" / "results.png"
BACKENDS = ("jax", "tensorflow", "torch")
BACKEND_VARIANTS = ("ours/spe1", "native/spe1")
FIT_VARIANTS = ("ours/spe1", "keras/spe1", "ours/spe32", "keras/spe32", "optax/step", "optax/scan")
EAGER_VARIANTS = (
    "ours/call",
    "ours/callnp",
    "keras/call",
    "apply/jit",
    "apply/jitnp",
    "ours/predict",
    "keras/predict",
)
EAGER_EXTRA = ("nnx/call", "nnx/callnp", "jaxlayer/call", "jaxlayer/callnp")  # target batches
EAGER_TARGET_BATCHES = (1, 32)
BACKEND_EAGER_BATCH = 32
BUILD_CASES = ("flaxlayer", "init", "keras")

CONFIGS = {
    "full": {
        "repeats": 7,
        "fit": {
            "cnn": {"n": 4096, "batch": 32, "epochs": 2},
            # Overhead-bound: many more samples, so the fastest variant still runs ~0.1 s.
            "mlp": {"n": 32768, "batch": 32, "epochs": 4},
        },
        "backends": {"n": 4096, "batch": 32, "epochs": 1},
        "eager_batches": (1, 32, 256),
        "eager_budget": 0.2,
        "build_repeats": {"flaxlayer": 5, "init": 5, "keras": 5},
    },
    "quick": {
        "repeats": 2,
        "fit": {
            "cnn": {"n": 1024, "batch": 32, "epochs": 1},
            "mlp": {"n": 2048, "batch": 32, "epochs": 1},
        },
        "backends": {"n": 1024, "batch": 32, "epochs": 1},
        "eager_batches": (1, 32, 256),
        "eager_budget": 0.03,
        "build_repeats": {"flaxlayer": 1, "init": 1, "keras": 1},
    },
}

LABELS = {
    "ours": "flaxlayer.FlaxLayer",
    "keras": "keras.layers.FlaxLayer",
    "optax/step": "Flax + Optax, jitted step",
    "optax/scan": "Flax + Optax, lax.scan epoch",
    "apply/jit": "jax.jit(module.apply)",
    "apply/jitnp": "jax.jit(module.apply) on NumPy",
    "nnx": "flaxlayer.FlaxLayer (NNX)",
    "jaxlayer": "flaxlayer.JaxLayer",
    "flaxlayer": "flaxlayer.FlaxLayer",
    "init": "plain module.init",
    "native": "the CNN in Keras layers",
}


# ------------------------------------------------------------------------------------ workers


class WorkerError(RuntimeError):
    pass


class Worker:
    """A `worker.py` process for one Keras backend, driven over its stdin/stdout."""

    def __init__(self, backend: str, timeout: float = 900.0):
        self.backend, self.timeout = backend, timeout
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the worker
            mode="w+", prefix=f"flaxlayer-bench-{backend}-", suffix=".log", delete=False
        )
        env = dict(
            os.environ,
            KERAS_BACKEND=backend,
            JAX_PLATFORMS="cpu",
            TF_CPP_MIN_LOG_LEVEL="3",
            PYTHONUNBUFFERED="1",
        )
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "worker.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            cwd=str(HERE),
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def request(self, **message) -> dict:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise WorkerError(self._failure("timed out")) from None
            if line is None:
                raise WorkerError(self._failure(f"exited with code {self.proc.wait()}"))
            if line.startswith("RESULT "):
                reply = json.loads(line[len("RESULT ") :])
                if "error" in reply:
                    raise WorkerError(
                        self._failure(f"failed on {message}:\n{reply.get('traceback', '')}")
                    )
                return reply

    def _failure(self, what: str) -> str:
        self.log.flush()
        self.log.seek(0)
        tail = "".join(self.log.readlines()[-30:])
        return f"{self.backend} worker {what}\n--- its log ({self.log.name}), last lines:\n{tail}"

    def close(self):
        if self.proc.poll() is None:
            with contextlib.suppress(WorkerError):
                self.request(cmd="quit")
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


@dataclass
class Item:
    """One variant of one group in one worker, and the seconds of each repeat."""

    backend: str
    key: str
    variant: str
    seconds: list = field(default_factory=list)


@dataclass
class Stat:
    """A figure over the repeats: its median and min-max range."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, xs: list[float]) -> "Stat":
        return cls(statistics.median(xs), min(xs), max(xs))

    def fmt(self, spec: str = ".2f", unit: str = "") -> str:
        """The median, the min-max range where it is not a single value, then `unit`."""
        text = f"{self.median:{spec}}"
        if self.low != self.high:
            text += f" ({self.low:{spec}}-{self.high:{spec}})"
        return text + unit


# ------------------------------------------------------------------------------- measurement


def _eager_variants(batch: int) -> tuple:
    return EAGER_VARIANTS + (EAGER_EXTRA if batch in EAGER_TARGET_BATCHES else ())


def _setup_items(workers: dict, config: dict, sections: set) -> tuple[list, dict]:
    items, checks, versions = [], {}, {}

    def setup(backend, group, key, params, variants):
        t0 = time.perf_counter()
        reply = workers[backend].request(
            cmd="setup", group=group, key=key, params=params, variants=list(variants)
        )
        print(f"  set up {backend:<10} {key:<10} ({time.perf_counter() - t0:.0f} s)", flush=True)
        checks.update({(backend, key, k): v for k, v in reply["checks"].items()})
        versions[backend] = reply["versions"]
        items.extend(Item(backend, key, v) for v in variants)

    if "fit" in sections:
        for workload, params in config["fit"].items():
            setup("jax", "fit", f"fit/{workload}", {**params, "workload": workload}, FIT_VARIANTS)
    if "backends" in sections:
        params = {**config["backends"], "workload": "cnn"}
        eager = {"batch": BACKEND_EAGER_BATCH, "budget": config["eager_budget"]}
        for backend in BACKENDS:
            setup(backend, "fit", "backend/cnn", params, BACKEND_VARIANTS)
            variants = ("ours/call", "apply/jit") if backend == "jax" else ("ours/call",)
            setup(backend, "eager", "backend/eager", eager, variants)
    if "eager" in sections:
        for batch in config["eager_batches"]:
            params = {"batch": batch, "budget": config["eager_budget"]}
            setup("jax", "eager", f"eager/b{batch}", params, _eager_variants(batch))
    return items, {"checks": checks, "versions": versions}


def _measure_interleaved(workers: dict, items: list[Item], repeats: int) -> None:
    for r in range(repeats):
        order = items if r % 2 == 0 else items[::-1]
        t0 = time.perf_counter()
        for item in order:
            reply = workers[item.backend].request(cmd="measure", key=item.key, variant=item.variant)
            item.seconds.append(reply["seconds"])
        print(f"  repeat {r + 1}/{repeats} ({time.perf_counter() - t0:.0f} s)", flush=True)


def _measure_builds(config: dict) -> dict:
    counts = config["build_repeats"]
    runs: dict = {case: [] for case in BUILD_CASES}
    for r in range(max(counts.values())):
        cases = [c for c in BUILD_CASES if r < counts[c]]
        for case in cases if r % 2 == 0 else cases[::-1]:
            result = build_memory._run(case, "warm", sample=False)
            runs[case].append(result)
            print(
                f"  [{r + 1}] build {LABELS[case]:<22}: {result['seconds']:.1f} s, peak "
                f"{result['peak'] / build_memory.PARAM_BYTES:.2f}x param bytes",
                flush=True,
            )
    return runs


# -------------------------------------------------------------------------- results tables


def _variant_label(variant: str) -> str:
    kind, _, what = variant.partition("/")
    if variant in LABELS:
        return LABELS[variant]
    if what.startswith("spe"):
        return f"{LABELS[kind]}, steps_per_execution={what[3:]}"
    calls = {"call": "layer(x)", "callnp": "layer(x) on NumPy", "predict": "predict_on_batch"}
    return f"{LABELS[kind]} {calls[what]}"


#: A measured quantity: timed items as (backend, key, variant), each build of a case as
#: ("build", case, "seconds" or "peak"), or a constant.
Measure = tuple[str, str, str] | float


def _values(measure: Measure, items: list[Item], builds: dict):
    """A measure's value in each repeat (a constant's: the same in every repeat)."""
    if not isinstance(measure, tuple):
        return itertools.repeat(measure)
    source, key, what = measure
    if source == "build":
        return [run[what] for run in builds[key]]
    return next(i.seconds for i in items if (i.backend, i.key, i.variant) == measure)


def _ratios(numerator: Measure, denominator: Measure, items, builds, scale: float = 1) -> list:
    """`scale * numerator / denominator` in each repeat (builds: paired by repeat)."""
    num, den = _values(numerator, items, builds), _values(denominator, items, builds)
    return [scale * x / y for x, y in zip(num, den, strict=False)]


@dataclass(frozen=True)
class Column:
    """A results table's column: its header and alignment, and how its figures are shown."""

    header: str
    spec: str = ".2f"  # a figure's format, followed by `unit`
    unit: str = "x"
    scale: float = 1  # 1000: seconds to milliseconds
    chart: bool = False  # the chart draws this column's figures
    align: str = "---:"  # aligned right; LABEL: left


LABEL = "---"
# The report's tables as data: their columns. `table_rows` gives the results tables' rows, one
# cell per column ("backends eager" is the backends section's second table).
# fmt: off
GOAL_COLUMNS = (Column("target", align=LABEL), Column("measured (median, min-max)"),
                Column("goal"), Column("verdict", align=LABEL))
TABLES = {
    "fit": (Column("workload", align=LABEL), Column("variant", align=LABEL),
            Column("samples/s", ".0f", unit=""),
            Column("vs jitted Optax step", chart=True),
            Column("ours / keras")),
    "eager": (Column("batch"), Column("variant", align=LABEL),
              Column("latency (ms)", ".3f", unit="", scale=1000, chart=True),
              Column("vs jax.jit(module.apply)"),
              Column("keras / ours", ".1f")),
    "build": (Column("build", align=LABEL),
              Column("peak memory (x param bytes)", ".3f", chart=True),
              Column("time (s)", ".1f", unit=""),
              Column("time vs plain module.init", chart=True)),
    "backends": (Column("backend", align=LABEL),
                 Column("flaxlayer.FlaxLayer step (ms)", unit="", scale=1000),
                 Column("vs JAX", chart=True),
                 Column("the CNN in Keras layers step (ms)", unit="", scale=1000),
                 Column("vs JAX", chart=True),
                 Column("flaxlayer / Keras layers", chart=True)),
    "backends eager": (Column("backend", align=LABEL),
                       Column("flaxlayer.FlaxLayer layer(x) (ms)", ".3f", unit="", scale=1000),
                       Column("vs jax.jit(module.apply)", chart=True)),
}
# fmt: on


def _section(table: str) -> str:
    """The section a table of TABLES belongs to: its name's first word."""
    return table.split()[0]


def _jax_cells(key: str, variant: str, reference: str) -> tuple:
    """A JAX-worker variant, its reference, and the cell keras / ours (for ours only)."""
    item, keras = ("jax", key, variant), ("jax", key, variant.replace("ours", "keras"))
    ours = variant.startswith("ours/") and keras[2] in FIT_VARIANTS + EAGER_VARIANTS
    return item, ("jax", key, reference), (keras, item) if ours else None


def table_rows(config: dict) -> dict[str, dict]:
    """The rows of every table in TABLES, by row key, each one cell per column (see
    `results_table`). Pure data, measured nothing: the goals are cells of these rows."""
    rows: dict = {table: {} for table in TABLES}
    for w, params in config["fit"].items():
        label, samples = workloads_label(w, params), params["n"] * params["epochs"]
        for v in FIT_VARIANTS:
            item, ref, keras = _jax_cells(f"fit/{w}", v, "optax/step")
            rows["fit"][w, v] = (label, _variant_label(v), (samples, item), (ref, item), keras)
    for batch in config["eager_batches"]:
        for v in _eager_variants(batch):
            reference = "apply/jitnp" if v.endswith("np") else "apply/jit"
            item, ref, keras = _jax_cells(f"eager/b{batch}", v, reference)
            rows["eager"][batch, v] = (batch, _variant_label(v), (item, 1), (item, ref), keras)
    init, param_bytes = ("build", "init", "seconds"), build_memory.PARAM_BYTES
    for case in BUILD_CASES:
        peak, secs = ("build", case, "peak"), ("build", case, "seconds")
        rows["build"][case] = (LABELS[case], (peak, param_bytes), (secs, 1), (secs, init))

    params, apply_jit = config["backends"], ("jax", "backend/eager", "apply/jit")
    steps = (params["n"] // params["batch"]) * params["epochs"]
    jax_ours, jax_native = (("jax", "backend/cnn", v) for v in BACKEND_VARIANTS)
    for b in BACKENDS:
        ours, native = ((b, "backend/cnn", v) for v in BACKEND_VARIANTS)
        step_times = (ours, steps), (ours, jax_ours), (native, steps), (native, jax_native)
        rows["backends"][b] = (b, *step_times, (ours, native))
        call = (b, "backend/eager", "ours/call")
        rows["backends eager"][b] = (b, (call, 1), (call, apply_jit))
    return rows


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def results_table(columns: tuple, rows: dict, items, builds) -> tuple[list[str], dict]:
    """The one generic table writer: a markdown table of `columns` and `rows`. Each row (by
    key) gives one cell per column: a label, None (shown as "—"), or a figure: a ratio
    (numerator, denominator) of Measures, taken per repeat, times the column's `scale`, and
    summarised. Returns the table's lines and, by row key, the figures the chart draws."""
    lines = [_row(c.header for c in columns), _row(c.align for c in columns)]
    charted: dict = {}
    for key, cells in rows.items():
        texts, charted[key] = [], ()
        for column, cell in zip(columns, cells, strict=True):
            if not isinstance(cell, tuple):
                texts.append("—" if cell is None else str(cell))
                continue
            stat = Stat.of(_ratios(*cell, items, builds, column.scale))
            texts.append(stat.fmt(column.spec, column.unit))
            if column.chart:
                charted[key] += (stat,)
        lines.append(_row(texts))
    return lines, charted


# ---------------------------------------------------------------------------------- goals


@dataclass(frozen=True)
class Goal:
    """One row of the goals table: a results table's cell, the ratio (numerator, denominator)
    of two Measures taken per repeat, against `limit`. `stat`: the ratio, once measured."""

    name: str
    section: str
    ratio: tuple  # (numerator, denominator), two Measures
    limit: float
    at_most: bool  # True: the ratio must be <= limit; False: >= limit
    tolerance: float = 0.0  # a miss by less than this fraction passes "within noise"
    stat: Stat | None = None

    @property
    def verdict(self) -> str:
        v, lim = self.stat.median, self.limit
        if (v <= lim) if self.at_most else (v >= lim):
            return "PASS"
        loose = v <= lim * (1 + self.tolerance) if self.at_most else v >= lim * (1 - self.tolerance)
        return "PASS (within noise)" if loose else "FAIL"

    def cells(self) -> tuple:
        """Its row of the goals table: name, measured, goal, verdict."""
        op = "<=" if self.at_most else ">="
        spec = ".3f" if abs(self.stat.median - self.limit) < 0.01 else ".2f"
        return self.name, self.stat.fmt(spec, "x"), f"{op} {self.limit:g}x", self.verdict


def goals(config: dict, sections: set) -> list[Goal]:
    """The performance goals (from the performance issue), as data: each names its cell of
    `table_rows` by table, row key and column header (the first column of that header)."""
    rows, b, others = table_rows(config), BACKEND_EAGER_BATCH, BACKENDS[1:]
    eager_calls = [
        (batch, f"{kind}/{call}")
        for batch in EAGER_TARGET_BATCHES
        for kind in ("ours", "nnx", "jaxlayer")
        for call in ("call", "callnp")
    ]
    apply_jit = "vs jax.jit(module.apply)"
    fit_references = (  # ours / keras on every workload, ours / Optax on the CNN at spe 1
        ("keras", "ours / keras", 1.0, NOISE),
        ("jitted Optax step", "vs jitted Optax step", OPTAX_TARGET, 0.0),
    )

    def goal(name, table, key, header, limit, at_most=True, tolerance=0.0) -> Goal:
        column = [c.header for c in TABLES[table]].index(header)
        return Goal(name, _section(table), rows[table][key][column], limit, at_most, tolerance)

    # fmt: off
    table = [
        *[goal(f"T1 eager {_variant_label(v)}, batch {batch}: {apply_jit}", "eager",
               (batch, v), apply_jit, EAGER_TARGET) for batch, v in eager_calls],
        *[goal(f"T1 eager flaxlayer.FlaxLayer layer(x), batch {b}, {be} backend: {apply_jit}",
               "backends eager", be, apply_jit, BACKEND_EAGER_TARGET) for be in others],
        *[goal(f"T2 fit {w}, steps_per_execution={spe}: ours / {reference}", "fit",
               (w, f"ours/spe{spe}"), header, limit, False, tolerance)
          for w in config["fit"] for spe in ("1", "32")
          for reference, header, limit, tolerance in fit_references
          if reference == "keras" or (w, spe) == ("cnn", "1")],
        goal("T3 build peak memory / param bytes", "build", "flaxlayer",
             "peak memory (x param bytes)", MEMORY_TARGET),
        goal("T3 build time / plain module.init", "build", "flaxlayer",
             "time vs plain module.init", 1.0, tolerance=NOISE),
        *[goal(f"T4 fit cnn step time, {be}: ours / the CNN in Keras layers", "backends", be,
               "flaxlayer / Keras layers", BACKEND_TARGETS[be]) for be in others],
    ]
    # fmt: on
    return [g for g in table if g.section in sections]


def evaluate_goals(table: list[Goal], items: list[Item], builds: dict) -> list[Goal]:
    """The goals, each with its per-repeat ratio summarised as its `stat`."""
    return [replace(goal, stat=Stat.of(_ratios(*goal.ratio, items, builds))) for goal in table]


def analyse(items, builds, config, sections, meta) -> dict:
    """The results tables (markdown lines), the goals met or missed ("targets"), and by table
    the figures its chart columns give."""
    targets = evaluate_goals(goals(config, sections), items, builds)
    tables, figures = {}, {}
    for table, rows in table_rows(config).items():
        if _section(table) in sections:
            tables[table], figures[table] = results_table(TABLES[table], rows, items, builds)
    if "backends" in sections:
        tables["backends"] += [
            "",
            f"Eager `layer(x)` on the benchmark MLP, batch {BACKEND_EAGER_BATCH}, per backend "
            "(inputs are the backend's own tensors), against JAX's `jax.jit(module.apply)`:",
            "",
            *tables.pop("backends eager"),
        ]
    out = {"tables": tables, "targets": targets, "figures": figures}

    # Outputs of ours (every backend, layer(x) and predict_on_batch) vs jax.jit(module.apply).
    diffs = [v for (_, _, what), v in meta["checks"].items() if not what.startswith("keras/")]
    if diffs:
        out["identical"] = (max(diffs), max(diffs) <= 1e-5)
    return out


WORKLOADS = {"cnn": "CNN", "mlp": "tiny MLP"}


def workloads_label(workload: str, params: dict) -> str:
    return f"{WORKLOADS[workload]}, batch {params['batch']}"


TITLES = {
    "fit": "(a) `fit` throughput, JAX backend",
    "eager": "(b) Eager `layer(x)` and `predict_on_batch` latency (6-block Dense+BatchNorm MLP)",
    "build": "(c) Building over 1 GiB of params (each build in a fresh process)",
    "backends": "(d) TensorFlow and PyTorch backends vs JAX: CNN `fit` step, eager `layer(x)`",
}


def _machine(meta: dict) -> str:
    from workloads import cpu_name  # imports flax: only when writing the results

    mem = ""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem = f", {pages / 1024**3:.0f} GiB RAM"
    except (ValueError, OSError):
        pass
    versions = meta["versions"]  # JAX's packages, then TensorFlow's and PyTorch's own
    shown = [", ".join(f"{k} {v}" for k, v in versions.get("jax", {}).items() if k != "backend")]
    shown += [f"{b} {versions[b][b]}" for b in BACKENDS[1:] if b in versions]
    return (
        f"{cpu_name()}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}; {', '.join(shown)}; CPU only "
        f"(JAX_PLATFORMS=cpu)."
    )


def _summary_lines(analysis: dict) -> list[str]:
    rows = [t.cells() for t in analysis["targets"]]
    if "identical" in analysis:
        worst, ok = analysis["identical"]
        name = (
            "T1 outputs of ours (layer(x), predict_on_batch; every backend measured) vs "
            "jax.jit(module.apply), max abs diff"
        )
        rows.append((name, f"{worst:.1e}", "<= 1e-05", "PASS" if ok else "FAIL"))
    rows.sort(key=lambda cells: cells[0][:2])  # stable: by target
    lines, _ = results_table(GOAL_COLUMNS, dict(enumerate(rows)), [], {})  # labels only
    missed = sum(verdict == "FAIL" for *_, verdict in rows)
    return [
        *lines,
        "",
        f"{len(rows) - missed} of {len(rows)} goals met, {missed} missed (FAIL). `make bench` "
        "exits 1 when any goal is missed"
        + (", as it did for this run." if missed else "; it exited 0 for this run."),
    ]


def write_markdown(path: Path, chart: Path | None, analysis, config, sections, meta, args):
    text = [
        "# flaxlayer benchmarks",
        "",
        "Written by `benchmarks/run.py` (`make bench`); rerun it rather than edit.",
        "",
        f"Run {meta['started']} ({meta['elapsed'] / 60:.1f} min); machine: {_machine(meta)}",
        f"Load average (1 min) at start {meta['load'][0]:.2f}, at end {meta['load'][1]:.2f}.",
        "",
        # The docs' Performance page includes what lies between these markers (pymdownx
        # snippets); the chart link stays outside, since the page shows its own copy.
        f"<!-- --8<-- [start:{SNIPPET}] -->",
        f"Each timing is the median over {config['repeats']} interleaved repeats (min-max in "
        "parentheses); ratios are taken within a repeat, then summarised. Every variant is "
        "compiled and warmed before the first repeat. Synthetic data, fixed seeds.",
        "",
        "## Targets",
        "",
        *_summary_lines(analysis),
        "",
        f'"Within noise": missed by less than {NOISE:.0%} against an equal reference (single '
        "timings of identical code vary 0.88-1.17x on this machine; medians of the same "
        "comparison varied by about 5% from run to run).",
        "",
    ]
    notes = {
        "fit": (
            "Samples per second of `model.fit(x, y, shuffle=False)` (NumPy inputs, Adam, sparse "
            "categorical cross-entropy, no metrics) on a Sequential model holding the layer; the "
            "hand-written loops train the same module with `optax.adam` on batches already on "
            "device. "
            + "; ".join(
                f"{workloads_label(w, p)}: {p['n']} samples x {p['epochs']} epoch(s) per repeat"
                for w, p in config["fit"].items()
            )
            + ". Ratios are throughput ratios (higher is faster)."
        ),
        "eager": (
            "Latency of one call, waited for (`jax.block_until_ready`); `layer(x)` on a device "
            "array, `layer(x) on NumPy` and `predict_on_batch` on a NumPy array, each against "
            "`jax.jit(module.apply)` on the same kind of input (`predict_on_batch` against the "
            "device array's). Same variables in every variant "
            "(the NNX network is the same architecture with its own initial values)."
        ),
        "build": (
            f"{build_memory.N_LEAVES} float32 leaves of shape {build_memory.KERNEL_SHAPE} "
            f"({build_memory.PARAM_BYTES / 1024**3:.2f} GiB), `layer.build((1, 4096))` vs "
            "eager `module.init(key, x)`. Each build in a fresh process after a tiny warm-up "
            "build of the same kind; peak = the kernel's resident-memory high-water mark during "
            "the build minus resident memory before it. Repeats: "
            + ", ".join(f"{LABELS[c]} {n}" for c, n in config["build_repeats"].items())
            + "."
        ),
        "backends": (
            "The CNN's `fit` (steps_per_execution=1, batch "
            f"{config['backends']['batch']}, {config['backends']['n']} samples x "
            f"{config['backends']['epochs']} epoch(s) per repeat, Keras's default `jit_compile`) "
            "with flaxlayer.FlaxLayer, one worker process per Keras backend, interleaved. "
            "TensorFlow runs the module through jax2tf; PyTorch through DLPack and a "
            "`torch.autograd.Function` over `jax.vjp`. For reference, the same CNN written in "
            "Keras layers (Conv2D, AveragePooling2D, Flatten, Dense) on each backend: what the "
            "backend costs without any JAX module."
        ),
    }
    for section, lines in analysis["tables"].items():  # the sections that ran, in order
        text += [f"## {TITLES[section]}", "", notes[section], "", *lines, ""]
    text += [
        f"Command: `{' '.join(['python benchmarks/run.py', *args])}`",
        f"<!-- --8<-- [end:{SNIPPET}] -->",
        "",
    ]
    if chart is not None:
        text += [f"![benchmark chart]({chart.name})", ""]
    path.write_text("\n".join(text))


# Who each bar measures, by colour; every panel's legend names the colours it uses.
LIBRARY_COLORS = {
    "flaxlayer": ("tab:blue", "flaxlayer"),
    "keras": ("tab:orange", "keras.layers.FlaxLayer"),
    "reference": ("tab:green", "hand-written JAX / Flax reference"),
    "native": ("tab:gray", "the same model in Keras layers"),
}
VARIANT_LIBRARY = {  # by a variant's kind (before the "/"), or a build case
    **dict.fromkeys(("ours", "nnx", "jaxlayer", "flaxlayer"), "flaxlayer"),
    "keras": "keras",
    **dict.fromkeys(("optax", "apply", "init"), "reference"),
}


@dataclass
class Panel:
    """One chart panel, answering one question: bars (label, Stat, library) and goal lines
    (value, colour, line style, label)."""

    title: str
    xlabel: str
    bars: list
    lines: list = field(default_factory=list)
    log: bool = False


def _goal_line(limit: float) -> tuple:
    return (limit, "red", "--", f"goal: at most {limit}x")


def chart_panels(analysis: dict, sections: set) -> list[Panel]:
    """The chart's panels, one per question, for the sections that ran: their bars are the
    figures of the results tables' chart columns."""
    figures, panels = analysis["figures"], []

    def variant_bars(table: str, group_label) -> list:  # the optax/step bar is the fit's 1.0
        return [
            (f"{group_label(group)}: {_variant_label(v)}", stat, VARIANT_LIBRARY[v.split("/")[0]])
            for (group, v), (stat,) in figures[table].items()
            if v != "optax/step"
        ]

    if "fit" in sections:
        lines = [
            (1.0, "gray", "-", "the jitted Flax + Optax step"),
            (OPTAX_TARGET, "red", "--", f"goal on the CNN: {OPTAX_TARGET}x"),
        ]
        title = "fit throughput / a jitted Flax + Optax step's (higher is better)"
        xlabel = "throughput relative to the jitted step"
        panels.append(Panel(title, xlabel, variant_bars("fit", WORKLOADS.get), lines))
    if "eager" in sections:
        bars = variant_bars("eager", lambda batch: f"batch {batch}")
        title = "How fast is an eager call? Latency in ms (log scale; lower is better)"
        panels.append(Panel(title, "milliseconds per call", bars, log=True))
    if "build" in sections:
        questions = (
            ("peak memory / the params' bytes", MEMORY_TARGET, "peak memory / param bytes"),
            ("time / a plain module.init's", 1.0, "build time / plain module.init"),
        )
        for index, (what, goal, xlabel) in enumerate(questions):
            bars = [
                (LABELS[c], st[index], VARIANT_LIBRARY[c]) for c, st in figures["build"].items()
            ]
            title = f"Building over 1 GiB: {what} (lower is better)"
            panels.append(Panel(title, xlabel, bars, [_goal_line(goal)]))
    if "backends" in sections:
        kinds = (("flaxlayer.FlaxLayer", "flaxlayer"), ("the CNN in Keras layers", "native"))
        bars = [  # per backend, its two chart columns: ours and the CNN in Keras layers
            (f"{backend}: {what}", stat, library)
            for backend, stats in figures["backends"].items()
            for (what, library), stat in zip(kinds, stats[:2], strict=True)
        ]
        lines = [(1.0, "gray", "-", "JAX backend")]
        title = "Other backends: CNN fit step time / the JAX backend's (lower is better)"
        panels.append(Panel(title, "step time relative to JAX", bars, lines))
        bars = [
            (
                f"{backend}: flaxlayer.FlaxLayer (goal {BACKEND_TARGETS[backend]}x)",
                stats[2],
                "flaxlayer",
            )
            for backend, stats in figures["backends"].items()
            if backend in BACKEND_TARGETS
        ]
        lines = [(1.0, "gray", "-", "the CNN in Keras layers")]
        title = (
            "Other backends: CNN fit step time / the same CNN in Keras layers' (lower is better)"
        )
        panels.append(Panel(title, "step time relative to Keras layers", bars, lines))
        bars = [
            (f"{backend}: flaxlayer.FlaxLayer layer(x)", stat, "flaxlayer")
            for backend, (stat,) in figures["backends eager"].items()
        ]
        title = "Other backends: eager layer(x) / jax.jit(module.apply) (lower is better)"
        xlabel = "latency relative to jax.jit(module.apply)"
        panels.append(Panel(title, xlabel, bars, [_goal_line(BACKEND_EAGER_TARGET)]))
    return panels


def draw_chart(path: Path, analysis: dict, sections: set) -> bool:
    """One horizontal bar panel per question, stacked, labels on the bars' left: readable at
    the width of a page. Median bars with min-max whiskers."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        print("matplotlib is not installed: the chart is skipped (pip install matplotlib).")
        return False
    panels = chart_panels(analysis, sections)
    heights = [1.2 + 0.28 * len(p.bars) for p in panels]
    grid = {"height_ratios": heights}
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(12, sum(heights)), squeeze=False, gridspec_kw=grid
    )
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        labels, stats, libraries = zip(*panel.bars, strict=True)
        ys = list(range(len(labels)))[::-1]
        med = [st.median for st in stats]
        err = [[st.median - st.low for st in stats], [st.high - st.median for st in stats]]
        colors = [LIBRARY_COLORS[lib][0] for lib in libraries]
        ax.barh(ys, med, xerr=err, color=colors, capsize=3, height=0.7)
        ax.set_yticks(ys, labels, fontsize=9)
        if panel.log:
            ax.set_xscale("log")
        handles = [
            Patch(color=LIBRARY_COLORS[lib][0], label=LIBRARY_COLORS[lib][1])
            for lib in LIBRARY_COLORS
            if lib in libraries
        ]
        for value, color, style, label in panel.lines:
            handles.append(ax.axvline(value, color=color, ls=style, lw=1, label=label))
        ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(
        "flaxlayer benchmarks: median, whiskers min-max over interleaved repeats", fontsize=11
    )
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# -------------------------------------------------------------------------------------- main


def _arguments(argv) -> tuple[argparse.Namespace, set, dict, Path | None]:
    """The command line: its arguments, the sections, the run's config and the output file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: small, 2 repeats")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    parser.add_argument("--repeats", type=int, help="interleaved repeats (default 7, quick 2)")
    parser.add_argument("--output", type=Path, help="results markdown (default results.md)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    if not sections <= set(SECTIONS):
        parser.error(f"--only takes a subset of {SECTIONS}")
    config = dict(CONFIGS["quick" if args.quick else "full"])
    if args.repeats:
        config["repeats"] = args.repeats
    output = args.output or (None if args.quick else HERE / "results.md")
    return args, sections, config, None if args.no_write else output


def main(argv=None) -> int:
    args, sections, config, output = _arguments(argv)
    started = time.perf_counter()
    meta = {
        "started": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "load": [os.getloadavg()[0]],
        "checks": {},
        "versions": {},
    }
    print(
        f"flaxlayer benchmarks ({'quick' if args.quick else 'full'}): {', '.join(sorted(sections))}"
        f"; {config['repeats']} interleaved repeats; load average {meta['load'][0]:.2f}",
        flush=True,
    )
    items: list[Item] = []
    # Every section but the builds needs the JAX worker; the backends section, every backend's.
    needed = BACKENDS if "backends" in sections else ("jax",) if sections - {"build"} else ()
    workers = {}
    try:
        for backend in needed:
            workers[backend] = Worker(backend)
        if workers:
            print("Setting up (compiling and warming every variant):", flush=True)
            items, info = _setup_items(workers, config, sections)
            meta.update(info)
            print(f"Measuring {len(items)} variants, interleaved:", flush=True)
            _measure_interleaved(workers, items, config["repeats"])
    except WorkerError as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
        return 2
    finally:
        for worker in workers.values():
            worker.close()

    builds = {}
    if "build" in sections:
        print("Builds over 1 GiB of params, one fresh process each:", flush=True)
        builds = _measure_builds(config)
    meta["load"].append(os.getloadavg()[0])
    meta["elapsed"] = time.perf_counter() - started

    analysis = analyse(items, builds, config, sections, meta)
    for section, lines in analysis["tables"].items():
        print(f"\n{TITLES[section]}")
        print("\n".join(lines))
    print("\nTargets")
    print("\n".join(_summary_lines(analysis)))
    failed = [t.name for t in analysis["targets"] if t.verdict == "FAIL"]
    if "identical" in analysis and not analysis["identical"][1]:
        failed.append("T1 identical outputs")

    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        chart = output.with_suffix(".png")
        drawn = draw_chart(chart, analysis, sections)
        if drawn and output == HERE / "results.md":
            shutil.copyfile(chart, DOCS_CHART)  # the chart the docs' Performance page shows
        write_markdown(output, chart if drawn else None, analysis, config, sections, meta, argv)
        print(f"\nwrote {output}" + (f" and {chart}" if drawn else ""))
    total = len(analysis["targets"]) + ("identical" in analysis)
    print(
        f"\n{total - len(failed)} of {total} target(s) met, {len(failed)} missed"
        + (": " + "; ".join(failed) if failed else "")
        + f". ({meta['elapsed'] / 60:.1f} min, load average {meta['load'][0]:.2f} -> "
        f"{meta['load'][1]:.2f})"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
