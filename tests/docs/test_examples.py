"""Every script in examples/ runs with `--small` under the Keras backends listed for it.

The examples' subjects are each tested under every backend by their own test files; here each
script runs where it says it runs: the JAX ones in the jax session (`make demo` installs JAX
only), the mixed Keras model under every backend, the torch one under torch.

Each runs in its own process (as a user runs it), in a temporary working directory with
TMPDIR pointing there, and must exit with code 0: the scripts check their own claims
(accuracy, reloaded predictions, ...) and exit non-zero when one fails.
"""

import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# The 8 host devices conftest.py asks for are for the distribution tests, not the examples.
_CONFTEST_XLA_FLAG = "--xla_force_host_platform_device_count=8"

ALL = ("jax", "tensorflow", "torch")
# Script -> the backends whose session runs it (each script honours KERAS_BACKEND, except the
# torch one, which sets it).
SCRIPTS = {
    "demo.py": ("jax",),
    "finetune_cnn.py": ("jax",),
    "haiku_model.py": ("jax",),
    "lora_finetune.py": ("torch",),  # the shortest session; its subject is tested on all
    "mixed_functional.py": ALL,
    "nnx_transformer_torch.py": ("torch",),
    "sown_aux_loss.py": ("jax",),
    "vae_sampling.py": ("jax",),
}


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env["KERAS_BACKEND"] = keras.backend.backend()
    env["TMPDIR"] = str(tmp_path)
    env["PYTHONUNBUFFERED"] = "1"
    flags = env.get("XLA_FLAGS", "").replace(_CONFTEST_XLA_FLAG, "").strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return env


def _tail(text: str, limit: int = 6000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


def test_every_example_is_listed():
    assert {p.name for p in EXAMPLES.glob("*.py")} - set(SCRIPTS) == {
        # Two processes with gloo collectives; tests/distribution/test_multiprocess.py runs it.
        "multiprocess_data_parallel.py"
    }


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_runs_small(script, tmp_path):
    backends = SCRIPTS[script]
    if keras.backend.backend() not in backends:
        pytest.skip(f"{script} runs in the {', '.join(backends)} session(s)")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--small"],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        f"{script} --small exited with {result.returncode} "
        f"(KERAS_BACKEND={keras.backend.backend()})\n"
        f"--- stdout ---\n{_tail(result.stdout)}\n--- stderr ---\n{_tail(result.stderr)}"
    )
    assert "FAIL" not in result.stdout
