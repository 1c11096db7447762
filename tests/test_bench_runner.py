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
