"""Promise 6 at CI size: the soak benchmark with an 80 MB object store spills and reconciles.

Slow (over a minute on two shared cores), so CI skips it; the full-size figures are in
docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_soak_with_a_small_object_store_spills_and_reconciles(tmp_path):
    figures = tmp_path / "soak.json"
    # Its own process: the soak starts a local Ray with its own small object store.
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--rows", "600", "--object-store-mb",
                    "80", "--work", str(tmp_path), "--json", str(figures)], check=True, cwd=ROOT, timeout=900,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = json.loads(figures.read_text())
    assert result["reconciles"] and result["rows"] == 600 and result["failed"] == 0
    assert result["spilled_mib"] > 0 and result["samples"] > 0
