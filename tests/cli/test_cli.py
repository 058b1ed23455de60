"""The flora-ray CLI: inspect output, and one clear line with exit code 2 for every bad input."""

import json
import os
import subprocess
import sys

import pytest
from helpers import DEIT_B_SVD_CONFIG, REFERENCE_DIR, write_reference_yaml

from flora_ray.cli import main


def run_cli(*args):
    env = {**os.environ, "TIMM_FUSED_ATTN": "0"}
    return subprocess.run(
        [sys.executable, "-m", "flora_ray.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_inspect_reference_subnet_prints_8_04_gmacs(tmp_path):
    ranks = REFERENCE_DIR / "flora_deit_base_subnet_81.85_8.04G.yml"
    if not ranks.is_file():
        ranks = write_reference_yaml(tmp_path, DEIT_B_SVD_CONFIG)
    result = run_cli("inspect", "deit_base_patch16_224", "--ranks", str(ranks))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1].startswith("total: 8.04 GMACs (dense 17.56, saving 54.2%)")
    assert len([line for line in lines if line.startswith("blocks.")]) == 36
    assert "blocks.0.attn.qkv" in lines[2] and "96/768" in lines[2]


def test_inspect_json_schema(capsys):
    assert main(["inspect", "deit_small_patch16_224", "--ratio", "0.5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"macs", "params", "dense_macs", "dense_params", "layers"} <= set(report)
    assert all(isinstance(report[k], int) for k in ("macs", "params", "dense_macs", "dense_params"))
    assert len(report["layers"]) == 36
    layer = report["layers"][0]
    assert {"fqn", "in_features", "out_features", "rank", "macs"} <= set(layer)
    assert layer == {**layer, "fqn": "blocks.0.attn.qkv", "in_features": 384, "out_features": 1152, "rank": 192}
    assert sum(x["macs"] for x in report["layers"]) < report["macs"] < report["dense_macs"]


def test_inspect_img_size_and_ranks_json(tmp_path, capsys):
    ranks = {"ranks": {f"blocks.{i}.{n}": 32 for i in range(6) for n in ("attn.qkv", "mlp.fc1", "mlp.fc2")}}
    (tmp_path / "r.json").write_text(json.dumps(ranks))
    assert main(["inspect", "test_vit", "--img-size", "64", "--ranks", str(tmp_path / "r.json"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["img_size"] == [64, 64] and all(layer["rank"] == 32 for layer in report["layers"])


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "broken.yml").write_text("MODEL: [unclosed")
    (tmp_path / "broken.json").write_text("{oops")
    (tmp_path / "wrong_fqn.json").write_text(json.dumps({"ranks": {"blocks.0.attn.qvk": 11}}))
    (tmp_path / "bad_rank.json").write_text(json.dumps({"ranks": {"blocks.0.attn.qkv": 13}}))
    write_reference_yaml(tmp_path, DEIT_B_SVD_CONFIG)
    return tmp_path


BAD_INPUTS = [
    (["inspect", "deit_tiny_patch16_2244"], "unknown timm model 'deit_tiny_patch16_2244': did you mean"),
    (["inspect", "test_vit", "--ratio", "1.5"], "ratio 1.5 is out of range"),
    (["inspect", "test_vit", "--ratio", "half"], "invalid ratio 'half'"),
    (["inspect", "test_vit", "--img-size", "-3"], "-3 must be a positive integer"),
    (["inspect", "test_vit", "--ranks", "{d}/missing.json"], "does not exist"),
    (["inspect", "test_vit", "--ranks", "{d}/broken.yml"], "is not valid YAML"),
    (["inspect", "test_vit", "--ranks", "{d}/broken.json"], "is not valid JSON"),
    (["inspect", "test_vit", "--ranks", "{d}/wrong_fqn.json"], "unknown layer 'blocks.0.attn.qvk'; did you mean"),
    (["inspect", "test_vit", "--ranks", "{d}/bad_rank.json"], "rank 13 for layer 'blocks.0.attn.qkv' is not one of"),
    (["inspect", "test_vit", "--ranks", "{d}/subnet.yml"], "is for a 12-block model; this one has 6"),
    (["inspect", "test_resnet"], "has no flora-ray preset"),
    (["inspect", "test_vit", "--ratio", "0.5", "--ranks", "x.json"], "not allowed with argument"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[" ".join(a)[:40] for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2(bad_files, capsys, args, message):
    args = [a.format(d=bad_files) for a in args]
    with pytest.raises(SystemExit) as raised:
        code = main(args)
        raise SystemExit(code)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flora-ray: error: "), err
    assert message in err


def test_bad_input_through_the_console_has_no_traceback(bad_files):
    result = run_cli("inspect", "test_vit", "--ranks", str(bad_files / "bad_rank.json"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_every_commands_help_renders_its_text_as_written():
    """argparse %-formats ``help`` strings but prints ``description`` as given: a literal "%%" in either is a typo the
    user sees (``list --help`` once printed "90%%")."""
    from flora_ray.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict)).choices
    assert {"run", "list", "compare", "export", "plan"} <= set(commands)
    for name, command in commands.items():
        text = command.format_help()
        assert "%%" not in text and "%(" not in text, name
    assert "50/75/90% of the dense cost" in commands["list"].format_help().replace("\n", " ").replace("  ", " ")
