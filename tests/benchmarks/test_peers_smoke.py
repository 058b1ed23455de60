"""Smoke run of ``experiments/benchmarks/peers.py`` (issue 32) on a tiny digits run: flora-ray, uniform ranks,
Torch-Pruning (magnitude and Taylor) and flora-ray on a pruned model at three budgets, each fine-tuned and scored.

The checks recompute the claims independently: every model within its budget (at most 2% above) and its MACs equal
to FlopCounterMode's (the script counts them); the pruned models' MACs from their head counts and MLP widths by
hand; flora's and uniform's choices from the run's own front and uniform frames; the paired differences from the
per-image bits.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import flora_ray as fr
from flora_ray.results import paired_difference, unpack_correct

pytest.importorskip(
    "torch_pruning", reason="torch-pruning (the bench extra) is not installed: pip install 'flora-ray[bench]'"
)

BENCHMARKS = Path(__file__).resolve().parents[2] / "experiments" / "benchmarks"
METHODS = ("flora", "uniform", "tp_magnitude", "tp_taylor", "flora_on_tp")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    out = tmp_path_factory.mktemp("peers")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "peers.py"), "--smoke", "--output", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, f"peers.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out, proc.stdout, json.loads((out / "peers_peers-smoke.json").read_text())


def test_every_method_reaches_every_budget_and_counts_what_runs(peers):
    _, stdout, result = peers
    dense = result["dense"]["macs"]
    assert result["dense"]["counted_macs"] == dense
    rows = {(r["method"], r["budget"]): r for r in result["rows"] if r["method"] in METHODS}  # ModelOpt: not locked
    assert set(rows) == {(m, b) for m in METHODS for b in result["budgets"]}
    for (method, budget), row in rows.items():
        assert "missing" not in row, (method, budget)
        assert row["macs"] <= 1.02 * budget * dense, (method, budget, row["macs"] / dense)
        assert row["counted_macs"] == row["macs"], (method, budget)
        assert row["latency"]["b1_ms"] > 0 and row["latency"]["b32_ms"] > 0
        assert row["compute"]["wall_s"] > 0 and row["finetune_s"] > 0
        assert f"| {budget:.0%} | {method} |" in stdout


def test_pruned_models_cost_what_their_heads_and_widths_say(peers):
    _, _, result = peers
    cfg = result["config"]
    kwargs, size = cfg["model"]["kwargs"], cfg["data"]["img_size"]
    dim, heads0, patch = kwargs["embed_dim"], kwargs["num_heads"], kwargs["patch_size"]
    head_dim, patches = dim // heads0, (size // patch) ** 2
    tokens = patches + 1
    for row in result["rows"]:
        if not row["method"].startswith("tp_"):
            continue
        choice = row["choice"]
        macs = patches * cfg["data"]["in_chans"] * patch * patch * dim + dim * 10  # patch embedding, head
        for heads, width in zip(choice["heads"], choice["mlp_hidden"], strict=True):
            attn = heads * head_dim
            macs += (
                tokens * dim * 3 * attn + tokens * attn * dim + 2 * tokens * tokens * attn + 2 * tokens * dim * width
            )
        assert row["macs"] == macs
        assert choice["search_accuracy"] == max(c["search_accuracy"] for c in choice["candidates"])
        assert any(h < heads0 for h in choice["heads"]) or any(
            w < dim * kwargs["mlp_ratio"] for w in choice["mlp_hidden"]
        )


def test_low_rank_choices_are_the_runs_own(peers):
    out, _, result = peers
    run = fr.Run.open(out / "runs" / "peers-smoke")
    dense = result["dense"]["macs"]
    for row in result["rows"]:
        if row["method"] == "flora":
            best = run.best_under(max_macs=row["budget"] * dense)
            assert json.loads(best["ranks"]) == row["choice"]["ranks"]
        elif row["method"] == "uniform":
            uniform = run.uniform[run.uniform["macs"] <= row["budget"] * dense]
            assert row["choice"]["search_accuracy"] == uniform["accuracy"].max()
        else:
            continue
        assert run.supernet.cost.macs(row["choice"]["ranks"]) == row["macs"]


def test_paired_differences_follow_from_the_per_image_bits(peers):
    _, _, result = peers
    flora = {r["budget"]: r for r in result["rows"] if r["method"] == "flora"}
    for row in result["rows"]:
        if "correct" not in row:
            continue
        ref = flora[row["budget"]]
        images = row["eval_images"]
        bits, ref_bits = unpack_correct(row["correct"], images), unpack_correct(ref["correct"], images)
        assert row["test_accuracy"] == pytest.approx(100 * bits.mean())
        diff, se = paired_difference(bits, ref_bits)
        assert row["vs_flora"]["difference"] == pytest.approx(diff) and row["vs_flora"]["se"] == pytest.approx(se)


def test_the_combination_starts_from_a_pruned_teacher_and_provenance_is_recorded(peers):
    _, _, result = peers
    combo, dense = result["combination"], result["dense"]["macs"]
    assert combo["base_macs"] <= 1.02 * combo["base_fraction"] * dense and combo["front"]
    for row in result["rows"]:
        if row["method"] == "flora_on_tp":
            assert row["macs"] < combo["base_macs"]
    assert result["versions"]["torch-pruning"] == "1.6.1" and result["seed"] == result["config"]["run"]["seed"]
    assert {"environment", "command", "finetune_recipe", "modelopt"} <= set(result)
