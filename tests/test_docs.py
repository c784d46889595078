"""The option table of docs/method.md is generated from the option dataclasses: it must not drift."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_option_table_is_current():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "update_option_table.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-500:]
