"""Smoke run of the data_throughput benchmark.

The script runs once as a subprocess with ``--smoke --output TMP`` (24 JPEG files of 500x375, batch 8, one timed
round; about 10 s); the checks read its JSON and recompute the derived figures from the recorded ones.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "benchmarks" / "data_throughput.py"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("data-throughput")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"data_throughput failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout, json.loads((out / "data_throughput.json").read_text())


def test_rows_cover_every_configuration_with_positive_rates(result):
    stdout, r = result
    assert r["smoke"] is True and r["date"] and r["machine"] and len(r["loadavg"]) == 3 == len(r["loadavg_before"])
    folder = r["folder"]
    assert (folder["width"], folder["height"]) == (500, 375) and folder["images"] == 24 and folder["mean_kb"] > 20
    rows = r["rows"]
    assert sorted((x["transform"], x["pixels"], x["workers"]) for x in rows) == sorted(
        (t, p, w) for t in ("train", "eval") for p in (False, True) for w in (0, 1, 2)
    )
    for x in rows:
        assert x["output"] == ("uint8" if x["pixels"] else "float32")
        assert x["images"] == 24 * x["passes"] and x["seconds"] > 0
        assert x["images_per_s"] == pytest.approx(x["images"] / x["seconds"]) and x["images_per_s"] > 0
        assert x["images_per_s_per_worker"] == pytest.approx(x["images_per_s"] / max(x["workers"], 1))
        assert x["benchmark_cores"] > 0 and x["images_per_cpu_s"] > 0
    for s in r["split"]:
        assert s["ms"]["decode"] > 0 and s["total_ms"] == pytest.approx(sum(s["ms"].values()))
        assert ("RandAugment" in s["ms"]) == (s["transform"] == "train")
        assert ("Normalize" in s["ms"]) == (not s["pixels"])
    pre = r["preprocess"]
    assert pre["train_ms_per_image"] > 0 and pre["eval_ms_per_image"] > 0 and pre["erase_prob"] == 0.25
    assert set(pre["by_batch"]) == {"8"}  # the smoke run's batch is 8
    assert "cores per GPU" in stdout


def test_cores_per_gpu_follow_from_the_published_figure(result):
    _, r = result
    c = r["cores_per_gpu"]
    published = c["published_gpu"]
    assert published["model"] == "deit_small_patch16_224" and published["train_samples_per_sec"] > 0
    assert len(published["commit"]) == 40 and published["path"].startswith("results/benchmark-train-amp")
    assert c["recipe_batch_per_gpu"] == 128
    per_core = c["per_core_train_images_per_s"]
    one_worker = [x for x in r["rows"] if x["transform"] == "train" and x["workers"] == 1]
    assert per_core == {x["output"]: x["images_per_cpu_s"] for x in one_worker}
    supernet = next(e for e in c["estimates"] if e["published"] and e["step"].startswith("supernet"))
    assert supernet["gpu_images_per_s"] == pytest.approx(published["train_samples_per_sec"] * 0.75)
    for e in c["estimates"]:
        for output, cores in e["cores_needed"].items():
            assert cores == pytest.approx(e["gpu_images_per_s"] / per_core[output]) and cores > 0
