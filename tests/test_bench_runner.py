"""The benchmark runner's discovery, pairing of fast vs reference rows, and summary files."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not an installed package
from benchmarks import run  # noqa: E402


def _row(what, path, ms, bench="render", shape="1x3", device="GPU X"):
    return {"benchmark": bench, "what": what, "path": path, "shape": shape, "dtype": "fp32", "median_ms": str(ms),
            "p20_ms": "", "p80_ms": "", "peak_mb": "", "device": device, "extra": "a | b"}


def test_discovers_every_bench_script():
    names = run.discover()
    assert "eval" in names and names == sorted(names)
    assert run._select(names, "eval", None) == ["eval"]
    assert "eval" not in run._select(names, None, "eval")
    with pytest.raises(SystemExit, match="unknown benchmark"):
        run._select(names, "nope", None)


def test_speedups_pair_fast_rows_with_the_reference_of_the_same_what_and_device():
    rows = [
        _row("forward", "reference", 10.0), _row("forward", "triton", 2.0),
        _row("forward", "triton", 1.0, device="GPU Y"),          # no reference on that device
        _row("backward", "reference", 30.0, shape="5x3"), _row("backward", "fast", 3.0, shape="1x3"),
        _row("backward", "fast", 5.0, shape="5x3"),               # the same-shape reference is preferred
    ]
    sp = run.speedups(rows)
    assert [(s["what"], s["speed-up"]) for s in sp] == [("forward", "5.0x"), ("backward", "10.0x"), ("backward", "6.0x")]


def test_summary_and_plots_are_written(tmp_path):
    rows = [_row("forward", "reference", 10.0), _row("forward", "triton", 2.0)]
    runs = [{"benchmark": "render", "status": "ok", "seconds": 1.5, "rows": 2}]
    plots = run.plot(rows, tmp_path)
    summary = run.write_summary(rows, runs, tmp_path, commit="abc123", quick=True)
    text = summary.read_text()
    assert "commit `abc123`" in text and "| render | ok | 1.5 | 2 |" in text
    assert "a \\| b" in text  # cell pipes escaped
    assert "| render | forward | triton | 1x3 | 10.000 | 2.000 | 5.0x | GPU X |" in text
    if plots:  # matplotlib installed
        assert plots[0].name == "plot_render.png" and plots[0].stat().st_size > 1000
        assert "![plot_render.png](plot_render.png)" in text


def test_bench_unlearn_smoke_writes_the_headline_and_step_rows(tmp_path, monkeypatch):
    """`bench_unlearn --smoke` on the CPU: the three headline rows (cold subprocess, warm loop,
    warm service), then the step rows incl. compile on and noise_passes separate."""
    import csv

    from benchmarks import bench_unlearn, common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setenv("GUIDE_FAST_COMPILE_BACKEND", "aot_eager")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    assert bench_unlearn.main(["--smoke"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    whats = [(r["what"], r["path"]) for r in rows]
    errors = [r["extra"] for r in rows if r["extra"].startswith(("ERROR", "NOT RUN"))]
    assert not errors, errors
    assert [w for w, _ in whats[:3]] == ["(b) cold process: guide-fast unlearn, start to written outputs",
                                         "(a) loop: 2-step loop alone (warm process)",
                                         "(c) warm service: second Unlearner.unlearn in one process"]
    assert "report.json" in rows[0]["extra"] and float(rows[0]["median_ms"]) > 0
    paths = [p for _, p in whats[3:]]
    assert paths == ["reference", "fast", "fast (noise_passes separate)", "fast+compile"]
    assert "noise_passes=separate" in rows[5]["extra"] and "compile=True" in rows[6]["extra"]
    assert all(r["device"] and r["commit"] for r in rows)


def test_tflops_against_the_step_count():
    from benchmarks.bench_unlearn import tflops

    assert tflops("ffhq512-128", 1000.0).startswith("achieved_tflops=7.4 (0.9% of 790")
    assert tflops("ffhq512-128", 100.0, n=2).startswith("achieved_tflops=148.0")
    assert tflops("tiny", 10.0) == ""
