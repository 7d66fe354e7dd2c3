"""The sampling-speed bench runs end to end on the tiny default model and reports what it claims."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sample_speed_bench_reports_every_row(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    cmd = [sys.executable, str(ROOT / "bench" / "sample_speed.py"), "--gen-length", "16"]
    cmd += ["--block-length", "8", "--prompt-length", "16", "--thresholds", "0.9,0.0", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    settings = rows.pop("settings")
    assert settings["gen_length"] == "16"
    names = list(rows)
    assert names[0].startswith("reference loop") and rows[names[0]]["speedup"] == 1.0
    assert len(names) == 2 + 2 * 3 + 1  # reference, low-confidence, 2 thresholds x (none, prefix, dual), AR
    # Threshold 0 takes a whole block per step: 2 NFE for 16 tokens in blocks of 8, without a cache.
    assert rows["engine threshold 0, no cache"]["nfe_per_token"] == 2 / 16
    # Greedy low-confidence decoding is the reference loop's: same tokens, same judge score.
    assert rows[names[1]]["judge_ppl"] == rows[names[0]]["judge_ppl"]
    assert rows["engine threshold 0.9, no cache"]["agreement"] == 1.0
    assert "target >= 3x" in proc.stdout and proc.stdout.count("| engine") == 7
