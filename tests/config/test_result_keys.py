"""Which config keys change results (field metadata), and the recipe keys each training section accepts."""

import dataclasses

import pytest

from flora_ray.config import (
    Config,
    FilterConfig,
    OptimConfig,
    PretrainConfig,
    TrainConfig,
    TrainStageConfig,
    changed_result_keys,
    config_to_dict,
    dotted_value,
    load_config,
    speed_only_keys,
)

# The keys that may differ between commands on one run directory (speed or placement only).
SPEED_ONLY = {
    "run.output_dir",
    "run.storage",
    "run.max_failures",
    "run.threads_per_worker",
    "data.workers",  # every item's random draws are seeded by (seed, epoch, index): tests/training
    "data.decoders",
    "scaling",
    "tracking",
    "notify",
    "pretrain.log_every",
    "pretrain.checkpoint_every",
    "pretrain.checkpoint_every_steps",
    "filter.concurrency",
    "filter.cpus_per_task",
    "filter.log_every",
    "train.recipe",  # a name: the sampler and distill_from it sets are compared
    "train.log_every",
    "train.checkpoint_every",
    "train.checkpoint_every_steps",
    "search.concurrency",
    "search.cpus_per_trial",
    "search.gpus_per_trial",
    "search.batch_size",
    "finetune.log_every",
    "finetune.checkpoint_every",
    "finetune.checkpoint_every_steps",
    "refine.concurrency",
}


def _changed(*overrides):
    return changed_result_keys(config_to_dict(Config()), config_to_dict(load_config(None, overrides)))


def test_the_metadata_marks_exactly_the_speed_only_keys():
    keys = speed_only_keys()
    assert len(keys) == len(set(keys)) and set(keys) == SPEED_ONLY


@pytest.mark.parametrize(
    "overrides",
    [
        ["search.concurrency=1"],
        ["scaling.num_workers=7", "scaling.resources_per_worker={TPU: 1}"],
        ["run.output_dir=/elsewhere", "run.storage=s3://bucket/x", "run.threads_per_worker=4"],
        ["train.log_every=3", "train.checkpoint_every=5", "pretrain.checkpoint_every=2", "filter.log_every=9"],
        ["filter.concurrency=8", "filter.cpus_per_task=4", "search.batch_size=64", "search.gpus_per_trial=0.5"],
    ],
)
def test_speed_only_changes_are_not_result_changes(overrides):
    assert _changed(*overrides) == []


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        (["train.lr=0.01"], ["train.lr"]),
        (["search.eval_images=100", "run.seed=3", "filter.amp=fp16"], ["filter.amp", "run.seed", "search.eval_images"]),
        (["model.kwargs={depth: 2}"], ["model.kwargs"]),  # compared as one value
        (["data.name=digits", "search.concurrency=1"], ["data.img_size", "data.name"]),  # digits are 8 px
        (["train.label_smoothing=0.1", "pretrain.amp=bf16"], ["pretrain.amp", "train.label_smoothing"]),
    ],
)
def test_result_changes_are_listed_sorted(overrides, keys):
    assert _changed(*overrides) == keys


def test_keys_the_schema_does_not_know_count_as_changes():
    new = config_to_dict(Config())
    old = config_to_dict(Config())
    old["filter"]["label_smoothing"] = 0.0  # written by an older version
    old["extra"] = {"a": 1}
    assert changed_result_keys(old, new) == ["extra.a", "filter.label_smoothing"]
    del old["search"]  # a whole section missing: its result keys changed, its speed-only keys not
    changed = changed_result_keys(old, new)
    assert "search.trials" in changed and "search.concurrency" not in changed
    assert dotted_value(old, "filter.label_smoothing") == 0.0 and dotted_value(new, "filter.label_smoothing") is None
    assert dotted_value(new, "model.kwargs") == {} and dotted_value(new, "search.trials") == 200


def test_a_run_directory_refuses_result_changes_only(tmp_path):
    from flora_ray.stages.inputs import claim_run as claim_run_dir

    def config(*overrides):
        return load_config(None, [f"run.output_dir={tmp_path}", *overrides])

    claim_run_dir(config())
    claim_run_dir(config("search.concurrency=1", "scaling.num_workers=1"))
    with pytest.raises(ValueError, match=r"different configuration \(train.lr: 0.0005 -> 0.01\)"):
        claim_run_dir(config("train.lr=0.01"))


def _recorded_before_upgrade(**sections):
    """A configuration as an earlier flora-ray recorded it: without the keys added since."""
    old = config_to_dict(Config())
    added = ("model.tome_r", "filter.cost_floor", "filter.cost_bins", "search.bn_recalibration_images")
    for key in (*added, "train.recipe", "train.distill_from"):
        section, name = key.split(".")
        del old[section][name]
    del old["finetune"]
    for dotted, value in sections.items():
        section, name = dotted.split("__")
        old[section][name] = value
    return old


def test_keys_added_later_compare_by_what_their_absence_meant():
    old = _recorded_before_upgrade()
    # tome_r 0, no floor, no bins and no finetune stage are what earlier runs did; recalibration was off.
    assert changed_result_keys(old, config_to_dict(Config())) == ["search.bn_recalibration_images"]
    new = config_to_dict(load_config(None, ["search.bn_recalibration_images=0"]))
    assert changed_result_keys(old, new) == []
    enabled = config_to_dict(load_config(None, ["search.bn_recalibration_images=0", "finetune.enabled=true"]))
    assert changed_result_keys(old, enabled) == ["finetune.enabled"]
    floor = config_to_dict(load_config(None, ["search.bn_recalibration_images=0", "model.tome_r=2"]))
    assert changed_result_keys(old, floor) == ["model.tome_r"]
    # Recorded but different still counts, and a key without a recorded meaning still counts when absent.
    old["model"]["tome_r"] = 1
    del old["train"]["sampler"]
    assert changed_result_keys(old, new) == ["model.tome_r", "train.sampler"]


def test_runs_recorded_before_recipes_continue_with_the_recipe_they_used():
    """A run recorded before ``train.recipe`` and ``train.distill_from`` trained from the teacher, with its sampler."""
    old = _recorded_before_upgrade(search__bn_recalibration_images=0, train__sampler="sandwich")
    same = config_to_dict(load_config(None, ["search.bn_recalibration_images=0", "train.sampler=sandwich"]))
    assert changed_result_keys(old, same) == []
    named = config_to_dict(load_config(None, ["search.bn_recalibration_images=0", "train.recipe=sandwich"]))
    assert changed_result_keys(old, named) == []  # the same training, by its name
    inplace = config_to_dict(load_config(None, ["search.bn_recalibration_images=0", "train.recipe=sandwich_inplace"]))
    assert changed_result_keys(old, inplace) == ["train.distill_from"]


def test_an_upgraded_run_is_refused_with_the_value_that_continues_it(tmp_path):
    import yaml

    from flora_ray.stages.inputs import claim_run as claim_run_dir

    cfg = load_config(None, [f"run.output_dir={tmp_path}"])
    store = claim_run_dir(cfg)
    path = tmp_path / cfg.run.name / "run_config.yaml"
    assert path.is_file()
    path.write_text(yaml.safe_dump(_recorded_before_upgrade()))
    with pytest.raises(ValueError, match=r"search.bn_recalibration_images: not recorded \(behaved as 0\) -> 500; "
                       r"search.bn_recalibration_images=0 continues it"):  # fmt: skip
        claim_run_dir(cfg)
    resumed = claim_run_dir(load_config(None, [f"run.output_dir={tmp_path}", "search.bn_recalibration_images=0"]))
    assert resumed.root == store.root and "bn_recalibration_images" not in path.read_text()


# --- the recipe keys of pretrain, filter and train ------------------------------------------------------------------


def _names(cls):
    return {f.name for f in dataclasses.fields(cls)}


def test_filter_has_the_shared_recipe_keys_only():
    shared = {
        "epochs",
        "batch_size",
        "accumulate",
        "lr",
        "min_lr",
        "weight_decay",
        "warmup_epochs",
        "clip_grad",
        "amp",
        "log_every",
    }
    assert _names(OptimConfig) == shared
    assert _names(TrainStageConfig) == shared | {"label_smoothing", "checkpoint_every", "checkpoint_every_steps"}
    assert issubclass(PretrainConfig, TrainStageConfig) and issubclass(TrainConfig, TrainStageConfig)
    assert issubclass(FilterConfig, OptimConfig) and not issubclass(FilterConfig, TrainStageConfig)
    assert _names(FilterConfig) & {"label_smoothing", "checkpoint_every", "checkpoint_every_steps"} == set()


@pytest.mark.parametrize(("key", "value"), [("label_smoothing", 0.1), ("checkpoint_every", 2)])
def test_filter_rejects_the_keys_it_would_ignore(key, value):
    with pytest.raises(ValueError) as raised:
        load_config(None, [f"filter.{key}={value}"])
    message = str(raised.value)
    assert message.startswith(f"unknown config key 'filter.{key}'") and "\n" not in message
    cfg = load_config(None, [f"pretrain.{key}={value}", f"train.{key}={value}"])
    assert getattr(cfg.pretrain, key) == value and getattr(cfg.train, key) == value


def test_shared_recipe_keys_are_validated_per_section():
    cfg = load_config(None, ["filter.amp=bf16", "filter.log_every=5"])
    assert cfg.filter.amp == "bf16" and cfg.filter.log_every == 5
    with pytest.raises(ValueError, match=r"filter.amp='fast' is invalid"):
        load_config(None, ["filter.amp=fast"])
    with pytest.raises(ValueError, match=r"pretrain.label_smoothing=1.0 is invalid: must be in \[0, 1\)"):
        load_config(None, ["pretrain.label_smoothing=1"])
    with pytest.raises(ValueError, match=r"train.checkpoint_every=0 is invalid: must be at least 1"):
        load_config(None, ["train.checkpoint_every=0"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.img_size=0", "data.img_size=0 is invalid: must be a positive integer"),
        ("data.search_fraction=1", "data.search_fraction=1.0 is invalid: must be a number in (0, 1)"),
        ("data.in_chans=2", "data.in_chans=2 is invalid: must be 1 or 3"),
        ("data.std=[-1]", "data.std=(-1.0,) is invalid: must be positive numbers"),
        ("data.name=imagefolder", "data.root=None is invalid: must be a path for imagefolder"),
    ],
)
def test_data_section_is_validated_like_the_others(override, message):
    with pytest.raises(ValueError) as raised:
        load_config(None, [override])
    assert str(raised.value) == message
