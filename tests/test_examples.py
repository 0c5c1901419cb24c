"""Every script in examples/ runs with `--small` under the session's Keras backend.

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

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# The 8 host devices conftest.py asks for are for the distribution tests, not the examples.
_CONFTEST_XLA_FLAG = "--xla_force_host_platform_device_count=8"

# Script -> the only backend it runs under (None: any; it honours KERAS_BACKEND).
SCRIPTS = {
    "demo.py": None,
    "finetune_cnn.py": None,
    "haiku_model.py": None,
    "mixed_functional.py": None,
    "nnx_transformer_torch.py": "torch",
    "sown_aux_loss.py": None,
    "vae_sampling.py": None,
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
        # Two processes with gloo collectives; tests/test_multiprocess.py runs it.
        "multiprocess_data_parallel.py"
    }


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_runs_small(script, tmp_path):
    only = SCRIPTS[script]
    if only is not None and keras.backend.backend() != only:
        pytest.skip(f"{script} always uses the {only} backend; it runs in the {only} session")
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
