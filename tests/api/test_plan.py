"""``flora-ray plan``: demands, the autoscaler's node counts, estimates and their sources, costs, bad input.

The four ImageNet recipes are planned against ``cluster/aws.yaml``; the node counts must equal the answer of Ray's
autoscaler (``get_nodes_for``) for the demands built here the way the code's Ray calls build them (Ray Train's own
``ScalingConfig`` for the training workers). A finished digits run (``finished``) is planned from its measured stage
times.
"""

import functools
import json
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for
from ray.autoscaler._private.util import prepare_config

from flora_ray.backends.ray import scaling_config
from flora_ray.cli import main
from flora_ray.config import load_config
from flora_ray.pipeline import stage_marker

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ["deit_small_imagenet.yaml", "deit_base_imagenet.yaml", "swin_tiny_imagenet.yaml", "swin_base_imagenet.yaml"]
IMAGENET = ["--classes", "1000", "--train-images", "1256167"]


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _autoscaler(cluster: dict, bundles: list[dict]) -> dict[str, int]:
    scorer = functools.partial(
        _default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary(node_availabilities={})
    )
    head = cluster["head_node_type"]
    added, unplaced = get_nodes_for(cluster["available_node_types"], {head: 1}, head, cluster["max_workers"],
                                    bundles, scorer)  # fmt: skip
    assert not unplaced
    return dict(added)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_on_aws_match_the_autoscaler(recipe, capsys):
    code, out, err = _cli(capsys, "plan", ROOT / "experiments" / recipe, "--cluster", ROOT / "cluster/aws.yaml",
                          "--price", "1.624", "--price", "head=0.384", *IMAGENET, "--json")  # fmt: skip
    assert code == 0, err
    plan = json.loads(out)
    stages = {s["stage"]: s for s in plan["stages"]}
    cfg = load_config(ROOT / "experiments" / recipe)
    cluster = prepare_config(yaml.safe_load((ROOT / "cluster/aws.yaml").read_text()))
    train = scaling_config(cfg.scaling)
    training = [dict(train._resources_per_worker_not_none)] * train.num_workers  # Ray Train's own view
    search = [{"CPU": cfg.search.cpus_per_trial, "GPU": cfg.search.gpus_per_trial}] * cfg.search.concurrency
    assert stages["pretrain"]["skipped"] == "model.pretrained is the teacher"
    for name, bundles in (("train", training), ("search", search), ("filter", [{"CPU": 8, "GPU": 1}] * 8)):
        assert stages[name]["bundles"] == bundles, name
        assert stages[name]["nodes"] == _autoscaler(cluster, bundles), name
    gpus = {t: cluster["available_node_types"][t]["resources"].get("GPU", 0) for t in cluster["available_node_types"]}
    hours = 0.0
    for s in plan["stages"]:
        if s["skipped"]:
            continue
        node_hours = {t: n * s["seconds"] / 3600 for t, n in s["nodes"].items()}
        assert s["gpu_hours"] == pytest.approx(sum(h * gpus[t] for t, h in node_hours.items()))
        assert s["cost"] == pytest.approx(1.624 * sum(node_hours.values()))
        assert s["seconds"] > 0 and s["source"]
        hours += s["seconds"] / 3600
    assert plan["totals"]["cost"] == pytest.approx(sum(s["cost"] or 0 for s in plan["stages"]) + 0.384 * hours)
    assert "A10G" in stages["train"]["source"] and "assumed utilisation" in stages["train"]["source"]
    # The bigger models' recipes cost more than the small ones' (same epochs for -small/-tiny, fewer for -base).
    assert stages["train"]["macs"] > 0 and stages["filter"]["macs"] > stages["search"]["macs"]


def test_a_plan_prints_a_table_and_scales_with_the_price(capsys):
    args = ["plan", ROOT / "experiments/deit_small_imagenet.yaml", "--cluster", ROOT / "cluster/aws.yaml", *IMAGENET]
    code, cheap, _ = _cli(capsys, *args, "--price", "1", "--json")
    code2, dear, _ = _cli(capsys, *args, "--price", "2", "--json")
    assert code == code2 == 0
    assert json.loads(dear)["totals"]["cost"] == pytest.approx(2 * json.loads(cheap)["totals"]["cost"])
    code, table, err = _cli(capsys, *args, "--price", "1.624", "train.epochs=10")
    assert code == 0 and err == "" and "| train | 8 x {'CPU': 8.0, 'GPU': 1} | 2 x gpu_4x |" in table
    assert table.splitlines()[-1].startswith("total: ") and "GPU-hours, $" in table


def test_a_finished_run_is_planned_from_its_measured_stages(finished, capsys):
    run, base, overrides = finished
    config = base / "plan.yaml"
    config.write_text("model: {name: test_vit}\ndata: {name: digits}\n")
    code, out, err = _cli(capsys, "plan", config, *overrides, "--output", base / "runs", "--json")
    assert code == 0, err
    stages = {s["stage"]: s for s in json.loads(out)["stages"]}
    for name in ("profile", "pretrain", "filter", "train", "search", "export"):
        marker = stage_marker(run.store, name)
        assert stages[name]["seconds"] == pytest.approx(marker["seconds"]) and "measured" in stages[name]["source"]
        assert stages[name]["nodes"] == {} and stages[name]["gpu_hours"] == 0


def test_a_new_local_run_is_estimated_from_a_forward_pass_timed_here(tmp_path, capsys):
    config = tmp_path / "plan.yaml"
    config.write_text("model: {name: test_vit}\ndata: {name: digits}\n")
    code, out, err = _cli(capsys, "plan", config, "--output", tmp_path / "runs")  # timm's patch 16 on 8 px digits
    assert code == 2 and "model test_vit cannot take 8x8 images with 1 channel(s)" in err and "patch_size" in err
    code, out, _ = _cli(capsys, "plan", config, "model.kwargs={patch_size: 2}", "--output", tmp_path / "runs", "--json")
    assert code == 0
    stages = {s["stage"]: s for s in json.loads(out)["stages"]}
    assert "forward pass timed here" in stages["train"]["source"] and stages["train"]["seconds"] > 0
    assert not (tmp_path / "runs").exists()  # a plan writes nothing


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--cluster", "nowhere.yaml", *IMAGENET], "cluster file 'nowhere.yaml' does not exist"),
        (["--price", "1", *IMAGENET], "--price needs --cluster"),
        (["--cluster", ROOT / "cluster/aws.yaml", "--price", "cheap", *IMAGENET], "give USD per node-hour"),
        (["--cluster", ROOT / "cluster/aws.yaml", "--price", "gpu_1x=1"], "give its class count"),
        (["--cluster", ROOT / "cluster/aws.yaml", "--price", "gpu_1x=1", *IMAGENET], "no price for node type"),
        (["--cluster", ROOT / "experiments/quickstart.yaml", *IMAGENET], "is not a Ray cluster launcher file"),
        (["--cluster", ROOT / "cluster/aws.yaml", "--mfu", "2", *IMAGENET], "--mfu 2.0"),
    ],
)
def test_bad_plan_input_is_one_line_and_exit_2(extra, message, capsys):
    code, out, err = _cli(capsys, "plan", ROOT / "experiments/deit_small_imagenet.yaml", *extra)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err
