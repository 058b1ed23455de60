"""Test configuration: loopback-only Ray, a faster Ray Train controller poll, unfused timm attention (so
FlopCounterMode sees it), small models."""

import os
from pathlib import Path

# Must be set before timm and ray are imported anywhere.
os.environ.setdefault("TIMM_FUSED_ATTN", "0")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's controller polls its workers every 2 s by default: a job's end, each collected checkpoint
# (``RaySession.checkpoint_collected``) and a failed worker wait for the next poll. 0.5 s takes about a quarter off
# every Ray Train run here (subprocesses, the CLI and the cluster harness's drivers inherit it); nothing asserted
# depends on the interval.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

import pytest
import torch
from helpers import TINY_MODELS

from flora_ray.config import load_config
from flora_ray.core.models import dense_checkpoint_metadata
from flora_ray.stages.inputs import resolve_model_spec
from flora_ray.storage.files import write_checkpoint
from flora_ray.storage.run_store import ARTEFACTS


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request):
    """(name, kwargs) of each tiny model family."""
    return TINY_MODELS[request.param]


# A tiny digits run (training, filtering and search tests): 8x8 images, a 2-block ViT, 3 ratios.
DIGITS_OVERRIDES = [
    "model.name=test_vit",
    "model.kwargs={patch_size: 2, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2}",
    "model.ratios=[0.25, 0.5, 1.0]",
    "data.name=digits",
    "data.img_size=8",
    "data.in_chans=1",
    "data.augment=false",
    "pretrain.epochs=2",
    "pretrain.batch_size=128",
    "pretrain.warmup_epochs=0",
    "train.epochs=3",
    "train.batch_size=128",
    "train.warmup_epochs=0",
    "train.eval_images=100",
    "run.threads_per_worker=1",
    "profile.min_run_time=0.02",  # the latency table's timing: enough to rank, quick for every pipeline test
]


@pytest.fixture
def digits_config(tmp_path):
    def make(*overrides):
        return load_config(None, [*DIGITS_OVERRIDES, f"run.output_dir={tmp_path / 'runs'}", *overrides])

    return make


# A digits run of every stage in this process (the local backend), made once and shared read-only by the test of the
# in-process pipeline (tests/pipeline) and the test of reproducibility (tests/api, which makes a second one).
IN_PROCESS_OVERRIDES = [*DIGITS_OVERRIDES, "run.name=twice", "pretrain.epochs=3", "pretrain.lr=0.003",
                        "filter.epochs=1", "filter.eval_images=100", "train.epochs=2", "search.trials=16",
                        "search.population=4", "search.eval_images=150", "search.concurrency=1"]  # fmt: skip


@pytest.fixture(scope="session")
def in_process_run(tmp_path_factory):
    """``(cfg, markers, ray_started)``: ``run_pipeline(cfg, LocalBackend())`` on ``IN_PROCESS_OVERRIDES``, its stage
    markers, and whether Ray was initialised right after it. Read-only: copy the run directory to change it."""
    import ray

    from flora_ray.backends.local import LocalBackend
    from flora_ray.pipeline import run_pipeline

    output = tmp_path_factory.mktemp("in-process") / "runs"
    cfg = load_config(None, [*IN_PROCESS_OVERRIDES, f"run.output_dir={output}"])
    markers = run_pipeline(cfg, LocalBackend())
    return cfg, markers, ray.is_initialized()


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="session")
def digits_tiny_run(tmp_path_factory):
    """A finished run of ``experiments/digits_tiny.yaml`` (every stage in this process, the local backend: about two
    minutes): a teacher of about 92% test accuracy and a front of several points, for tests that compare subnets
    after fine-tuning (the runs above train their teachers for seconds and stay near chance, with fronts of one or
    two points). Read-only: copy the run directory to change it."""
    import flora_ray as fr

    output = tmp_path_factory.mktemp("digits-tiny") / "runs"
    return fr.run(EXPERIMENTS / "digits_tiny.yaml", overrides=["search.concurrency=1"], backend="local", output=output)


@pytest.fixture
def with_teacher():
    """Write a (randomly initialised) dense teacher checkpoint into the run directory of a config."""

    def write(cfg):
        spec = resolve_model_spec(cfg)
        model = spec.create()
        cfg.run.run_dir.mkdir(parents=True, exist_ok=True)
        write_checkpoint(cfg.run.run_dir / ARTEFACTS.teacher, model.state_dict(), dense_checkpoint_metadata(spec))
        return model

    return write


@pytest.fixture(scope="session")
def imagenet_skeleton(tmp_path_factory):
    """An ImageNet-shaped class-folder tree (1000 empty class folders in train/ and val/): what preflight reads."""
    root = tmp_path_factory.mktemp("imagenet")
    for split in ("train", "val"):
        for i in range(1000):
            (root / split / f"n{i:08d}").mkdir(parents=True)
    return root


BENCHMARK_TESTS = Path(__file__).parent / "benchmarks"


def pytest_collection_modifyitems(items):
    """Every test under tests/benchmarks is a benchmark script's smoke test: marked ``bench`` (``make test-bench``)."""
    for item in items:
        if BENCHMARK_TESTS in item.path.parents:
            item.add_marker(pytest.mark.bench)


@pytest.fixture(scope="module")
def s3():
    """An S3 server (moto) on 127.0.0.1 for one test module; its ``env`` holds the AWS variables that reach it."""
    from flora_ray.testing import skip_unless_ci
    from flora_ray.testing.s3 import s3_server

    try:
        import moto.server  # noqa: F401
    except ImportError:
        skip_unless_ci("moto[server] (the dev extra) is not installed", "the object-storage tests")
    with s3_server() as server:
        yield server
