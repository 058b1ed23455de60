"""Errors that tell the truth: only input the user can fix is bad input (exit 2, one line); anything else names its
type and stage, exits 1, and shows its traceback with -v. A GPU asked for where none exists is refused before any
work, naming the key that asked, unless the user says CPU is fine."""

import dataclasses

import pytest
import torch

from flora_ray import stages
from flora_ray.cli import main
from flora_ray.config import load_config
from flora_ray.errors import InputError, MissingInput, StageUnfinished
from flora_ray.stages.preflight import check_devices
from flora_ray.training.worker import run_device

NO_CUDA = not torch.cuda.is_available()


def _failing_stage(exc: BaseException):
    def run(cfg, backend):
        raise exc

    return run


@pytest.mark.parametrize("exc", [ValueError("an internal invariant broke"), KeyError("missing-key"), OSError(5, "EIO")])
def test_an_unexpected_error_in_a_stage_names_its_type_and_stage_and_exits_1(config_file, monkeypatch, capsys, exc):
    monkeypatch.setitem(
        stages.STAGES, "pretrain", dataclasses.replace(stages.STAGES["pretrain"], run=_failing_stage(exc))
    )
    assert main(["pretrain", str(config_file), "--backend", "local"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"flora-ray: error: {type(exc).__name__} in pretrain: "), err
    assert "re-run with -v" in err and "Traceback" not in err
    # -v: the traceback, down to the function that raised
    monkeypatch.setitem(
        stages.STAGES, "pretrain", dataclasses.replace(stages.STAGES["pretrain"], run=_failing_stage(exc))
    )
    assert main(["-v", "pretrain", str(config_file), "--backend", "local"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and f'{__file__}", line' in err and ", in run\n" in err


def test_input_errors_are_one_line_and_exit_2_wherever_they_are_raised(config_file, monkeypatch, capsys):
    """An ``InputError`` from deep inside a stage (a file found bad only when the stage reads it) is still input."""
    bad = MissingInput("data file 'x.idx' does not exist: run make data")
    monkeypatch.setitem(
        stages.STAGES, "pretrain", dataclasses.replace(stages.STAGES["pretrain"], run=_failing_stage(bad))
    )
    assert main(["pretrain", str(config_file), "--backend", "local"]) == 2
    assert capsys.readouterr().err == "flora-ray: error: data file 'x.idx' does not exist: run make data\n"
    assert isinstance(bad, FileNotFoundError) and isinstance(InputError("x"), ValueError)  # callers' except clauses


def test_a_stage_left_unfinished_is_its_own_line_and_exit_1(config_file, monkeypatch, capsys):
    left = StageUnfinished("search stopped after 3 of 8 trials; re-run the same command to continue")
    monkeypatch.setitem(
        stages.STAGES, "pretrain", dataclasses.replace(stages.STAGES["pretrain"], run=_failing_stage(left))
    )
    assert main(["pretrain", str(config_file), "--backend", "local"]) == 1
    assert capsys.readouterr().err == f"flora-ray: error: {left}\n"


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA: a GPU asked for is there")
@pytest.mark.parametrize(
    ("override", "key"),
    [("scaling.use_gpu=true", "scaling.use_gpu"), ("search.gpus_per_trial=0.5", "search.gpus_per_trial")],
)
def test_a_gpu_asked_for_without_cuda_is_refused_before_any_work(config_file, tmp_path, capsys, override, key):
    assert main(["run", str(config_file), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"flora-ray: error: {key} asks for a GPU but torch ") and "scaling.allow_cpu=true" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "runs").exists()  # nothing claimed, nothing written
    # scaling.allow_cpu=true: CPU is fine, the check passes and every device rule gives the CPU
    cfg = load_config(config_file, [override, "scaling.allow_cpu=true"])
    check_devices(cfg, on_this_machine=True)
    assert run_device(cfg, key).type == "cpu"
    # on a worker of a cluster (the preflight cannot see its nodes), the same rule fails the work instead
    with pytest.raises(RuntimeError, match=f"{key} asks for a GPU"):
        run_device(load_config(config_file, [override]), key)


def test_a_custom_accelerator_or_a_cluster_is_not_checked_here(config_file):
    custom = load_config(config_file, ["scaling.use_gpu=true", "scaling.accelerator=accel"])
    check_devices(custom, on_this_machine=True)
    assert run_device(custom, "scaling.use_gpu").type == "cpu"  # a custom resource runs CPU torch by design
    check_devices(load_config(config_file, ["scaling.use_gpu=true"]), on_this_machine=False)  # nodes come later


def test_config_refuses_an_unknown_model_as_plan_and_run_do(config_file, capsys):
    assert main(["config", str(config_file), "model.name=deit_tiny_patch16_2244"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flora-ray: error: unknown timm model 'deit_tiny_patch16_2244': did you mean")
    assert main(["config", "experiments/deit_small_imagenet.yaml"]) == 0  # its data is not here: still printed
    assert "deit_small_patch16_224" in capsys.readouterr().out


def test_every_entry_point_chooses_the_backend_by_the_same_rule():
    """The CLI's commands, ``flora_ray.run``, ``Run.export``, ``Run.finetune`` and ``Run.refine`` default to the same
    backend (Ray), so a notebook's export or fine-tune goes where ``flora-ray export``/``finetune`` would send it."""
    import inspect

    import flora_ray as fr
    from flora_ray.api import DEFAULT_BACKEND, Run, open_backend
    from flora_ray.cli import build_parser

    assert DEFAULT_BACKEND == "ray"
    for fn in (fr.run, Run.export, Run.finetune, Run.refine, open_backend):
        assert inspect.signature(fn).parameters["backend"].default == DEFAULT_BACKEND, fn.__qualname__
    parser = build_parser()
    for command in (
        ["run", "c.yaml"],
        ["search", "c.yaml"],
        ["export", "r", "--trial", "1"],
        ["finetune", "r", "--knee"],
        ["refine", "r", "--max-macs", "1e6"],
    ):
        assert parser.parse_args(command).backend == DEFAULT_BACKEND, command
