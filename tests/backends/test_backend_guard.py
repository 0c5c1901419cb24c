"""Under a Keras backend flaxlayer has no bridge for, a clear error says which backends work."""

import os
import subprocess
import sys

SCRIPT = """
import flax.linen as nn
from flaxlayer import FlaxLayer, JaxLayer
for make in (lambda: FlaxLayer(nn.Dense(2)), lambda: JaxLayer(lambda inputs: inputs)):
    try:
        make()
    except Exception as e:
        print("ERROR:", type(e).__name__, e)
    else:
        print("NO ERROR")
"""


def test_unsupported_backend_gives_clear_error():
    env = dict(os.environ, KERAS_BACKEND="numpy")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(("ERROR", "NO"))]
    assert len(lines) == 2, result.stdout
    for line in lines:
        assert line.startswith("ERROR:"), line
        for backend in ("'jax'", "'tensorflow'", "'torch'", "'numpy'", "KERAS_BACKEND"):
            assert backend in line
    assert "FlaxLayer 'flax_layer'" in lines[0]
    assert "JaxLayer 'jax_layer'" in lines[1]
