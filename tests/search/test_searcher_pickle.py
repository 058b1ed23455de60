"""The search algorithm pickles as Ray Tune pickles it, whatever the installed Optuna keeps in its sampler, and a
search start that failed leaves nothing that breaks the next one. No Ray cluster: Tune's own pickling paths only."""

import math
import pickle
import threading

import optuna
import pytest
from ray import cloudpickle

from flora_ray.backends.ray_tune import optuna_searcher, remove_tuner_state, restore_tuner, start_tuner
from flora_ray.search.sampler import NSGAIISampler
from flora_ray.search.study import SearchProblem, finished_trials, search_budget

GENES = {"blocks.0": 3, "blocks.1": 4}


def _problem(tmp_path, trials=12) -> SearchProblem:
    return SearchProblem(
        header={},
        weights={},
        config={},
        key="k",
        genes=GENES,
        anchors=[{"blocks.0": 0, "blocks.1": 0}],
        trials=trials,
        study_name="pickle-search",
        journal=str(tmp_path / "journal.log"),
        sampler_args={"population_size": 4, "seed": 0},
    )


def _searcher(problem):
    from ray.tune.search import ConcurrencyLimiter

    return ConcurrencyLimiter(optuna_searcher(problem), max_concurrent=2)


def _run_trials(searcher, first: int, count: int) -> list[dict]:
    """Suggest and complete ``count`` trials as Tune's controller does, with made-up objectives."""
    configs = []
    for i in range(first, first + count):
        config = searcher.suggest(f"t{i}")
        assert isinstance(config, dict), config
        macs = float(1 + config["blocks.0"] + config["blocks.1"])
        searcher.on_trial_complete(f"t{i}", {"accuracy": 50.0 + 3 * macs, "macs": macs})
        configs.append(config)
    return configs


def test_the_sampler_pickles_whatever_locks_it_holds_and_gets_new_ones():
    sampler = NSGAIISampler(population_size=4, seed=0)
    # Whatever a future Optuna adds beside 5.1's BaseGASampler._thread_lock: a lock, a re-entrant lock, a thread-local.
    sampler._extra_lock, sampler._extra_rlock, sampler._extra_local = (
        threading.Lock(),
        threading.RLock(),
        threading.local(),
    )
    sampler._extra_lock.acquire()  # a held lock must not travel held
    for dumps in (pickle.dumps, cloudpickle.dumps):
        copy = pickle.loads(dumps(sampler))
        assert isinstance(copy, NSGAIISampler) and copy.population_size == 4
        assert isinstance(copy._extra_lock, type(threading.Lock())) and not copy._extra_lock.locked()
        assert isinstance(copy._extra_rlock, type(threading.RLock()))
        assert isinstance(copy._extra_local, threading.local)
        held = [name for name, value in vars(copy).items() if isinstance(value, type(threading.Lock()))]
        assert all(not getattr(copy, name).locked() for name in held)
    with pytest.raises(TypeError, match="pickle"):  # why the sampler exists: a lock of its own does not pickle
        pickle.dumps(threading.Lock())


def test_optunas_own_sampler_is_what_fails_when_it_holds_a_lock():
    """Optuna >= 5.1's plain NSGAIISampler holds a lock and does not pickle; ours does. On an Optuna without the lock
    both pickle, and this test says so by skipping the first half."""
    plain = optuna.samplers.NSGAIISampler(population_size=4, seed=0)
    has_lock = any(isinstance(v, type(threading.Lock())) for v in vars(plain).values())
    if has_lock:
        with pytest.raises(TypeError, match="pickle"):
            cloudpickle.dumps(plain)
    cloudpickle.dumps(NSGAIISampler(population_size=4, seed=0))


def test_the_search_algorithm_pickles_as_tune_pickles_it_and_goes_on_searching(tmp_path):
    problem = _problem(tmp_path)
    searcher = _searcher(problem)
    # Tuner(...) writes tuner.pkl with ray.cloudpickle at construction; Tune's controller then uses the unpickled copy.
    searcher = cloudpickle.loads(cloudpickle.dumps(searcher))
    first = _run_trials(searcher, 0, 6)
    assert first[0] == problem.anchors[0]  # the anchors come first
    # Every searcher checkpoint: Searcher.save (plain pickle of the searcher's state), restored into a new searcher.
    checkpoint = tmp_path / "searcher-state.pkl"
    searcher.save(str(checkpoint))
    restored = _searcher(problem)
    restored.restore(str(checkpoint))
    second = _run_trials(restored, 6, 6)
    study = problem.load_study()
    assert finished_trials(study) == 12 and len(first + second) == 12
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert {t.values[1] for t in study.trials} <= {float(1 + a + b) for a in range(3) for b in range(4)}
    generation = study.trials[-1].system_attrs.get("NSGAIISampler:generation")
    assert generation is not None and generation >= 1, "NSGA-II never got past its first generation after restore"


def test_a_failed_start_leaves_no_tuner_state_and_an_unreadable_one_is_set_aside(tmp_path):
    experiment = tmp_path / "search"
    experiment.mkdir()

    def failing_build():  # what Tune does when the algorithm does not pickle: opens tuner.pkl, then fails to fill it
        (experiment / "tuner.pkl").write_bytes(b"")
        raise TypeError("cannot pickle '_thread.lock' object")

    with pytest.raises(TypeError, match="_thread.lock"):
        start_tuner(str(experiment), None, failing_build)
    assert not (experiment / "tuner.pkl").exists()
    # A tuner.pkl left by an earlier version's failed start: set aside, so the search starts Tune again.
    (experiment / "tuner.pkl").write_bytes(b"")
    assert restore_tuner(str(experiment), trainable=lambda config: None) is None
    assert not (experiment / "tuner.pkl").exists()
    remove_tuner_state(str(experiment))  # nothing left to remove: no error


def test_the_budget_is_the_requested_trials_capped_at_the_space():
    assert search_budget(500, GENES) == 12 and search_budget(5, GENES) == 5
    assert math.prod(GENES.values()) == 12
