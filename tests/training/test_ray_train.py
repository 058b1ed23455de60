"""Ray Train end to end on a local 2-CPU Ray: 2 gloo workers, failure recovery, resume after interruption."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

import flora_ray as fr
from flora_ray.backends.ray import RayBackend
from flora_ray.config import config_to_dict
from flora_ray.core.supernet import load_supernet
from flora_ray.stages.inputs import resolve_model_spec
from flora_ray.stages.training import pretrain, train
from flora_ray.testing.faults import FaultyRayBackend

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from flora_ray.backends.ray import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def _log(path):
    """The sampled subnet of every step, without the record's time and process (they differ between ranks)."""
    keys = ("epoch", "step", "global_step", "digest")
    return [{k: r[k] for k in keys} for r in map(json.loads, path.read_text().splitlines())]


def test_two_workers_train_the_same_subnet_every_step(local_ray, digits_config, with_teacher, tmp_path):
    cfg = digits_config("train.epochs=2", "scaling.num_workers=2")
    with_teacher(cfg)
    outcome = train(cfg, FaultyRayBackend(sample_log=str(tmp_path / "samples")))
    rank0, rank1 = _log(tmp_path / "samples" / "rank0.jsonl"), _log(tmp_path / "samples" / "rank1.jsonl")
    assert rank0 == rank1 and len(rank0) > 4
    assert len({d["digest"] for d in rank0}) > 1  # a different subnet per step
    assert outcome["metrics"]["config_checks"] == len(rank0)  # every step verified by all-reduce
    supernet = load_supernet(outcome["output"])
    assert supernet.spec.name == "test_vit"
    checkpoints = [p for p in (cfg.run.run_dir / "ray" / f"{cfg.run.name}-train").glob("checkpoint_*") if p.is_dir()]
    assert len(checkpoints) == 2
    history = json.loads((cfg.run.run_dir / "train_history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert {"search_acc_largest", "search_acc_smallest", "search_acc_middle", "loss"} <= set(history[-1])


def test_pretrain_on_ray_writes_a_teacher_build_supernet_loads(local_ray, digits_config):
    cfg = digits_config("pretrain.epochs=1", "scaling.num_workers=2")
    outcome = pretrain(cfg, RayBackend())
    spec = resolve_model_spec(cfg)
    supernet = fr.build_supernet(spec.name, model_kwargs=spec.kwargs, pretrained=outcome["output"])
    assert supernet.space.fqns[0] == "blocks.0.attn.qkv"


def test_a_failing_worker_restarts_from_the_checkpoint(local_ray, digits_config, with_teacher, tmp_path):
    cfg = digits_config("train.epochs=3", "scaling.num_workers=2", "run.max_failures=1")
    with_teacher(cfg)
    marker = tmp_path / "failed-once"
    fault = {"epoch": 1, "rank": 1, "marker": str(marker)}
    train(cfg, FaultyRayBackend(fail=fault, sample_log=str(tmp_path / "samples")))
    assert marker.read_text() == "failed at epoch 1\n"
    history = json.loads((cfg.run.run_dir / "train_history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    rank1 = _log(tmp_path / "samples" / "rank1.jsonl")
    epoch0 = [(d["epoch"], d["step"]) for d in rank1 if d["epoch"] == 0]
    assert len(epoch0) == len(set(epoch0)) > 0  # epoch 0 was not trained again after the restart


def test_interrupted_driver_resumes_on_rerun(digits_config, with_teacher, tmp_path):
    cfg = digits_config("train.epochs=8", "scaling.num_workers=2", "train.batch_size=16")
    with_teacher(cfg)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(config_to_dict(cfg)))
    command = [sys.executable, "-m", "flora_ray.cli", "train", str(config_file)]
    storage = cfg.run.run_dir / "ray" / f"{cfg.run.name}-train"
    first = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    deadline = time.time() + 240

    def recorded_checkpoint():
        """The checkpoint Ray Train's snapshot records (what a re-run resumes from), once one is recorded."""
        try:
            snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return snapshot.get("latest_checkpoint_result")

    while recorded_checkpoint() is None and time.time() < deadline and first.poll() is None:
        time.sleep(0.5)
    assert recorded_checkpoint() is not None, "no checkpoint recorded before the deadline"
    first.send_signal(signal.SIGINT)  # the driver only, as Ctrl-C would
    try:
        first.wait(timeout=90)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)  # whatever the interrupted driver left behind
    assert not (cfg.run.run_dir / "supernet.safetensors").exists(), "the first run was not interrupted"
    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    resumed = [
        line for line in (second.stdout + second.stderr).splitlines() if "resumed from the checkpoint at epoch" in line
    ]
    assert resumed, "the second run did not resume: " + (second.stdout + second.stderr)[-4000:]
    epoch = int(resumed[0].split("resumed from the checkpoint at epoch ", 1)[1].split()[0])
    assert 1 <= epoch < 8
    history = json.loads((cfg.run.run_dir / "train_history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 9))
