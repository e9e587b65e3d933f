"""What starting a process costs: a serving process (the app, and the command line that starts it)
imports neither scikit-learn nor what it brings (SciPy, pandas) nor the ONNX converter. They are
for training, converting and pulling, and cost about a second of CPU in every process that
imports them: the supervisor, each worker and each command."""

from __future__ import annotations

import subprocess
import sys

TRAINING_ONLY = ("sklearn", "scipy", "pandas", "skl2onnx")


def test_the_app_and_the_command_line_import_no_training_library() -> None:
    probe = (
        "import sys, api.app, api.cli\n"
        f"print(','.join(m for m in {TRAINING_ONLY!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "", result.stdout
