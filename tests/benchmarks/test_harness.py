"""The benchmark harness (``experiments/benchmarks/harness.py``): arguments and smoke defaults, the environment
record, provenance and the atomic JSON write; and every benchmark script's ``--help`` run as a script from the
repository root, as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import harness
import pytest
from harness import RESULTS, ROOT, SMOKE_OUTPUT, bench_parser, environment, provenance, write_result

BENCHMARKS = ROOT / "experiments" / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if not p.stem.startswith("harness"))


def _parser():
    parser = bench_parser("Title line.\n\nMore text.", smoke={"trials": 4, "derived": "small"})
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=5)
    return parser


def test_parser_has_smoke_and_output_and_the_docstring_title():
    parser = _parser()
    assert parser.description == "Title line."
    args = parser.parse_args([])
    assert (args.smoke, args.trials, args.seeds, args.output) == (False, 60, 5, RESULTS)
    assert not hasattr(args, "derived")


def test_smoke_swaps_in_its_defaults_but_a_given_option_wins(tmp_path):
    args = _parser().parse_args(["--smoke"])
    assert (args.smoke, args.trials, args.seeds, args.derived) == (True, 4, 5, "small")
    assert args.output == SMOKE_OUTPUT and RESULTS not in (SMOKE_OUTPUT, *SMOKE_OUTPUT.parents)
    args = _parser().parse_args(["--smoke", "--trials", "9", "--output", str(tmp_path)])
    assert (args.trials, args.output) == (9, tmp_path)


def test_environment_records_what_the_result_files_hold():
    env = environment(threads=3)
    assert set(env) == {"date", "machine", "torch", "threads", "loadavg"}
    assert env["threads"] == 3 and len(env["loadavg"]) == 3 and env["machine"]


def test_write_result_attaches_provenance_atomically(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["experiments/benchmarks/x.py", "--smoke"])
    path = write_result(tmp_path / "deep" / "x.json", {"rows": [1, 2], "date": "2026-01-01"})
    assert path == tmp_path / "deep" / "x.json"
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temporary file left behind
    written = json.loads(path.read_text())
    assert written["rows"] == [1, 2] and written["date"] == "2026-01-01"
    prov = written["provenance"]
    assert prov["command"][1:] == ["experiments/benchmarks/x.py", "--smoke"]
    assert {"flora_ray", "torch", "timm", "python"} <= set(prov["versions"]) and len(prov["loadavg"]) == 3
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert prov["git"]["commit"] == head.stdout.strip() and isinstance(prov["git"]["dirty"], bool)
    # Written again (a result read back and amended), the file records its last writing.
    monkeypatch.setattr(sys, "argv", ["x.py", "--retime"])
    write_result(path, {**written, "rows": [3]})
    again = json.loads(path.read_text())
    assert again["rows"] == [3] and again["provenance"]["command"][1:] == ["x.py", "--retime"]


def test_provenance_without_git(monkeypatch):
    monkeypatch.setattr(harness, "git_commit", lambda root=ROOT: None)
    assert provenance(["a.py"])["git"] is None and provenance(["a.py"])["command"][1:] == ["a.py"]
    assert harness.git_commit(Path("/")) is None  # not a checkout


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_runs_as_a_script_with_the_harness_arguments(script):
    proc = subprocess.run(
        [sys.executable, f"experiments/benchmarks/{script}.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},  # on sys.path: only the script's own folder
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--smoke" in proc.stdout and "--output" in proc.stdout, proc.stdout
