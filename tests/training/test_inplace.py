"""In-place distillation (``train.distill_from: largest``) and the teacher mode it must leave unchanged: one step's
loss and gradients against a hand computation, the forward passes a step costs, and teacher mode bit for bit
against today's step."""

import contextlib

import pytest
import timm
import torch
import torch.nn.functional as F

import flora_ray as fr
from flora_ray.config import DataConfig, OptimConfig, TrainConfig
from flora_ray.data.datasets import build_datasets
from flora_ray.training.optim import distillation_loss, inplace_distillation_loss
from flora_ray.training.sampling import build_sampler, step_generator
from flora_ray.training.tasks import SupernetTask
from flora_ray.training.trainer import Callback, LocalSession, Trainer
from flora_ray.training.worker import distributed_loader

KWARGS = {"img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 10, "depth": 2, "embed_dim": 16}


def _models(seed: int = 0):
    """A tiny supernet and a dense teacher of the same shape with other (random) weights."""
    torch.manual_seed(seed)
    supernet = fr.build_supernet("test_vit", model_kwargs=KWARGS)
    teacher = timm.create_model("test_vit", **KWARGS).eval()
    return supernet, teacher


def _trainer(task, images: int = 64, batch_size: int = 16, epochs: int = 1, callbacks=()):
    data = build_datasets(DataConfig(name="digits", img_size=8, in_chans=1, augment=False)).train
    data = torch.utils.data.Subset(data, range(images))
    loader, sampler = distributed_loader(data, batch_size, 1, 0, seed=0, what="test")
    opt = OptimConfig(epochs=epochs, batch_size=batch_size, lr=1e-3, warmup_epochs=0)
    return Trainer(task, opt, LocalSession(), loader, "t", callbacks, train_sampler=sampler, evaluate=False)


def _batch(trainer):
    x, y = next(iter(trainer.loader))
    return x.float(), y


def test_inplace_loss_is_the_kl_divergence_to_the_detached_target():
    torch.manual_seed(1)
    student, target = torch.randn(5, 7, requires_grad=True), torch.randn(5, 7, requires_grad=True)
    t = 2.5
    p, log_q = torch.softmax(target / t, -1), torch.log_softmax(student / t, -1)
    by_hand = (p * (p.log() - log_q)).sum(-1).mean() * t * t
    loss = inplace_distillation_loss(student, target, t)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert loss.item() == pytest.approx(
        (F.kl_div(log_q, torch.log_softmax(target / t, -1), log_target=True, reduction="batchmean") * t * t).item(),
        rel=1e-6,
    )
    loss.backward()
    assert target.grad is None  # the target is detached inside the loss
    # Its gradient is the soft cross-entropy's (they differ by the target's entropy, a constant).
    soft = distillation_loss(student, target.detach(), torch.zeros(5, dtype=torch.long), t)
    (expected,) = torch.autograd.grad(soft, student)
    torch.testing.assert_close(student.grad, expected)


def _hand_step(supernet, teacher, configs, x, y, temperature, label_weight, detach=True):
    """One in-place step written out: the largest on the teacher loss, the rest KL to its (detached) logits."""
    supernet.set_ranks(configs[0])
    with torch.no_grad():
        teacher_logits = teacher(x)
    largest = supernet(x)
    losses = [distillation_loss(largest, teacher_logits, y, temperature, label_weight)]
    target = largest.detach() if detach else largest
    for config in configs[1:]:
        supernet.set_ranks(config)
        log_q = torch.log_softmax(supernet(x) / temperature, -1)
        log_p = torch.log_softmax(target / temperature, -1)
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature**2
        losses.append(kl)
    total = sum(losses) / len(losses)
    params = [p for p in supernet.parameters() if p.requires_grad]
    return total.item(), torch.autograd.grad(total, params, allow_unused=True), losses


def test_one_inplace_step_equals_a_hand_computation_and_the_target_is_detached():
    supernet, teacher = _models()
    sampler = build_sampler("uniform", supernet.space)
    task = SupernetTask(supernet, teacher, sampler, seed=3, temperature=2.0, label_weight=0.5, distill_from="largest")
    trainer = _trainer(task)
    x, y = _batch(trainer)
    drawn = sampler.sample(step_generator(3, 0, 0))
    assert drawn[0] != supernet.space.largest()
    configs = task.step_configs(0, 0)
    assert configs == [supernet.space.largest(), drawn[0]]
    expected, grads, losses = _hand_step(supernet, teacher, configs, x, y, 2.0, 0.5)
    assert losses[1].item() > 0  # the sampled subnet does not predict what the largest does
    trainer.optimizer.zero_grad(set_to_none=True)
    loss = task.train_step(trainer, 0, x, y)
    assert loss == pytest.approx(expected, rel=1e-5)
    params = [p for p in supernet.parameters() if p.requires_grad]
    for param, grad in zip(params, grads, strict=True):
        torch.testing.assert_close(param.grad, torch.zeros_like(param) if grad is None else grad)
    # Were the target not detached, the sampled subnet's loss would also push the largest subnet: other gradients.
    _, attached, _ = _hand_step(supernet, teacher, configs, x, y, 2.0, 0.5, detach=False)
    assert any(a is not None and not torch.allclose(p.grad, a) for p, a in zip(params, attached, strict=True)), (
        "the test cannot tell a detached target from an attached one"
    )


class Forwards(Callback):
    """Counts the teacher's and the supernet's forward passes and the step's configurations."""

    def __init__(self, teacher, supernet) -> None:
        self.teacher = self.student = self.steps = 0
        self.configs: list[list[dict[str, int]]] = []
        teacher.register_forward_hook(lambda *_: setattr(self, "teacher", self.teacher + 1))
        supernet.model.register_forward_hook(lambda *_: setattr(self, "student", self.student + 1))

    def on_configs(self, trainer, step, configs) -> None:
        self.configs.append(list(configs))

    def on_step_end(self, trainer, step, images) -> None:
        self.steps += 1


@pytest.mark.parametrize(
    ("sampler", "distill_from", "per_step"),
    [("sandwich", "largest", 3), ("sandwich", "teacher", 3), ("lowrank", "largest", None), ("lowrank", "teacher", 1)],
)
def test_a_step_costs_one_teacher_forward_and_one_forward_per_subnet(sampler, distill_from, per_step):
    supernet, teacher = _models()
    task = SupernetTask(supernet, teacher, build_sampler(sampler, supernet.space), seed=0, distill_from=distill_from)
    count = Forwards(teacher, supernet)
    _trainer(task, images=96, callbacks=[count]).fit()
    assert count.steps == 6 and count.teacher == count.steps  # once per step, however many subnets it trains
    largest = supernet.space.largest()
    for configs in count.configs:
        assert (configs[0] == largest) == (distill_from == "largest" or sampler == "sandwich")
        assert configs.count(largest) <= 1  # sandwich's own largest is the in-place target: never run twice
    sizes = [len(c) for c in count.configs]
    assert count.student == sum(sizes)
    if per_step is not None:
        assert sizes == [per_step] * count.steps
    else:  # the largest and the draw, or the largest alone when the draw is the largest
        assert all(n == (1 if c[-1] == largest else 2) for n, c in zip(sizes, count.configs, strict=True))


def test_the_plan_counts_every_subnet_a_step_trains():
    """``flora-ray plan``'s training MACs: one teacher forward per image and forward + backward (3 forwards) of each
    subnet of the step (the counts the test above observes), at the mean uniform cost."""
    from flora_ray.config import load_config
    from flora_ray.plan import Workload
    from flora_ray.stages.training import train_work

    workload = Workload(train_images=100, dense_macs=10.0, mean_macs=4.0, blocks=2, candidates=8, profile_items=0)

    def work(*overrides):
        return train_work(load_config(None, ["train.epochs=2", *overrides]), workload=workload)

    assert work() == work("train.recipe=uniform") == 2 * 100 * (10 + 3 * 4)
    assert work("train.recipe=sandwich") == work("train.recipe=sandwich_inplace") == 2 * 100 * (10 + 3 * 3 * 4)
    assert work("train.distill_from=largest") == 2 * 100 * (10 + 3 * 2 * 4)


class TodaysSupernetTask(SupernetTask):
    """The supernet step as it was before ``distill_from`` (the main branch's code path, copied): the trusted
    reference for teacher mode."""

    def train_step(self, trainer, step, x, y):
        configs = self.sampler.sample(step_generator(self.seed, trainer.epoch, step))
        trainer.emit("on_configs", step, configs)
        with torch.no_grad(), trainer.autocast():
            teacher_logits = self.teacher(x)
        total = 0.0
        no_sync = getattr(trainer.model, "no_sync", None)
        for i, config in enumerate(configs):
            self.supernet.set_ranks(config)
            last = i == len(configs) - 1
            context = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
            with context:
                with trainer.autocast():
                    logits = trainer.model(x)
                loss = distillation_loss(logits, teacher_logits, y, *self.loss_args)
                trainer.backward(loss / len(configs))
            total += loss.item() / len(configs)
        return total


@pytest.mark.parametrize("sampler", ["lowrank", "sandwich"])
def test_teacher_mode_is_bit_identical_to_todays_step(sampler):
    cfg = TrainConfig(sampler=sampler)  # today's default recipe otherwise
    assert cfg.distill_from == "teacher" and TrainConfig().sampler == "lowrank"
    states, losses = [], []
    for task_class, kwargs in ((TodaysSupernetTask, {}), (SupernetTask, {"distill_from": cfg.distill_from})):
        supernet, teacher = _models(seed=5)
        task = task_class(supernet, teacher, build_sampler(cfg.sampler, supernet.space), 7, 2.0, 0.3, **kwargs)
        history = _trainer(task, images=96, epochs=2).fit()
        states.append(supernet.model.state_dict())
        losses.append([h["loss"] for h in history])
    assert losses[0] == losses[1]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    supernet, _ = _models(seed=5)  # and the steps did train: the weights moved
    assert not torch.equal(supernet.model.state_dict()["head.weight"], states[0]["head.weight"])


@pytest.mark.slow
def test_a_digits_supernet_trains_with_the_sandwich_inplace_recipe(digits_config):
    """The train stage on the local backend (``train_worker``, as each Ray Train worker runs it), recipe
    ``sandwich_inplace``: the run records the resolved recipe and every epoch's largest and smallest accuracies."""
    import yaml

    from flora_ray.backends.local import LocalBackend
    from flora_ray.stages.training import fit_stage
    from flora_ray.storage.run_store import ARTEFACTS, RunStore

    cfg = digits_config(
        "pretrain.epochs=8", "pretrain.lr=0.003", "pretrain.batch_size=32", "train.recipe=sandwich_inplace",
        "train.epochs=3", "train.batch_size=32", "train.lr=0.001",
    )  # fmt: skip
    teacher = fit_stage(cfg, LocalBackend(), "pretrain")["metrics"]
    fit_stage(cfg, LocalBackend(), "train")
    store = RunStore.for_config(cfg)
    recorded = yaml.safe_load(store.read_text(ARTEFACTS.run_config))["train"]
    assert (recorded["recipe"], recorded["sampler"], recorded["distill_from"]) == (
        "sandwich_inplace",
        "sandwich",
        "largest",
    )
    history = store.read_json(ARTEFACTS.history("train"))
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for h in history:
        assert 0 <= h["search_acc_smallest"] <= 100 and 0 <= h["search_acc_largest"] <= 100
    assert history[-1]["loss"] < history[0]["loss"]
    # The largest subnet keeps close to the teacher it starts as (chance is 10%); the smallest learns from it.
    assert history[-1]["search_acc_largest"] > 40 and teacher["search_acc"] > 40
    assert history[-1]["search_acc_smallest"] > 20
