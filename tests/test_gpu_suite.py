"""benchmarks/gpu_suite.sh is checked before a GPU is lent: a GPU session is rare and short, and a
flag that a benchmark no longer takes, or a test file or -k selection that no longer exists,
would spend it on an error. The dry run (GPU_SUITE_DRY_RUN=1) parses every part's benchmark
flags (GUIDE_FAST_CHECK_ARGS=1: argparse only), collects every part's tests and checks the shell
fragments, running nothing."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"


def _parts() -> tuple[list[str], list[str]]:
    """(the default parts, every part the suite's case statement knows)."""
    text = SUITE.read_text()
    default = re.search(r"PARTS=\$\{GPU_SUITE_PARTS:-([^}]*)\}", text).group(1).split()
    known = re.search(r"\(known: ([^)]*)\)", text).group(1).split()
    return default, known


def test_every_part_of_the_gpu_suite_is_well_formed(tmp_path):
    default, known = _parts()
    assert set(default) <= set(known) and "unlearn-headline" == default[0]
    env = dict(os.environ, GPU_SUITE_DRY_RUN="1", GPU_SUITE_PARTS=" ".join(known), PYTHON=sys.executable,
               OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(SUITE), str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "dry run finished, status 0" in log
    checked = len(re.findall(r"^(arguments ok|tests ok|shell ok): ", log, flags=re.M))
    # every part checks at least one command (goae: its tests and its benchmark)
    assert checked >= len(known) - 1, log[-4000:]
    assert "BROKEN" not in log and "unknown GPU_SUITE_PARTS" not in log


def test_the_dry_run_catches_a_flag_that_no_benchmark_takes(tmp_path):
    """The check can fail: a copy of the repository (links) whose suite gives bench_skip a flag it
    does not have fails its dry run and names the part."""
    for item in ROOT.iterdir():
        if item.name != "benchmarks" and not item.name.startswith("."):
            (tmp_path / item.name).symlink_to(item)
    (tmp_path / "benchmarks").mkdir()
    for item in (ROOT / "benchmarks").iterdir():
        if item.name != "gpu_suite.sh":
            (tmp_path / "benchmarks" / item.name).symlink_to(item)
    broken = SUITE.read_text().replace("run_bench bench_skip 30 --quick", "run_bench bench_skip 30 --quikc")
    assert broken != SUITE.read_text()
    (tmp_path / "benchmarks" / "gpu_suite.sh").write_text(broken)
    env = dict(os.environ, GPU_SUITE_DRY_RUN="1", GPU_SUITE_PARTS="skip", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(tmp_path / "benchmarks" / "gpu_suite.sh"), str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "ARGUMENTS BROKEN: bench_skip --quikc" in log, log[-3000:]
