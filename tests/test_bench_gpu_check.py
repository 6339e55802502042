"""`scripts/bench.py --gpu-check`'s code path, on CPU with tiny shapes (the hidden
``--gpu-check-smoke`` flag): every case runs, the ratios are consistent, the JSON is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_smoke_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--gpu-check-smoke",
                        "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| shape | dtype | case | µs per call | x one read | x min_p + sample | x full sort |" in r.stdout
    assert "top-p cost per step" in r.stdout
    report = json.loads(out.read_text())
    cases = {row["case"] for row in report["gpu_check"]}
    assert {"one read (row max)", "min_p(0.05) + sample", "top_p(0.9) + sample",
            "top_k(50, traced) + sample", "full-sort top-p + categorical"} <= cases
    for row in report["gpu_check"]:
        assert row["seconds"] > 0
        if row["case"] == "one read (row max)":
            assert row["x_one_read"] == 1.0
        if row["case"] == "full-sort top-p + categorical":
            assert row["x_full_sort"] == 1.0
    assert [g["batch"] for g in report["generate"]] == [1]
    for g in report["generate"]:  # a figure, or None: below timer resolution (3 tokens here)
        for key in ("greedy_ms_per_step", "top_p_ms_per_step"):
            assert g[key] is None or g[key] > 0
        assert (g["top_p_cost"] is None) == (None in (g["greedy_ms_per_step"], g["top_p_ms_per_step"]))
