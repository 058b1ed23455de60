"""Bad input to the run and stage commands: one line naming the problem and the fix, exit code 2, nothing lost.

Every case fails before Ray starts (no cluster is needed), so the whole table runs in seconds.
"""

import hashlib
import socket
from pathlib import Path

import pytest
import yaml
from conftest import DIGITS_OVERRIDES

from flora_ray.cli import main
from flora_ray.config import config_to_dict, load_config
from flora_ray.stages.inputs import full_space
from flora_ray.storage.files import write_json
from flora_ray.storage.run_store import ARTEFACTS

SPACE_FILE, SUPERNET_FILE, TEACHER_FILE = ARTEFACTS.space, ARTEFACTS.supernet, ARTEFACTS.teacher
RUN_CONFIG_FILE = ARTEFACTS.run_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def setup(tmp_path, with_teacher):
    """A valid digits config file, plus helpers that put files into its run directory."""
    cfg = load_config(None, [*DIGITS_OVERRIDES, f"run.output_dir={tmp_path / 'runs'}"])
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    run_dir = cfg.run.run_dir

    def prepare(kind):
        if kind == "teacher":
            with_teacher(cfg)
        elif kind == "corrupt_teacher":
            run_dir.mkdir(parents=True)
            (run_dir / TEACHER_FILE).write_bytes(b"\x00" * 100)
        elif kind == "other_teacher":  # a checkpoint of a wider model
            with_teacher(load_config(config, ["model.kwargs.embed_dim=48"]))
        elif kind == "corrupt_space":
            with_teacher(cfg)
            (run_dir / SPACE_FILE).write_text("{not json")
        elif kind == "other_space":  # a filtered space of a deeper model
            with_teacher(cfg)
            full_space(load_config(config, ["model.kwargs.depth=3"])).save(run_dir / SPACE_FILE)
        elif kind == "other_supernet":
            with_teacher(load_config(config, ["model.kwargs.embed_dim=48"]))
            (run_dir / TEACHER_FILE).rename(run_dir / SUPERNET_FILE)
        elif kind == "claimed":
            run_dir.mkdir(parents=True)
            (run_dir / RUN_CONFIG_FILE).write_text(yaml.safe_dump(config_to_dict(cfg)))
        elif kind == "broken_claim":
            run_dir.mkdir(parents=True)
            (run_dir / RUN_CONFIG_FILE).write_text("run: [")
        elif kind == "not_mapping":
            config.write_text("- just\n- a list\n")
        elif kind == "malformed":
            config.write_text("train:\n  epochs: [3\n")
        elif kind == "bad_ranks_file":
            write_json(tmp_path / "r.json", {"ranks": {"blocks.0.attn.qkv": 10_000}})
        return run_dir

    return config, tmp_path, prepare


# (setup, arguments, expected message). {c}: the config file, {d}: the temporary directory, {port}: a closed port.
CASES = [
    (None, ["run", "{d}/missing.yaml"], "config file '{d}/missing.yaml' does not exist"),
    ("malformed", ["run", "{c}"], "is not valid YAML"),
    ("not_mapping", ["run", "{c}"], "must hold a mapping of sections, got list"),
    (None, ["run", "{c}", "train.epoch=3"], "unknown config key 'train.epoch'; did you mean 'train.epochs'?"),
    (None, ["run", "{c}", "trian.epochs=3"], "unknown config key 'trian'; did you mean 'train'?"),
    (None, ["run", "{c}", "train.epochs=three"], "train.epochs='three' must be an integer"),
    (None, ["run", "{c}", "filter.keep_fraction=1.5"], "filter.keep_fraction=1.5 is invalid: must be in (0, 1]"),
    (None, ["run", "{c}", "train.epochs"], "override 'train.epochs' is not of the form section.key=value"),
    (None, ["run", "{c}", "model.name=deit_tiny_patch16_2244"], "unknown timm model 'deit_tiny_patch16_2244'"),
    (None, ["run", "{c}", "model.kwargs.img_size=16"], "model.kwargs.img_size=16 contradicts data.img_size=8"),
    (None, ["run", "{c}", "model.pretrained={d}/nope.safetensors"], "weight file '{d}/nope.safetensors' does not"),
    (None, ["run", "{c}", "data.name=fashion_mnist", "data.root={d}/empty"], "fashion"),
    (None, ["run", "{c}", "data.name=imagefolder", "data.in_chans=3", "data.root={d}/nowhere"], "data.root"),
    (None, ["run", "{c}", "--address", "127.0.0.1:{port}"], "cannot reach the Ray cluster at '127.0.0.1:{port}'"),
    (None, ["run", "{c}", "--address", "no-port-here"], "is not auto, host:port or ray://host:port"),
    (None, ["run", "{c}", "run.storage=s3:/bucket/runs"], "'s3:' is not followed by '//'; write s3://bucket/prefix"),
    (None, ["run", "{c}", "run.storage=gs:bucket"], "'gs:' is not followed by '//'; write gs://bucket/prefix"),
    (None, ["filter", "{c}"], "no dense teacher at"),
    ("corrupt_teacher", ["filter", "{c}"], "(corrupt or not safetensors)"),
    ("other_teacher", ["train", "{c}"], "use the checkpoint made for this model or change the model config"),
    ("corrupt_space", ["train", "{c}"], "is not valid JSON"),
    ("other_space", ["train", "{c}"], "was made for another model (test_vit; 9 vs 6 layers)"),
    ("teacher", ["search", "{c}"], "no supernet at"),
    ("other_supernet", ["search", "{c}"], "use the checkpoint made for this model"),
    ("claimed", ["run", "{c}", "train.epochs=4"], "was made with a different configuration (train.epochs: 3 -> 4)"),
    ("claimed", ["train", "{c}", "model.ratios=[0.5, 1.0]"], "was made with a different configuration (model.ratios"),
    ("broken_claim", ["run", "{c}"], "run_config.yaml' is not valid YAML"),
    (None, ["export", "{d}/no-run", "--trial", "3"], "trials.parquet' does not exist"),
    (None, ["export", "{d}", "--trial", "3", "--max-macs", "5"], "not allowed with argument"),
    (None, ["run", "{c}", "search.objectives=[flops]"], "search.objectives=['flops'] is invalid: one cost axis of"),
    (None, ["run", "{c}", "search.max_macs=1000"], "search.max_macs=1000.0 (1000) is below the cheapest configuration"),
    (None, ["run", "{c}", "filter.cost_floor=1000"], "filter.cost_floor=1000.0 (1000 MACs) is below the cheapest"),
    (None, ["run", "{c}", "filter.cost_floor=cheap"], "filter.cost_floor='cheap' is invalid: 'uniform_min' (the"),
    (None, ["run", "{c}", "search.min_params=101%"], "search.min_params='101%' (1.84e+04) is above the dearest"),
    (None, ["search", "{c}", "search.max_latency_ms=5"], "latency_table.parquet' does not exist: run"),
    (None, ["profile", "{c}", "profile.dtype=float16"], "float16 needs profile.device=cuda"),
    (None, ["run", "{c}", "model.tome_r=-1"], "model.tome_r=-1 is invalid: a whole number of tokens >= 0"),
    (
        None,
        ["run", "{c}", "model.tome_r=9"],
        "tome_r=9 is too large: block 0 of 2 sees 17 tokens and can merge at most 8",
    ),
    (None, ["run", "{c}", "model.name=deit_tiny_distilled_patch16_224", "model.tome_r=1"], "not VisionTransformerDist"),
    (
        None,
        [
            "run",
            "{c}",
            "model.name=swin_tiny_patch4_window7_224",
            "model.kwargs={{patch_size: 2, depths: [2], num_heads: [2], window_size: 2}}",
            "model.tome_r=1",
        ],
        "token merging (model.tome_r=1) supports timm VisionTransformer models (ViT, DeiT), not SwinTransformer",
    ),
]


@pytest.mark.parametrize(("kind", "args", "message"), CASES, ids=[" ".join(a)[:45] for _, a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_is_lost(setup, capsys, kind, args, message):
    config, tmp, prepare = setup
    (tmp / "empty").mkdir()
    run_dir = prepare(kind) if kind else None
    port = _free_port()
    fill = {"c": config, "d": tmp, "port": port}
    before = _snapshot(run_dir)
    with pytest.raises(SystemExit) as raised:
        raise SystemExit(main([a.format(**fill) for a in args]))
    err = capsys.readouterr().err
    assert raised.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("flora-ray: error: "), err
    assert message.format(**fill) in err
    assert _snapshot(run_dir) == before, "a bad command changed files that were already written"


def _snapshot(run_dir: Path | None) -> dict[str, str]:
    if run_dir is None or not run_dir.is_dir():
        return {}
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_bad_command_on_a_fresh_directory_claims_nothing(setup, capsys):
    config, _, _ = setup
    run_dir = load_config(config).run.run_dir
    assert main(["run", str(config), "model.name=deit_tiny_patch16_2244"]) == 2
    assert not (run_dir / RUN_CONFIG_FILE).exists()  # fixing the typo must not then be a "different config"
    capsys.readouterr()


def test_an_unreachable_cluster_claims_nothing(setup, capsys):
    """Nothing is recorded for a cluster nobody can reach: retrying with another setting is not refused as "made with a
    different configuration" (the run's configuration and job record were once written before Ray was joined)."""
    config, _, _ = setup
    run_dir = load_config(config).run.run_dir
    assert main(["run", str(config), "--address", f"127.0.0.1:{_free_port()}"]) == 2
    assert "cannot reach the Ray cluster" in capsys.readouterr().err
    assert not run_dir.exists() or not any(run_dir.iterdir())
