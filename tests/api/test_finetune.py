"""Fine-tuning a searched subnet (``flora-ray finetune``, ``Run.finetune``, ``finetune_subnet``, the pipeline stage)
on copies of the finished digits run of ``tests/api/conftest.py``: a weak subnet keeps or gains test accuracy, an
interrupted fine-tune resumes from its checkpoint to the uninterrupted result, the export loads with
``flora_ray.load_subnet`` and scores what ``finetune.json`` says, the report shows before and after, bad input is
one line and exit 2."""

import dataclasses
import json
import logging
import shutil

import pytest
import torch

import flora_ray as fr
from flora_ray.cli import main
from flora_ray.config import dump_config
from flora_ray.data.datasets import build_datasets
from flora_ray.stages.finetune import FINETUNE_FILE, finetune_from_run, finetune_stage, finetune_subnet
from flora_ray.stages.inputs import resolve_model_spec
from flora_ray.stages.runs import load_run_config
from flora_ray.storage.files import read_checkpoint
from flora_ray.storage.run_store import ARTEFACTS
from flora_ray.testing.faults import FaultyLocalBackend
from flora_ray.training.tasks import DenseTask, accuracy
from flora_ray.training.trainer import LocalSession, Trainer
from flora_ray.training.worker import distributed_loader

pytestmark = pytest.mark.slow
# The fixture's teacher is barely above chance (4 epochs on 1000 digits): the label term lets a fine-tune show a gain.
RECIPE = ["finetune.epochs=2", "finetune.lr=0.003", "finetune.batch_size=32", "finetune.label_weight=1.0",
          "finetune.eval_images=100"]  # fmt: skip
KWARGS = {"epochs": 2, "lr": 0.003, "batch_size": 32, "label_weight": 1.0, "eval_images": 100}


def _copy(finished, target):
    """A copy of the finished run (its Ray/checkpoint folder left out), so that fine-tunes never touch the shared
    run."""
    run, *_ = finished
    shutil.copytree(run.location, target, ignore=shutil.ignore_patterns(ARTEFACTS.ray))
    return fr.Run.open(target)


@pytest.fixture(scope="module")
def weakest_trial(finished):
    """The completed trial with the fewest MACs (the search's weakest subnet)."""
    run, *_ = finished
    trials = run.trials[run.trials["state"] == "COMPLETE"]
    return int(trials.sort_values(["macs", "accuracy"]).iloc[0]["trial"])


def _trained_teacher(cfg, splits):
    """A dense teacher trained well on digits (12 epochs: about 80% test accuracy; the run's own is near chance)."""
    torch.manual_seed(0)
    teacher = resolve_model_spec(cfg).create()
    opt = dataclasses.replace(cfg.pretrain, epochs=12, batch_size=32, lr=0.003, warmup_epochs=0)
    loader, sampler = distributed_loader(splits.train, 32, 1, 0, 0, "teacher")
    task = DenseTask(teacher, 0.0)
    Trainer(task, opt, LocalSession(None), loader, "teacher", train_sampler=sampler, prepare=splits.preprocess,
            evaluate=False).fit()  # fmt: skip
    return teacher.eval()


def test_distillation_improves_a_weak_subnet_in_process(finished):
    """The smallest uniform ranks of the space, distilled (no label term) from a good teacher in this process with
    nothing written: 15% -> 46% test accuracy measured."""
    run, *_ = finished
    splits = build_datasets(run.config.data, pixels=("train",))
    teacher = _trained_teacher(run.config, splits)
    assert accuracy(teacher, splits.test, torch.device("cpu")) > 60
    ranks = run.supernet.space.smallest()
    weights = {k: v.clone() for k, v in run.supernet.state_dict().items()}
    result = finetune_subnet(run.config, ranks, run=run.store, supernet=run.supernet, teacher=teacher, splits=splits,
                             **{**KWARGS, "label_weight": 0.0, "epochs": 3})  # fmt: skip
    assert result["test_accuracy"] >= result["test_accuracy_before"] + 10, result
    assert len(result["history"]) == 3 and result["epochs"] == 3
    assert result["test_accuracy"] == pytest.approx(accuracy(result["model"], splits.test, torch.device("cpu")))
    assert not run.store.exists(ARTEFACTS.finetunes)  # nothing written
    for name, tensor in run.supernet.state_dict().items():  # the supernet is left as it was (many subnets, one run)
        assert torch.equal(tensor, weights[name]), name


def test_interrupted_finetune_resumes_to_the_uninterrupted_result(finished, weakest_trial, tmp_path, caplog):
    """A failure at the start of epoch 1 leaves the epoch-0 checkpoint; the same command resumes from it (epoch 0
    is not trained again) and ends with the weights and accuracy of an uninterrupted fine-tune."""
    run = _copy(finished, tmp_path / "run")
    backend = FaultyLocalBackend(fail={"epoch": 1, "marker": str(tmp_path / "failed")}, sample_log=None)
    with pytest.raises(RuntimeError, match="injected failure at epoch 1"):
        finetune_from_run(run.store, trial=weakest_trial, overrides=RECIPE, backend=backend)
    assert not run.store.exists(ARTEFACTS.finetune_dir(weakest_trial))
    (state,) = run.store.local_path(ARTEFACTS.ray).glob(f"*-finetune-trial{weakest_trial}-*/latest/state.pt")
    assert torch.load(state, weights_only=True)["epoch"] == 1
    caplog.clear()  # only the resumed run's lines (an earlier test may have set flora_ray's loggers to INFO)
    with caplog.at_level(logging.INFO, logger="flora_ray"):
        report = finetune_from_run(run.store, trial=weakest_trial, overrides=RECIPE, backend=backend)
    assert "finetune: resumed from the checkpoint at epoch 1 step 0" in caplog.text
    assert "finetune epoch 1/2:" not in caplog.text and "finetune epoch 2/2:" in caplog.text  # epoch 1 not redone
    assert [h["epoch"] for h in report["history"]] == [1, 2]
    assert report["test_accuracy"] >= report["test_accuracy_before"], report

    clean = finetune_subnet(load_run_config(run.store), run.ranks(weakest_trial), run=run.store, **KWARGS)
    resumed, _ = read_checkpoint(f"{report['directory']}/model.safetensors")
    for name, tensor in clean["model"].state_dict().items():
        torch.testing.assert_close(resumed[name], tensor, msg=name)
    assert report["test_accuracy"] == pytest.approx(clean["test_accuracy"])
    assert report["test_accuracy_before"] == pytest.approx(clean["test_accuracy_before"])


def test_cli_finetune_knee_exports_a_loadable_model_and_the_report_shows_it(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    assert main(["finetune", run.location, "--knee", "--backend", "local", *RECIPE]) == 0
    out = capsys.readouterr().out
    knee = int(run.knee()["trial"])
    assert out.startswith(f"trial {knee}:") and "->" in out
    folder = run.store.local_path(ARTEFACTS.finetune_dir(knee))
    figures = json.loads((folder / FINETUNE_FILE).read_text())
    assert figures == run.store.read_json(ARTEFACTS.finetune_result(knee))
    assert {"model.safetensors", "subnet.json", "config.json", FINETUNE_FILE} <= {p.name for p in folder.iterdir()}
    model = fr.load_subnet(folder)
    test = build_datasets(run.config.data).test
    assert accuracy(model, test, torch.device("cpu")) == pytest.approx(figures["test_accuracy"])
    assert json.loads((folder / "subnet.json").read_text())["ranks"] == run.ranks(knee)
    report = run.report
    assert "## Fine-tuned subnets" in report
    assert f"{figures['test_accuracy_before']:.2f} | {figures['test_accuracy']:.2f}" in report
    assert json.loads(run.store.read_text(ARTEFACTS.report_json))["finetune"][0]["trial"] == knee


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "one of the arguments --trial --max-macs --knee is required"),
        (["--trial", "999"], "trial 999 is not a completed trial"),
        (["--knee", "train.epochs=9"], "train.epochs=9 would change the run's results"),
        (["--knee", "finetune.epochs=0"], "finetune.epochs=0 is invalid"),
        (["--max-macs", "1"], "no front point has macs <= "),
        (["--knee", "finetune.trial=1", "finetune.max_macs=1e5"], "give finetune.trial or finetune.max_macs, not both"),
    ],
)
def test_bad_finetune_input_is_one_line_and_exit_2(finished, capsys, args, message):
    run, *_ = finished
    try:
        code = main(["finetune", run.location, "--backend", "local", *args])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not run.store.exists(ARTEFACTS.finetunes)


def test_the_pipeline_stage_finetunes_the_knee_when_enabled(finished, tmp_path):
    """A run made with finetune.enabled=true: the stage fine-tunes the knee point; disabled, it is skipped."""
    run = _copy(finished, tmp_path / "runs" / "api")
    cfg = load_run_config(run.store)
    assert finetune_stage(cfg) == {"skipped": "finetune.enabled is false"}
    enabled = fr.api.resolve_config(cfg, ["finetune.enabled=true", "finetune.epochs=1", "finetune.batch_size=32",
                                          f"run.output_dir={tmp_path / 'runs'}"])  # fmt: skip
    run.store.write_text(ARTEFACTS.run_config, dump_config(enabled))  # as if the run had been made with it
    summary = finetune_stage(enabled)
    assert summary["trial"] == int(run.knee()["trial"]) and summary["epochs"] == 1 and "history" not in summary
    assert run.store.is_file(ARTEFACTS.finetune_result(summary["trial"]))


def test_run_finetune_is_the_command_in_python(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    best = run.best_under(max_macs=float(run.front["macs"].max()))
    report = run.finetune(best, overrides=[*RECIPE, "finetune.epochs=1"], backend="local")
    assert report["trial"] == int(best["trial"]) and report["epochs"] == 1 and len(report["history"]) == 1
    assert fr.load_subnet(report["directory"]) is not None
    with pytest.raises(ValueError, match="give exactly one of --trial N, a budget"):
        run.finetune(best, knee=True)
