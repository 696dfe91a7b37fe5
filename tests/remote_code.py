"""Runs code in a fresh interpreter where m2-hf cannot be imported: a saved folder's own code has to do the work."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path


def run_without_m2_hf(script: str, tmp_path: Path) -> None:
    """Run ``script`` (indented freely) offline, with its own remote-code module cache, and require it to finish."""
    code = (
        'import sys\nsys.modules["m2_hf"] = None  # m2-hf must not be importable\n'
        + textwrap.dedent(script)
        + '\nprint("remote code OK")\n'
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote code OK" in result.stdout
