"""BatchNorm statistics per subnet (``core.batchnorm``): recalibration against statistics computed by hand, a no-op
without BatchNorm (ViT: the evaluator's accuracies and cost unchanged), per-candidate statistics in filtering, and
an exported LeViT subnet that carries its recalibrated statistics."""

import random

import pytest
import torch
from helpers import TINY_MODELS, input_for, random_config, randomise_batchnorm
from torch import nn
from torch.utils.data import TensorDataset

import flora_ray as fr
from flora_ray.config import load_config
from flora_ray.core.batchnorm import (
    BatchNormCalibration,
    batchnorm_layers,
    batchnorm_state,
    has_batchnorm,
    load_batchnorm_state,
    recalibrate_batchnorm,
)
from flora_ray.search import evaluator as evaluator_module
from flora_ray.search.evaluator import Evaluator, batchnorm_calibration
from flora_ray.search.filtering import score_candidates

EPS = 1e-5


def _toy_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8, eps=EPS), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3), nn.BatchNorm1d(3)
    )
    with torch.no_grad():
        for bn in (model[1], model[5]):  # deliberately wrong statistics
            bn.running_mean.fill_(5.0)
            bn.running_var.fill_(100.0)
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
    return model.eval()


def _stats_by_hand(batches):
    """Mean over batches of the batch mean and unbiased batch variance of each BatchNorm's inputs, with the
    BatchNorm normalising by batch statistics and the dropout off, as in recalibration."""
    model = _toy_model()
    first, second = [], []
    for x in batches:
        z1 = model[0](x)
        first.append((z1.mean(0), z1.var(0, unbiased=True)))
        h = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + EPS) * model[1].weight + model[1].bias
        z2 = model[4](torch.relu(h))
        second.append((z2.mean(0), z2.var(0, unbiased=True)))
    return [(torch.stack([m for m, _ in s]).mean(0), torch.stack([v for _, v in s]).mean(0)) for s in (first, second)]


@torch.no_grad()
def test_recalibration_gives_the_statistics_computed_by_hand_and_restores_the_modes():
    images = torch.randn(30, 4) * 3 + 1
    model = _toy_model()
    x = torch.randn(5, 4)
    before = model(x)
    assert recalibrate_batchnorm(model, images, batch_size=10) is True
    expected = _stats_by_hand(images.split(10))
    for bn, (mean, var) in zip((model[1], model[5]), expected, strict=True):
        torch.testing.assert_close(bn.running_mean, mean)
        torch.testing.assert_close(bn.running_var, var)
        assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 3
    assert not any(m.training for m in model.modules())  # eval mode restored everywhere
    z1 = model[0](x)
    h = torch.relu((z1 - expected[0][0]) / torch.sqrt(expected[0][1] + EPS) * model[1].weight + model[1].bias)
    z2 = model[4](h)
    by_hand = (z2 - expected[1][0]) / torch.sqrt(expected[1][1] + EPS) * model[5].weight + model[5].bias
    torch.testing.assert_close(model(x), by_hand)
    assert (model(x) - before).abs().max() > 0.1  # the wrong statistics did matter


def test_recalibration_keeps_a_training_model_training_and_checks_its_batch_size():
    model = _toy_model().train()
    recalibrate_batchnorm(model, torch.randn(8, 4), batch_size=4)
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="batch_size=0"):
        recalibrate_batchnorm(model, torch.randn(8, 4), batch_size=0)


def test_a_model_without_batchnorm_is_not_run():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert not has_batchnorm(model)
    assert recalibrate_batchnorm(model, torch.randn(8, 4), batch_size=4) is False
    assert calls == [] and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_vit_evaluator_is_unchanged_and_loads_no_images(monkeypatch):
    name, kwargs = TINY_MODELS["vit"]
    supernet = fr.build_supernet(name, model_kwargs=kwargs).eval()
    assert not has_batchnorm(supernet.model)
    images = input_for(supernet.model, batch=12)
    labels = torch.randint(0, 10, (12,))
    calls = []
    supernet.model.register_forward_hook(lambda *args: calls.append(1))
    plain = Evaluator(supernet, images, labels, batch_size=6)
    calibrated = Evaluator(supernet, images, labels, batch_size=6, calibration=BatchNormCalibration(images, 4))
    for config in (supernet.space.smallest(), random_config(supernet.space, random.Random(0))):
        calls.clear()
        assert calibrated.accuracy(config) == plain.accuracy(config)
        assert len(calls) == 4  # two batches each: no recalibration pass ran
    monkeypatch.setattr("flora_ray.data.datasets.calibration_images", _no_images)
    cfg = load_config(None, ["model.name=test_vit", "data.name=digits"])
    assert cfg.search.bn_recalibration_images > 0
    assert batchnorm_calibration(cfg, supernet.model) is None  # no data loaded for a model without BatchNorm
    assert evaluator_module.batchnorm_calibration is batchnorm_calibration


def _no_images(*args, **kwargs):
    raise AssertionError("a model without BatchNorm must not load recalibration images")


def _levit_supernet():
    name, kwargs = TINY_MODELS["levit"]
    dense = randomise_batchnorm(fr.create_model(name, **kwargs)).eval()
    return fr.build_supernet(dense, model_name=name, model_kwargs=kwargs, ratios=[0.25, 1.0]).eval()


@torch.no_grad()
def test_levit_low_rank_subnet_changes_and_its_export_carries_the_statistics(tmp_path):
    supernet = _levit_supernet()
    calibration = BatchNormCalibration(input_for(supernet.model, batch=16) * 2 + 0.5, batch_size=8)
    x = input_for(supernet.model, batch=4)
    config = supernet.space.smallest()
    supernet.set_ranks(config)
    shared = supernet(x)
    means = [bn.running_mean.clone() for bn in batchnorm_layers(supernet.model).values()]
    assert calibration(supernet.model)
    assert (supernet(x) - shared).abs().max() > 1e-2 * shared.abs().max()
    assert all(
        not torch.equal(m, bn.running_mean)
        for m, bn in zip(means, batchnorm_layers(supernet.model).values(), strict=True)
    )
    loaded = fr.load_subnet(fr.save_subnet(supernet, config, tmp_path / "smallest"))
    torch.testing.assert_close(loaded(x), supernet(x), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_levit_search_trials_score_each_subnet_with_its_own_statistics():
    """``Evaluator.evaluate`` (search trials, uniform baselines) recalibrates like ``accuracy``: a subnet's per-image
    results are those of its recalibrated extracted model, whichever subnet was scored before it."""
    supernet = _levit_supernet()
    statistics = batchnorm_state(supernet.model)
    images = input_for(supernet.model, batch=64) * 2 + 0.5
    calibration = BatchNormCalibration(images[:32], batch_size=8)
    smallest, largest = supernet.space.smallest(), supernet.space.largest()
    supernet.set_ranks(smallest)
    calibration(supernet.model)
    labels = supernet(images).argmax(-1)  # the recalibrated smallest subnet's own answers: 100% for it alone
    subnet = fr.core.subnet.extract_subnet(supernet, smallest).eval()
    load_batchnorm_state(supernet.model, statistics)  # the supernet's shared statistics again
    shared = Evaluator(supernet, images, labels, batch_size=16).evaluate(smallest)
    evaluator = Evaluator(supernet, images, labels, batch_size=16, calibration=calibration)
    assert shared["accuracy"] < 90.0  # the shared statistics answer otherwise: the check below can fail
    before = evaluator.evaluate(smallest)
    evaluator.evaluate(largest)
    again = evaluator.evaluate(smallest)
    assert before["accuracy"] == again["accuracy"] == 100.0  # not the statistics the previous trial left behind
    assert evaluator.model_metrics(subnet)["correct"] == before["correct"]


def test_levit_filter_scores_each_candidate_with_its_own_statistics():
    supernet = _levit_supernet()
    images = input_for(supernet.model, batch=24)
    recalibrate_batchnorm(supernet.model, input_for(supernet.model, batch=16), 8)  # shared statistics of real scale
    with torch.no_grad():  # labels: the full-rank subnet's own answers with the shared statistics (100% plain)
        labels = supernet(images).argmax(-1)
    calibration = BatchNormCalibration(input_for(supernet.model, batch=8) * 2, batch_size=8)
    block = 1  # stages.1.downsample: blocks before it share the full-rank prefix
    shared = {k: v.clone() for k, v in supernet.state_dict().items()}
    scores = score_candidates(
        supernet, block, TensorDataset(images, labels), "cpu", batch_size=12, calibration=calibration
    )
    assert all(torch.equal(v, supernet.state_dict()[k]) for k, v in shared.items())  # the supernet's own are back
    plain = score_candidates(supernet, block, TensorDataset(images, labels), "cpu", batch_size=12)
    evaluator = Evaluator(supernet, images, labels, batch_size=12, calibration=calibration)
    full = supernet.space.largest()
    names = supernet.space.blocks[block].fqns
    expected = [
        evaluator.accuracy({**full, **dict(zip(names, c, strict=True))})
        for c in supernet.space.blocks[block].candidates
    ]
    assert scores == pytest.approx(expected, abs=1e-9)  # prefix cache + saved statistics == a recalibrated forward
    assert len(set(labels.tolist())) > 1 and len(set(scores)) > 1 and plain[-1] == 100.0  # full rank is the last
    assert scores != plain


def test_the_option_is_validated():
    with pytest.raises(ValueError, match="search.bn_recalibration_images=-1"):
        load_config(None, ["model.name=test_vit", "data.name=digits", "search.bn_recalibration_images=-1"])
    with pytest.raises(ValueError, match="search.bn_recalibration_images"):
        load_config(None, ["model.name=test_vit", "data.name=digits", "search.bn_recalibration_images=1.5"])
