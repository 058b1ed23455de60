"""``data.pipeline=ray_data``: training images decoded and augmented by Ray Data tasks, streamed to the workers."""

import pytest

from flora_ray.backends.local import LocalBackend
from flora_ray.config import load_config
from flora_ray.stages.training import fit_stage
from flora_ray.storage.run_store import ARTEFACTS, RunStore
from flora_ray.testing.imagefolder import write_image_folder

CLASSES, TRAIN_PER_CLASS, SEARCH_PER_CLASS, BATCH = 4, 20, 4, 16


@pytest.fixture
def config(tmp_path):
    data = write_image_folder(tmp_path / "data", classes=CLASSES, train_per_class=TRAIN_PER_CLASS, val_per_class=4)

    def make(*overrides):
        return load_config(
            None,
            [
                "model.name=test_vit", "model.kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
                "data.name=imagefolder", f"data.root={data}", "data.img_size=32", "data.in_chans=3",
                f"data.search_per_class={SEARCH_PER_CLASS}", "data.augment=true", "data.pipeline=ray_data",
                "pretrain.epochs=2", f"pretrain.batch_size={BATCH}", "pretrain.warmup_epochs=0",
                f"run.output_dir={tmp_path / 'runs'}", "scaling.num_workers=1", "run.threads_per_worker=1",
                *overrides,
            ],
        )  # fmt: skip

    return make


def test_ray_data_needs_image_files_and_the_ray_backend(config):
    with pytest.raises(ValueError, match="data.pipeline='ray_data' is invalid: reads image files"):
        load_config(None, ["data.name=digits", "data.pipeline=ray_data"])
    with pytest.raises(ValueError, match="use the Ray backend"):
        fit_stage(config(), LocalBackend(), "pretrain")


@pytest.mark.slow
def test_pretrain_streams_ray_data_batches_decoded_outside_the_training_worker(config):
    import ray
    from ray.util.state import list_tasks

    from flora_ray.backends.ray import RayBackend, init_ray

    cfg = config()
    init_ray(num_cpus=2)
    try:
        summary = fit_stage(cfg, RayBackend(), "pretrain")
        tasks = list_tasks(address=ray.get_runtime_context().gcs_address, limit=10_000)
        decode_tasks = [t for t in tasks if "decode_batch" in t.name]
    finally:
        ray.shutdown()
    rows = CLASSES * (TRAIN_PER_CLASS - SEARCH_PER_CLASS)
    history = RunStore.for_config(cfg).read_json(ARTEFACTS.history("pretrain"))
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["loss"] > 0 and 0 <= h["search_acc"] <= 100 for h in history)
    assert summary["metrics"]["epoch"] == 2 and "test_acc" in summary["metrics"]
    assert [h["images"] for h in history] == [rows // BATCH * BATCH] * 2  # every epoch: all full batches
    assert decode_tasks, "no Ray Data task decoded the images"
    assert {t.state for t in decode_tasks} <= {"FINISHED"}
