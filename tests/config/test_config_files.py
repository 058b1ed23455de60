"""Config files that extend others (``base:``), the required keys, data-set geometry defaults, ``flora-ray config``."""

import json
from pathlib import Path

import pytest
import yaml

from flora_ray.cli import main
from flora_ray.config import DATASET_GEOMETRY, DataConfig, config_to_dict, load_config

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
RECIPES = ["deit_small_imagenet.yaml", "deit_base_imagenet.yaml", "swin_tiny_imagenet.yaml", "swin_base_imagenet.yaml"]


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _cli(capsys, *args):
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_file_extends_its_bases_key_by_key(tmp_path):
    _write(tmp_path / "bases" / "common.yaml", {
        "model": {"name": "test_vit", "kwargs": {"depth": 2, "embed_dim": 32}, "ratios": [0.25, 0.5, 1.0]},
        "data": {"name": "digits"},
        "train": {"epochs": 5, "lr": 0.001},
    })  # fmt: skip
    _write(tmp_path / "bases" / "short.yaml", {"base": "common.yaml", "train": {"epochs": 2}})  # relative to itself
    _write(tmp_path / "bases" / "wide.yaml", {"model": {"kwargs": {"embed_dim": 64}}})
    child = _write(tmp_path / "child.yaml", {
        "base": ["bases/short.yaml", "bases/wide.yaml"],
        "model": {"ratios": [0.5, 1.0], "kwargs": {"num_heads": 2}},
        "search": {"trials": 7},
    })  # fmt: skip
    cfg = load_config(child, ["train.lr=0.01"])
    assert cfg.model.kwargs == {"depth": 2, "embed_dim": 64, "num_heads": 2}  # mappings merge key by key
    assert cfg.model.ratios == (0.5, 1.0)  # lists are replaced, not merged
    assert (cfg.train.epochs, cfg.train.lr, cfg.search.trials) == (2, 0.01, 7)  # nearest file wins, overrides last
    assert cfg.data.name == "digits" and "base" not in config_to_dict(cfg)


def test_the_imagenet_recipes_share_one_base_and_state_only_what_differs():
    base = yaml.safe_load((EXPERIMENTS / "bases" / "imagenet_gpu.yaml").read_text())
    for name in RECIPES:
        own = yaml.safe_load((EXPERIMENTS / name).read_text())
        assert own.pop("base") == "bases/imagenet_gpu.yaml"
        assert set(own) <= {"run", "model", "filter", "train"}, name
        assert len([key for section in own.values() for key in section]) <= 6, name
        cfg = load_config(EXPERIMENTS / name)
        assert cfg.search.trials == base["search"]["trials"] and cfg.data.name == "imagefolder"
    with pytest.raises(ValueError, match="does not set model.name"):
        load_config(EXPERIMENTS / "bases" / "imagenet_gpu.yaml")  # a base, not a run


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"a.yaml": {"base": "a.yaml"}}, "cycle: {tmp}/a.yaml -> {tmp}/a.yaml"),
        ({"a.yaml": {"base": "b.yaml"}, "b.yaml": {"base": "a.yaml"}}, "cycle: {tmp}/a.yaml -> {tmp}/b.yaml -> "),
        ({"a.yaml": {"base": "nowhere.yaml"}}, "nowhere.yaml' (the base of '{tmp}/a.yaml') does not exist"),
        ({"a.yaml": {"base": 3}}, "base=3 must be a file name or a list of file names"),
        ({"a.yaml": ""}, "does not set model.name and data.name"),
        ({"a.yaml": {"model": {"name": "test_vit"}}}, "does not set data.name"),
        ({"a.yaml": {"data": {"name": "digits"}, "train": {"epochs": 1}}}, "does not set model.name: name the timm"),
    ],
)
def test_bad_config_files_are_one_line_and_exit_2(tmp_path, capsys, files, message):
    for name, data in files.items():
        _write(tmp_path / name, data)
    for command in (["config"], ["run", "--output", tmp_path / "runs"]):
        code, out, err = _cli(capsys, *command, tmp_path / "a.yaml")
        assert code == 2 and out == "", (out, err)
        assert err.startswith("flora-ray: error: ") and err.count("\n") == 1, err
        assert message.format(tmp=tmp_path.resolve()) in err, err
    assert not (tmp_path / "runs").exists()  # nothing started


def test_an_empty_config_with_the_required_keys_as_overrides_is_a_config(tmp_path):
    empty = _write(tmp_path / "empty.yaml", "")
    cfg = load_config(empty, ["model.name=test_vit", "data.name=digits"])
    assert (cfg.data.img_size, cfg.data.in_chans) == DATASET_GEOMETRY["digits"] == (8, 1)


@pytest.mark.parametrize("name", ["fashion_mnist", "digits", "imagefolder"])
def test_image_geometry_defaults_come_from_the_data_set(name):
    root = {"root": "/data/somewhere"} if name == "imagefolder" else {}
    cfg = DataConfig(name=name, **root)
    assert (cfg.img_size, cfg.in_chans) == DATASET_GEOMETRY[name]
    assert DataConfig(name=name, img_size=32, **root).img_size == 32  # a stated value wins
    assert load_config(None, [f"data.name={name}", *(f"data.{k}={v}" for k, v in root.items())]).data == cfg


def test_config_command_prints_the_resolved_configuration(tmp_path, capsys):
    recipe = EXPERIMENTS / "deit_base_imagenet.yaml"
    code, out, err = _cli(capsys, "config", recipe, "train.epochs=30")
    assert code == 0 and err == ""
    printed = yaml.safe_load(out)
    expected = config_to_dict(load_config(recipe, ["train.epochs=30"]))
    assert printed == expected and printed["train"]["epochs"] == 30 and printed["filter"]["lr"] == 1.5e-5
    assert printed["search"]["population"] == 50 and printed["data"]["search_per_class"] == 25  # from the base
    assert load_config(_write(tmp_path / "resolved.yaml", out)) == load_config(recipe, ["train.epochs=30"])
    code, out, _ = _cli(capsys, "config", recipe, "--json")
    assert code == 0 and json.loads(out) == config_to_dict(load_config(recipe))
