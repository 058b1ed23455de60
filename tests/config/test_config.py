"""Config schema: YAML loading, dotted overrides, validation; bad configs through the CLI."""

from pathlib import Path

import pytest

from flora_ray.cli import main
from flora_ray.config import Config, config_to_dict, dump_config, load_config

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def test_defaults_and_round_trip(tmp_path):
    cfg = load_config(None)
    assert cfg == Config()
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("name", ["quickstart.yaml", "digits_tiny.yaml"])
def test_shipped_experiments_load(name):
    cfg = load_config(EXPERIMENTS / name)
    assert config_to_dict(cfg)["run"]["name"]


def test_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "train.epochs=3",
            "train.lr=1e-3",
            "model.ratios=[0.5, 1]",
            "model.kwargs={depth: 2}",
            "scaling.use_gpu=true",
            "train.clip_grad=null",
        ],
    )
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.001 and cfg.model.ratios == (0.5, 1.0)
    assert cfg.model.kwargs == {"depth": 2} and cfg.scaling.use_gpu is True and cfg.train.clip_grad is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epoch=3"], "unknown config key 'train.epoch'; did you mean 'train.epochs'?"),
        (["trian.epochs=3"], "unknown config key 'trian'; did you mean 'train'?"),
        (["train.epochs=-1"], "train.epochs=-1 is invalid: must be at least 1"),
        (["train.epochs=three"], "train.epochs='three' must be an integer"),
        (["train.lr=0"], "train.lr=0.0 is invalid: must be positive"),
        (["train.min_lr=1"], "train.min_lr=1.0 is invalid: must be in [0, lr]"),
        (["train.sampler=greedy"], "train.sampler='greedy' is invalid: one of"),
        (["train.recipe=bignas"], "train.recipe='bignas' is invalid: one of ['flora', 'uniform', 'sandwich', "),
        (["train.distill_from=smallest"], "train.distill_from='smallest' is invalid: one of ['teacher', 'largest']"),
        (["model.ratios=[0, 1]"], "model.ratios=(0.0, 1.0) is invalid"),
        (["data.name=cifar"], "cifar"),
        (["scaling.num_workers=0"], "scaling.num_workers=0 is invalid"),
        (["scaling.use_gpu=maybe"], "scaling.use_gpu='maybe' must be true or false"),
        (["refine.k=0"], "refine.k=0 is invalid: an integer >= 1"),
        (["refine.epochs=0"], "refine.epochs=0 is invalid: an integer >= 1, or null for finetune.epochs"),
        (["refine.train_images=0"], "refine.train_images=0 is invalid"),
        (["train=3"], "train must be a mapping"),
        (["noequals"], "is not of the form section.key=value"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ValueError) as raised:
        load_config(None, overrides)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], ("flora", "lowrank", "teacher")),
        (["train.recipe=sandwich_inplace"], ("sandwich_inplace", "sandwich", "largest")),
        (["train.recipe=sandwich"], ("sandwich", "sandwich", "teacher")),
        (["train.recipe=uniform"], ("uniform", "uniform", "teacher")),
        (["train.recipe=sandwich_inplace", "train.sampler=lowrank"], ("sandwich_inplace", "lowrank", "largest")),
        (["train.recipe=sandwich", "train.distill_from=largest"], ("sandwich", "sandwich", "largest")),
        (["train.sampler=uniform"], ("flora", "uniform", "teacher")),
    ],
)
def test_a_recipe_expands_and_explicit_keys_override_it(tmp_path, overrides, expected):
    cfg = load_config(None, overrides)
    assert (cfg.train.recipe, cfg.train.sampler, cfg.train.distill_from) == expected
    recorded = config_to_dict(cfg)["train"]  # what run_config.yaml records: the resolved values
    assert (recorded["recipe"], recorded["sampler"], recorded["distill_from"]) == expected
    path = tmp_path / "run_config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_shipped_experiments_take_a_recipe_in_one_word():
    """No shipped file pins what a recipe sets, so ``train.recipe=...`` alone changes the recipe."""
    for name in ("quickstart.yaml", "digits_tiny.yaml", "fashion_mnist_full.yaml", "proving_ground.yaml"):
        cfg = load_config(EXPERIMENTS / name, ["train.recipe=sandwich_inplace"])
        assert (cfg.train.sampler, cfg.train.distill_from) == ("sandwich", "largest"), name


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [epochs: 3")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_config(bad)
    bad.write_text("- just a list")
    with pytest.raises(ValueError, match="must hold a mapping of sections"):
        load_config(bad)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "{cfg}", "train.epoch=3"], "unknown config key 'train.epoch'; did you mean 'train.epochs'?"),
        (["pretrain", "{cfg}", "pretrain.epochs=-2"], "pretrain.epochs=-2 is invalid"),
        (["filter", "{cfg}", "filter.label_smoothing=0.1"], "unknown config key 'filter.label_smoothing'"),
        (["pretrain", "{cfg}", "data.img_size=0"], "data.img_size=0 is invalid: must be a positive integer"),
        (["pretrain", "{cfg}", "data.name=fashion_mnist", "data.root={tmp}/nowhere"], "make data"),
        (["train", "{cfg}", "--output", "{tmp}/empty"], "no dense teacher at"),
        (["train", "{tmp}/missing.yaml"], "config file"),
        (["pretrain", "{cfg}", "model.name=vit_tiny_patch16_2244"], "unknown timm model"),
        (["pretrain", "{cfg}", "model.kwargs.in_chans=3"], "contradicts data.in_chans=1"),
        (["pretrain", "{cfg}", "--output"], "expected one argument"),
    ],
)
def test_stage_commands_reject_bad_input_before_starting_ray(tmp_path, capsys, args, message):
    import ray

    args = [a.format(cfg=EXPERIMENTS / "digits_tiny.yaml", tmp=tmp_path) for a in args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "runs")]
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("flora-ray: error: ") and err.count("\n") == 1 and message in err, err
    assert not ray.is_initialized()
