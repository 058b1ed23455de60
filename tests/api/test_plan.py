"""``flora-ray plan``: demands, the autoscaler's node counts, estimates and their sources, costs, bad input.

The four ImageNet recipes are planned against ``cluster/aws.yaml``; the node counts must equal the answer of Ray's
autoscaler (``get_nodes_for``) for the demands built here the way the code's Ray calls build them (Ray Train's own
``ScalingConfig`` for the training workers), and, for two recipes, node counts, hours and cost worked out by hand
below. A finished digits run (``finished``) is planned from its measured stage times.
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
# Test inputs, USD per node-hour of each node type of cluster/aws.yaml (any numbers do: the test checks arithmetic).
PRICES = {"head": 0.5, "gpu_1x": 2.0, "gpu_4x": 7.0, "cpu_decode": 1.5}
PRICE_ARGS = [item for name, usd in PRICES.items() for item in ("--price", f"{name}={usd}")]


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
                          *PRICE_ARGS, *IMAGENET, "--json")  # fmt: skip
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
        assert s["cost"] == pytest.approx(sum(PRICES[t] * h for t, h in node_hours.items()))
        assert s["seconds"] > 0 and s["source"]
        hours += s["seconds"] / 3600
    assert plan["totals"]["cost"] == pytest.approx(sum(s["cost"] or 0 for s in plan["stages"]) + 0.5 * hours)
    # No measured or published training rate for these models on an A10G: the fallback, said as such.
    assert stages["train"]["source"].startswith("A10G: FALLBACK, no measured or published training rate")
    # The bigger models' recipes cost more than the small ones' (same epochs for -small/-tiny, fewer for -base).
    assert stages["train"]["macs"] > 0 and stages["filter"]["macs"] > stages["search"]["macs"]


def test_a_plan_prints_a_table_and_scales_with_the_price(capsys, tmp_path):
    args = ["plan", ROOT / "experiments/deit_small_imagenet.yaml", "--cluster", ROOT / "cluster/aws.yaml", *IMAGENET]
    (tmp_path / "cheap.yaml").write_text(yaml.safe_dump(PRICES))
    (tmp_path / "dear.json").write_text(json.dumps({name: 2 * usd for name, usd in PRICES.items()}))
    code, cheap, _ = _cli(capsys, *args, "--prices", tmp_path / "cheap.yaml", "--json")
    code2, dear, _ = _cli(capsys, *args, "--prices", tmp_path / "dear.json", "--json")
    assert code == code2 == 0
    assert json.loads(dear)["totals"]["cost"] == pytest.approx(2 * json.loads(cheap)["totals"]["cost"])
    # --price after --prices wins for its node type.
    code3, mixed, _ = _cli(capsys, *args, "--prices", tmp_path / "dear.json", *PRICE_ARGS, "--json")
    assert code3 == 0
    assert json.loads(mixed)["totals"]["cost"] == pytest.approx(json.loads(cheap)["totals"]["cost"])
    code, table, err = _cli(capsys, *args, *PRICE_ARGS, "train.epochs=10")
    assert code == 0 and err == "" and "| train | 8 x {'CPU': 8.0, 'GPU': 1} | 2 x gpu_4x |" in table
    lines = table.splitlines()
    assert "| A10G [1] |" in table and lines[-1].startswith("[1] A10G: FALLBACK") and "GPU-hours, $" in table
    assert "for comparison, RTX 3090: 1053.64 images/s (timm's training benchmark" in lines[-1]


def _plan(capsys, recipe: str, cluster: Path, *extra) -> dict:
    code, out, err = _cli(capsys, "plan", ROOT / "experiments" / recipe, "--cluster", cluster, *PRICE_ARGS,
                          *IMAGENET, *extra, "--json")  # fmt: skip
    assert code == 0, err
    return {s["stage"]: s for s in json.loads(out)["stages"]}


def _rtx3090_cluster(tmp_path: Path) -> Path:
    """cluster/aws.yaml with its GPU node types declaring Ray's ``accelerator_type`` resource of an RTX 3090."""
    doc = yaml.safe_load((ROOT / "cluster/aws.yaml").read_text())
    for name in ("gpu_1x", "gpu_4x"):
        doc["available_node_types"][name]["resources"]["accelerator_type:RTX3090"] = 1
    path = tmp_path / "rtx3090.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_deit_small_on_aws_node_counts_by_hand(capsys):
    """cluster/aws.yaml: gpu_1x = 16 CPU + 1 GPU (at most 8), gpu_4x = 48 CPU + 4 GPU (at most 2). Ray's autoscaler
    starts the node type the pending bundles use best (the least-used requested resource, highest first)."""
    stages = _plan(capsys, "deit_small_imagenet.yaml", ROOT / "cluster/aws.yaml")
    # train: 8 workers x {CPU 8, GPU 1}. A gpu_4x holds min(4/1, 48/8) = 4 of them (GPU 4/4, CPU 32/48: 0.67 least
    # used), a gpu_1x 1 (GPU 1/1, CPU 8/16: 0.5): gpu_4x wins, and 8 / 4 = 2 of them.
    assert stages["train"]["nodes"] == {"gpu_4x": 2}
    # filter: filter.concurrency 8 blocks x {CPU 8, GPU 1}: the same as training.
    assert stages["filter"]["nodes"] == {"gpu_4x": 2}
    # search: 16 evaluators x {CPU 4, GPU 0.5}. A gpu_4x holds min(4/0.5, 48/4) = 8 (GPU 4/4, CPU 32/48),
    # a gpu_1x 2 (GPU 1/1, CPU 8/16): gpu_4x, 16 / 8 = 2.
    assert stages["search"]["nodes"] == {"gpu_4x": 2}
    # export: 1 x {CPU 4, GPU 0.5}: gpu_1x uses GPU 0.5/1 and CPU 4/16 (0.25), gpu_4x 0.5/4 and 4/48 (0.083).
    assert stages["export"]["nodes"] == {"gpu_1x": 1}
    # profile: 1 x {GPU 1}: GPU 1/1 on a gpu_1x against 1/4 on a gpu_4x.
    assert stages["profile"]["nodes"] == {"gpu_1x": 1}


def test_deit_base_pretrain_on_rtx3090_nodes_from_timms_published_rate_by_hand(capsys, tmp_path):
    """With a published rate (timm: deit_base_patch16_224 trains at 390.88 images/s on one RTX 3090) a dense
    pretrain of 300 epochs of 1,256,167 images on 8 GPUs takes 300 x 1256167 / (8 x 390.88) s."""
    stages = _plan(capsys, "deit_base_imagenet.yaml", _rtx3090_cluster(tmp_path), "model.pretrained=false",
                   "pretrain.epochs=300")  # fmt: skip
    pretrain = stages["pretrain"]
    assert pretrain["nodes"] == {"gpu_4x": 2}  # 8 x {CPU 8, GPU 1} as in training above
    seconds = 300 * 1256167 / (8 * 390.88)  # = 120,513.4 s = 33.5 h
    assert pretrain["seconds"] == pytest.approx(seconds, rel=1e-9)
    assert pretrain["gpu_hours"] == pytest.approx(seconds / 3600 * 8)  # 2 nodes x 4 GPUs
    assert pretrain["cost"] == pytest.approx(seconds / 3600 * 2 * 7.0)  # 2 gpu_4x at 7.0 USD per node-hour
    assert pretrain["source"].startswith("RTX 3090: 390.88 training images/s")
    assert "benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv" in pretrain["source"]


def _measured(tmp_path: Path, **changes) -> Path:
    """A gpu_check result file (test input: a made-up A10G rate, 600 images/s at 3 x DeiT-S's 4,598,882,304 MACs
    per image, i.e. a dense training step)."""
    data = {
        "smoke": False,
        "throughput": {"model": "deit_small_patch16_224", "gpu": "NVIDIA A10G", "gpus": 1,
                       "images_per_s_per_gpu": 600.0, "train_macs_per_image": 3 * 4598882304,
                       "what": "test input"},
        "provenance": {"date": "2026-12-07"},
    }  # fmt: skip
    data.update(changes)
    path = tmp_path / "gpu_check_a10g.json"
    path.write_text(json.dumps(data))
    return path


def test_a_measured_rate_replaces_the_fallback_by_hand(capsys, tmp_path):
    stages = _plan(capsys, "deit_small_imagenet.yaml", ROOT / "cluster/aws.yaml", "model.pretrained=false",
                   "pretrain.epochs=300", "--throughput", _measured(tmp_path))  # fmt: skip
    # 300 epochs x 1,256,167 images x 3 dense forwards, at 600 images/s x 3 dense forwards on each of 8 A10Gs.
    assert stages["pretrain"]["seconds"] == pytest.approx(300 * 1256167 / (8 * 600), rel=1e-9)  # 78,510 s
    assert stages["pretrain"]["source"].startswith("A10G: 600 training images/s x 13.8 GMACs per training image")
    assert "measured by experiments/gpu_check.py on 1 x NVIDIA A10G (2026-12-07" in stages["pretrain"]["source"]
    code, _, err = _cli(capsys, "plan", ROOT / "experiments/deit_small_imagenet.yaml", "--cluster",
                        ROOT / "cluster/aws.yaml", *IMAGENET, "--throughput", _measured(tmp_path, smoke=True))  # fmt: skip
    assert code == 2 and "is a --smoke run" in err


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
        (["--price", "gpu_1x=1", *IMAGENET], "--price needs --cluster"),
        (["--cluster", ROOT / "cluster/aws.yaml", "--price", "1.62", *IMAGENET], "give a price per node type"),
        (["--cluster", ROOT / "cluster/aws.yaml", "--price", "gpu_1x=cheap", *IMAGENET], "give USD per node-hour"),
        (["--cluster", ROOT / "cluster/aws.yaml", "--price", "gpu_1x=1"], "give its class count"),
        (["--cluster", ROOT / "cluster/aws.yaml", "--price", "gpu_1x=1", *IMAGENET], "no price for node type"),
        (["--cluster", ROOT / "cluster/aws.yaml", *PRICE_ARGS[2:], *IMAGENET], "no price for node type 'head'"),
        (["--cluster", ROOT / "cluster/aws.yaml", "--prices", "nowhere.yaml", *IMAGENET], "--prices 'nowhere.yaml'"),
        (["--cluster", ROOT / "cluster/aws.yaml", "--throughput", ROOT / "README.md", *IMAGENET], "not a gpu_check"),
        (["--cluster", ROOT / "experiments/quickstart.yaml", *IMAGENET], "is not a Ray cluster launcher file"),
        (["--cluster", ROOT / "cluster/aws.yaml", "--mfu", "2", *IMAGENET], "--mfu 2.0"),
    ],
)
def test_bad_plan_input_is_one_line_and_exit_2(extra, message, capsys):
    code, out, err = _cli(capsys, "plan", ROOT / "experiments/deit_small_imagenet.yaml", *extra)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err
