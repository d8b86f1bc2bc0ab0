"""The report and its tables: markdown, HTML, and no torch needed to write them."""

import json
import subprocess
import sys

from edgeclr.report import bench_table, compare_table, markdown_table


def test_markdown_table_shape():
    t = markdown_table(["a", "b"], [["1", ""], ["x", "y"]])
    assert t.splitlines() == ["| a | b |", "|---|---|", "| 1 |  |", "| x | y |"]


def test_compare_table_leaves_missing_and_nan_cells_empty():
    row = {"model": "m", "knn_top1": 90.0, "linear_top1": None, "retention": float("nan"), "size_bytes": 2e6, "macs": None,
           "latency_ms_1thread": 0.5, "speedup_vs_teacher": 2.0}
    line = compare_table([row]).splitlines()[2]
    assert line == "| m | 90.00 |  |  |  |  | 2.00 |  | 0.500 | 2.00x |"


def test_bench_table_names_the_machine_first():
    r = {"machine": {"cpu": "X", "cores": 2, "arch": "x86_64"}, "baseline": "b", "rounds": 1, "runs_per_round": 2, "warmup_s": 0.5,
         "matmul_peak_macs_per_s": {"1": 1e9}, "rows": []}
    assert bench_table(r).startswith("Machine: X (2 cores, x86_64)")


def test_a_report_of_a_bare_run_folder_is_written_without_torch(tmp_path):
    (tmp_path / "pipeline.json").write_text(json.dumps({"preset": "demo", "data": "digits", "stages": {}, "runs": []}))
    code = ("import sys; sys.modules['torch'] = None\n"
            f"from edgeclr import report; r = report.write({str(tmp_path)!r}); print(r['html'])")
    subprocess.run([sys.executable, "-c", code], check=True)
    html = (tmp_path / "report.html").read_text()
    assert "No compressed artifacts yet" in html and (tmp_path / "report.md").exists()
