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
    assert line == "| m | 90.00 |  |  |  |  | 2.00 |  | 0.500 | 2.00x | teacher |"


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
    assert "No deployment selection yet" in html and (tmp_path / "report.md").exists()


def test_the_deployment_section_and_headline_come_from_the_selection_without_torch(tmp_path):
    from edgeclr import deploy

    rows = [{"name": n, "level": n.split("/")[0], "variant": "fp32", "runtime": "onnxruntime", "path": f"/x/{n}", "description": d,
             "knn_top1": k, "drop": 90.0 - k, "linear_top1": k, "p50_ms": ms, "p90_ms": ms, "size_bytes": b, "model_rss_mb": 40,
             "precision_ran": "fp32"}
            for n, d, k, ms, b in (("teacher/fp32.onnx", "the teacher's own export", 90.0, 0.30, 3e6),
                                   ("pruned/fp32.onnx", "the pruned student", 89.4, 0.10, 1e6))]
    sel = {"labeled": True, "rule": {"max_drop": 1.5, "min_overlap": 0.5, "max_latency_ms": None}, "teacher": {"knn_top1": 90.0},
           "threads": 1, "batch": 1, "target": "x86", "precision": "f32", "latency_source": "measured on X", "candidates": rows}
    sel["winner"] = deploy.choose(rows, sel["rule"])
    sel["rule_text"], sel["summary"] = "fastest within 1.5", deploy.summary(sel["winner"], rows, True, "measured on X")
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "selection.json").write_text(json.dumps(sel))
    (tmp_path / "pipeline.json").write_text(json.dumps({"preset": "demo", "data": "digits", "stages": {}, "runs": []}))
    code = f"import sys; sys.modules['torch'] = None\nfrom edgeclr import report; report.write({str(tmp_path)!r})"
    subprocess.run([sys.executable, "-c", code], check=True)
    md = (tmp_path / "report.md").read_text()
    assert "**Deployed pruned/fp32.onnx (the pruned student)" in md and "3.00x faster than the teacher's own onnxruntime" in md
    assert "| `pruned/fp32.onnx` |" in md and "slower: 0.300 ms, 3.00x the selected model's 0.100 ms" in md
    assert (tmp_path / "report_files" / "pareto.png").stat().st_size > 1000


def test_a_file_deploy_also_timed_has_deploy_latency_in_every_table_of_the_report(tmp_path):
    """compare.json and compress/report.json time the same files in their own runs; the report shows
    deploy's latency for every file deploy timed (found by content: deploy's candidates are hard
    links), and a speed-up only between two figures of one measurement."""
    import os

    from edgeclr import report

    models = tmp_path / "compress" / "models"
    models.mkdir(parents=True)
    (tmp_path / "export").mkdir()
    cand = tmp_path / "deploy" / "candidates"
    for folder in ("pruned", "teacher"):
        (cand / folder).mkdir(parents=True)
    for name, body in (("compress/models/fp32.onnx", b"f"), ("compress/models/int8.onnx", b"i"), ("export/teacher.onnx", b"t"),
                       ("export/other.onnx", b"o")):
        (tmp_path / name).write_bytes(body)
    os.link(models / "fp32.onnx", cand / "pruned" / "fp32.onnx")
    os.link(models / "int8.onnx", cand / "pruned" / "int8.onnx")
    os.link(tmp_path / "export" / "teacher.onnx", cand / "teacher" / "fp32.onnx")
    sel = {"threads": 1, "batch": 1, "candidates": [
        {"name": "pruned/fp32.onnx", "path": "elsewhere/fp32.onnx", "p50_ms": 0.050},  # found under OUT/deploy/candidates
        {"name": "pruned/int8.onnx", "path": str(cand / "pruned" / "int8.onnx"), "p50_ms": 0.040},
        {"name": "teacher/fp32.onnx", "path": str(cand / "teacher" / "fp32.onnx"), "p50_ms": 0.200}]}
    lat = report.deploy_latencies(tmp_path, sel)
    assert sorted(lat.values()) == [0.040, 0.050, 0.200]
    assert report.deploy_latencies(tmp_path, {**sel, "threads": 2}) == {}  # other settings: not the tables' 1 thread

    def row(model, path, ms, ref, runtime="onnxruntime"):
        return {"model": model, "path": str(path), "runtime": runtime, "knn_top1": 90.0, "linear_top1": None, "size_bytes": 1,
                "macs": None, "latency_ms_1thread": ms, "speedup_vs_teacher": 1.0, "speedup_reference": ref}

    rows = [row("teacher", tmp_path / "t.pt", 1.0, "teacher", "torch"),
            row("compress/models/int8.onnx", models / "int8.onnx", 0.047, "export/teacher.onnx"),
            row("export/teacher.onnx", tmp_path / "export" / "teacher.onnx", 0.230, "export/teacher.onnx"),
            row("export/other.onnx", tmp_path / "export" / "other.onnx", 0.300, "export/teacher.onnx")]
    md = report._retention_section(rows, lat)[2][1]
    assert "| compress/models/int8.onnx | 90.00 |" in md and "| 0.040 | 5.00x | export/teacher.onnx |" in md
    assert "| 0.200 | 1.00x |" in md and "| 1.000 | 1.00x | teacher |" in md
    assert "| 0.300 | 1.00x |" in md  # deploy did not time it: its own measurement, left as it was
    assert rows[1]["latency_ms_1thread"] == 0.047  # the run's files are not rewritten

    creport = {"onnx-fp32": {"latency_ms_1thread": 0.055}, "onnx-int8": {"latency_ms_1thread": 0.045, "speedup_vs_fp32": 1.22},
               "openvino-int8": {"latency_ms_1thread": 0.070, "speedup_vs_fp32": 1.1}}
    md = "\n".join(b[1] for b in report._compression_section(tmp_path, creport, lat) if b[0] in ("p", "table"))
    assert "The 2 files that deploy also timed" in md
    assert "| onnx-int8 |" in md and "0.040 | 1.25x |" in md and "0.050 |" in md and "0.070 | 1.10x |" in md
