"""Each configuration is evaluated once: NSGA-II's repeated proposals are answered from the first evaluation (told
to the study, no evaluation, no trial budget), the trials table and the front hold distinct configurations, and a
budget larger than the space is capped at its size. On a small space (2 blocks of 8 triples: 64 configurations)
where NSGA-II repeats itself often."""

import json

import pytest

import flora_ray as fr
from flora_ray.backends.local import LocalBackend
from flora_ray.config import config_to_dict
from flora_ray.search.study import DUPLICATE_OF
from flora_ray.stages.inputs import build_run_supernet
from flora_ray.stages.search import search_problem, search_stage
from flora_ray.stages.training import save_stage_outputs, train_worker
from flora_ray.storage.run_store import ARTEFACTS, RunStore
from flora_ray.training.trainer import LocalSession

pytestmark = pytest.mark.slow


@pytest.fixture
def small_space_run(digits_config, tmp_path):
    def make(*overrides):
        cfg = digits_config("model.ratios=[0.5, 1.0]", "pretrain.epochs=2", "search.population=6",
                            "search.eval_images=100", "search.concurrency=1", *overrides)  # fmt: skip
        session = LocalSession(tmp_path / "ckpt")
        train_worker({"config": config_to_dict(cfg), "stage": "pretrain", "run": str(cfg.run.run_dir)}, session)
        store = RunStore(cfg.run.run_dir)
        save_stage_outputs(tmp_path / "ckpt" / "latest", store, "pretrain")
        supernet, _ = build_run_supernet(cfg, store)
        fr.save_supernet(supernet, cfg.run.run_dir / ARTEFACTS.supernet)
        return cfg, store

    return make


def test_repeated_proposals_are_answered_not_evaluated(small_space_run):
    cfg, store = small_space_run("search.trials=40")
    summary = search_stage(cfg, LocalBackend())
    trials = fr.Run(store).trials
    assert len(trials) == 40 and (trials["state"] == "COMPLETE").all()
    assert trials["ranks"].is_unique and trials["duplicate_of"].isna().all()  # 40 evaluations, 40 configurations
    study = search_problem(cfg, store).load_study()
    answered = [t for t in study.trials if DUPLICATE_OF in t.user_attrs]
    assert summary["repeats_answered"] == len(answered) > 0 and len(study.trials) == 40 + len(answered)
    assert summary["distinct_configurations"] == 40
    first = {t.number: t for t in study.trials}
    for t in answered:  # told the values of the first evaluation of the same configuration
        original = first[t.user_attrs[DUPLICATE_OF]]
        assert t.params == original.params and t.values == original.values
        assert t.user_attrs["macs"] == original.user_attrs["macs"]
    front = fr.Run(store).front
    assert front["ranks"].is_unique and set(front["trial"]) <= set(trials["trial"])
    written = store.read_json(ARTEFACTS.search_summary)
    assert written["distinct_configurations"] == 40 and written["repeats_answered"] == len(answered)


def test_a_budget_larger_than_the_space_is_capped(small_space_run):
    cfg, store = small_space_run("search.trials=500")
    assert search_problem(cfg, store).trials == 64
    search_stage(cfg, LocalBackend())
    trials = fr.Run(store).trials
    assert len(trials) == 64 and trials["ranks"].is_unique  # the whole space, each configuration once
    ranks = {json.dumps(json.loads(r), sort_keys=True) for r in trials["ranks"]}
    assert len(ranks) == 64
