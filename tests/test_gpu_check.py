"""The GPU evidence script must work end to end; here as its CPU dry run (tiny sizes, a fake dataset)."""

import os
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
    result = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "gpu_check: passed" in result.stdout
    produced = sorted(p.name for p in tmp_path.iterdir())
    assert len(produced) <= 8, produced  # the device tool brings back at most 8 files
    for name in (
        "env.txt",
        "tests.txt",
        "benches.txt",
        "train.txt",
        "compare.txt",
        "compare-results.md",
        "compare-results.png",
        "study-records.tgz",
    ):
        assert name in produced, produced
    assert "| gutout |" in (tmp_path / "benches.txt").read_text()
    tests = (tmp_path / "tests.txt").read_text()
    assert " passed" in tests and " failed" not in tests
    assert "| ensemble |" in (tmp_path / "train.txt").read_text()
    assert "2 of 2 runs finished in time" in (tmp_path / "compare.txt").read_text()  # one process per (arm, seed)
    assert "| gutout-threshold | 0.5 | 0 |" in (tmp_path / "compare-results.md").read_text()
    with tarfile.open(tmp_path / "study-records.tgz") as archive:  # every finished run's record, to commit
        kept = sorted(name for name in archive.getnames() if name.endswith("metrics.jsonl"))
    assert kept == [f"records/fashion-mnist-{arm}-k1-s0/metrics.jsonl" for arm in ("gutout-threshold", "none")]
