"""The training input pipeline: loader worker processes, results independent of their number, and gradient
accumulation that equals the larger batch."""

import copy

import psutil
import pytest
import torch

import flora_ray as fr
from flora_ray.config import DataConfig, OptimConfig, config_to_dict
from flora_ray.data.datasets import build_datasets
from flora_ray.stages.training import train_worker
from flora_ray.training.sampling import BlockwiseSampler, config_digest
from flora_ray.training.tasks import DenseTask, SupernetTask
from flora_ray.training.trainer import Callback, LocalSession, Trainer
from flora_ray.training.worker import distributed_loader, loader_workers


class ChildProcesses(Callback):
    """Records the pids of the children this process started during training, at every step (the loader's worker
    processes; children that existed before the fit, e.g. of other tests, are not counted)."""

    def __init__(self) -> None:
        self.pids: list[set[int]] = []
        self.before: set[int] = set()

    def on_fit_start(self, trainer) -> None:
        self.before = {p.pid for p in psutil.Process().children()}

    def on_step_end(self, trainer, step, images) -> None:
        self.pids.append({p.pid for p in psutil.Process().children()} - self.before)


def _pretrain(cfg, directory):
    session = LocalSession(directory)
    counter = ChildProcesses()
    session.callbacks = [counter]  # a test session may add callbacks (Trainer reads session.callbacks)
    train_worker({"config": config_to_dict(cfg), "stage": "pretrain", "run": str(cfg.run.run_dir)}, session)
    return session.reports, counter.pids


def test_loader_workers_are_used_and_training_does_not_depend_on_their_number(digits_config, tmp_path):
    """Augmented digits (random crops and flips drawn per item): 0 and 2 loader workers give identical losses and
    accuracies; with 2 the loader's two processes exist at every step and persist across epochs."""
    overrides = ["data.augment=true", "pretrain.epochs=2", "pretrain.batch_size=64"]
    reports0, pids0 = _pretrain(digits_config(*overrides, "data.workers=0"), tmp_path / "w0")
    reports2, pids2 = _pretrain(digits_config(*overrides, "data.workers=2"), tmp_path / "w2")
    assert all(len(p) == 0 for p in pids0)
    assert all(len(p) == 2 for p in pids2) and len(set().union(*pids2)) == 2  # the same two, both epochs
    keys = ("loss", "search_acc", "test_acc")
    assert [[r.get(k) for k in keys] for r in reports0] == [[r.get(k) for k in keys] for r in reports2]
    assert reports0[0]["loss"] != reports0[1]["loss"]


def test_default_loader_workers_follow_the_reserved_cpus():
    assert [loader_workers(None, c) for c in (0, 0.5, 1, 2, 8)] == [0, 0, 0, 1, 7]
    assert loader_workers(3, 8) == 3 and loader_workers(0, 8) == 0


def _dense_run(batch_size: int, accumulate: int):
    torch.manual_seed(0)
    net = fr.create_model("test_vit", img_size=8, patch_size=2, in_chans=1, num_classes=10, depth=1, embed_dim=16)
    data = build_datasets(DataConfig(name="digits", img_size=8, in_chans=1, augment=False)).train
    opt = OptimConfig(epochs=2, batch_size=batch_size, accumulate=accumulate, lr=1e-3, warmup_epochs=0.5)
    loader, sampler = distributed_loader(data, batch_size, 1, 0, seed=0, what="test")
    trainer = Trainer(DenseTask(net, 0.0), opt, LocalSession(), loader, "t", train_sampler=sampler, evaluate=False)
    history = trainer.fit()
    return net.state_dict(), history, trainer.global_step


def test_gradient_accumulation_equals_the_larger_batch():
    big, big_history, big_steps = _dense_run(32, 1)
    small, small_history, small_steps = _dense_run(8, 4)
    assert big_steps == small_steps > 0
    for name, value in big.items():
        torch.testing.assert_close(small[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert [h["loss"] for h in small_history] == pytest.approx([h["loss"] for h in big_history], rel=1e-4)


def test_an_accumulated_step_trains_one_subnet_for_all_its_batches():
    supernet = fr.build_supernet(
        "test_vit",
        model_kwargs={"img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 10, "depth": 2, "embed_dim": 16},
    )
    teacher = copy.deepcopy(supernet.model).eval()
    seen: list[tuple[int, str]] = []

    class Record(Callback):
        def on_configs(self, trainer, step, configs):
            seen.append((step, config_digest(configs[0])))

    data = build_datasets(DataConfig(name="digits", img_size=8, in_chans=1, augment=False)).train
    loader, sampler = distributed_loader(data, 16, 1, 0, seed=0, what="test")
    opt = OptimConfig(epochs=1, batch_size=16, accumulate=3, lr=1e-3, warmup_epochs=0)
    task = SupernetTask(supernet, teacher, BlockwiseSampler(supernet.space, "uniform"), seed=0)
    trainer = Trainer(task, opt, LocalSession(), loader, "t", [Record()], train_sampler=sampler, evaluate=False)
    trainer.fit()
    assert len(seen) == 3 * trainer.steps_per_epoch == 3 * (len(loader) // 3)
    for step in range(trainer.steps_per_epoch):
        group = seen[3 * step : 3 * step + 3]
        assert {s for s, _ in group} == {step} and len({d for _, d in group}) == 1
    assert len({d for _, d in seen}) > 1  # different steps draw different subnets
