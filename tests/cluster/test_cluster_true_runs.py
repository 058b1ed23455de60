"""Cluster-true runs: the whole pipeline where the run lives in storage, not on the head's disk.

* Two Ray nodes that share only the storage directory (``flora_ray.testing.multinode``): a head without CPUs and a
  worker node that cannot see the head's working and output directories. ``flora-ray run --address`` on a
  generated image folder of JPEG files (12 classes) must succeed with every artefact in storage; a second run after
  the head's output directory is deleted finds the finished run in storage and skips every stage.
* Object storage: the same pipeline with ``run.storage: s3://...`` and ``data.root: s3://...`` against an S3 server
  on 127.0.0.1, then ``load_front("s3://...")`` in pandas.
* Two nodes and a bucket: the pretrain stage on the two nodes, its images only in an S3 server inside the cluster's
  network namespace.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml

from flora_ray.config import config_to_dict, load_config
from flora_ray.core.space import RankSpace
from flora_ray.stages import STAGES
from flora_ray.storage.run_store import ARTEFACTS, RunStore
from flora_ray.testing.imagefolder import write_image_folder

pytestmark = pytest.mark.slow

RESULTS = (
    ARTEFACTS.run_config,
    ARTEFACTS.teacher,
    ARTEFACTS.space,
    ARTEFACTS.filter_scores,
    ARTEFACTS.supernet,
    ARTEFACTS.journal,
    ARTEFACTS.trials,
    ARTEFACTS.pareto,
    ARTEFACTS.uniform,
    ARTEFACTS.search_summary,
    ARTEFACTS.pareto_plot,
    ARTEFACTS.report,
    *(ARTEFACTS.stage_marker(s) for s in STAGES),
)
TINY = [
    "model.name=test_vit",
    "model.kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2}",
    "model.ratios=[0.25, 0.5, 1.0]",
    "data.img_size=32",
    "data.in_chans=3",
    "data.augment=false",
    "pretrain.epochs=2",
    "pretrain.batch_size=32",
    "pretrain.lr=0.003",
    "pretrain.warmup_epochs=0",
    "filter.epochs=1",
    "filter.batch_size=32",
    "filter.eval_images=48",
    "filter.subset=0.5",
    "train.epochs=1",
    "train.batch_size=32",
    "train.warmup_epochs=0",
    "train.eval_images=48",
    "search.trials=6",
    "search.population=4",
    "search.eval_images=48",
    "run.threads_per_worker=1",
    "scaling.num_workers=2",
    "profile.min_run_time=0.02",  # the latency table's timing (and export's): enough to rank, quick (as for digits)
]


def _check_run_in_storage(store: RunStore, classes: int) -> None:
    for name in RESULTS:
        assert store.is_file(name), name
    _, teacher = store.read_checkpoint(ARTEFACTS.teacher)
    assert teacher["model"]["kwargs"]["num_classes"] == classes  # the teacher has the data's class count
    header = store.read_checkpoint_header(ARTEFACTS.supernet)
    filtered = RankSpace.from_dict(store.read_json(ARTEFACTS.space))
    trained = RankSpace.from_dict(header["space"])
    assert trained == filtered and filtered.num_configs < 27**2  # trained on the filtered space, not the full one
    export = store.read_json(ARTEFACTS.stage_marker("export"))["summary"]
    assert store.is_file(f"{ARTEFACTS.export_dir(export['trial'])}/model.safetensors")


@pytest.fixture
def two_node_dirs():
    from flora_ray.testing.multinode import require_namespaces

    require_namespaces("the two-node test")
    base = Path(tempfile.mkdtemp(prefix="frt-", dir="/tmp"))  # short: Ray's socket paths live below
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_two_nodes_that_share_only_the_storage(two_node_dirs):
    from flora_ray.testing.multinode import run_on_two_nodes

    head, storage, data = two_node_dirs / "head", two_node_dirs / "storage", two_node_dirs / "data"
    head.mkdir()
    write_image_folder(data, classes=12, train_per_class=24, val_per_class=6, size=32)
    cfg = load_config(
        None, [*TINY, "run.name=two", f"run.output_dir={head / 'runs'}", f"run.storage={storage}", "data.name=imagefolder",
               f"data.root={data}", "data.search_per_class=4"],
    )  # fmt: skip
    (head / "run.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    script = textwrap.dedent(
        f"""
        set -e
        cd {head}
        {sys.executable} -m flora_ray.cli run run.yaml --address "$RAY_ADDRESS" > first.log 2>&1 || {{ tail -80 first.log; exit 1; }}
        rm -rf {head / "runs"}
        {sys.executable} -m flora_ray.cli run run.yaml --address "$RAY_ADDRESS" > second.log 2>&1 || {{ tail -80 second.log; exit 1; }}
        """
    )
    (two_node_dirs / "script.sh").write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    result = run_on_two_nodes(["bash", str(two_node_dirs / "script.sh")], hide=[head], env=env, timeout_s=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    _check_run_in_storage(RunStore(storage / "two"), classes=12)
    second = (head / "second.log").read_text()
    assert second.count("done earlier") == len(STAGES), second[-3000:]


@pytest.fixture(scope="module")
def s3():
    from flora_ray.testing.s3 import s3_server

    with s3_server() as server:
        yield server


def test_a_run_on_object_storage(s3, tmp_path, monkeypatch):
    from flora_ray.results import load_front, load_trials

    bucket = s3.make_bucket("flora-runs")
    head = tmp_path / "head"
    data = tmp_path / "data"
    write_image_folder(data, classes=5, train_per_class=24, val_per_class=6, size=32)
    import pyarrow.fs as pafs

    pafs.copy_files(str(data), "flora-runs/images", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3.filesystem())  # fmt: skip
    shutil.rmtree(data)  # the images too are only in the bucket: every stage reads them from there
    cfg = load_config(
        None, [*TINY, "run.name=s3run", f"run.output_dir={head}", f"run.storage={bucket}/runs", "data.name=imagefolder",
               f"data.root={bucket}/images", "data.search_per_class=4"],
    )  # fmt: skip
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(config_to_dict(cfg)))
    env = {**os.environ, **s3.env, "TIMM_FUSED_ATTN": "0"}
    command = [sys.executable, "-m", "flora_ray.cli", "run", str(config_file)]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    monkeypatch.setattr(os, "environ", {**os.environ, **s3.env})
    uri = f"{bucket}/runs/s3run"
    _check_run_in_storage(RunStore(uri), classes=5)
    assert RunStore(uri).is_file(ARTEFACTS.data_listing)  # listed once, by the driver
    front, trials = load_front(uri), load_trials(uri)  # pandas straight from the bucket
    assert len(trials) == 6 and set(front["trial"]) <= set(trials["trial"]) and len(front) >= 1
    local = {str(p.relative_to(head / "s3run")) for p in (head / "s3run").rglob("*") if p.is_file()}
    trial = RunStore(uri).read_json(ARTEFACTS.stage_marker("export"))["summary"]["trial"]
    names = ("model.safetensors", "subnet.json", "export.json", "config.json", "README.md")  # the HF layout
    exported = {f"{ARTEFACTS.export_dir(trial)}/{n}" for n in names}
    assert local == {ARTEFACTS.journal} | exported  # working copies only: the run itself is in the bucket
    # The head's working directory only holds working copies; with it gone the run resumes from the bucket.
    shutil.rmtree(head)
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (second.stdout + second.stderr).count("done earlier") == len(STAGES)
    assert "Started a local Ray instance" not in second.stdout + second.stderr  # nothing left to run on Ray
    assert "Started a local Ray instance" in first.stdout + first.stderr
    pd.testing.assert_frame_equal(load_front(uri), front)
    _check_run_object(uri, trials)


def _check_run_object(uri: str, trials: pd.DataFrame) -> None:
    """``flora_ray.Run`` straight from the bucket: frames, the study (from the stored journal), a subnet."""
    import torch
    from helpers import input_for

    import flora_ray as fr

    run = fr.Run.open(uri)
    assert run.location == uri and run.config.run.name == "s3run"
    pd.testing.assert_frame_equal(run.trials, trials)
    from flora_ray.search.study import DUPLICATE_OF

    # The study also holds the repeated proposals it answered from an earlier evaluation (not trials of the frame).
    assert len([t for t in run.study.trials if DUPLICATE_OF not in t.user_attrs]) == len(trials)
    subnet = run.subnet(run.knee())
    with torch.no_grad():
        assert subnet(input_for(subnet)).shape[-1] == 5


BUCKET_DRIVER = textwrap.dedent(
    """
    import http.client, os, shutil, subprocess, sys, time
    from pathlib import Path

    import pyarrow.fs as pafs

    from flora_ray.storage.filesystems import s3_filesystem

    head, port = Path(sys.argv[1]), int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with open(head / "moto.log", "wb") as log:  # the S3 server, in the cluster's network namespace
        moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=server_env)
    try:
        for _ in range(600):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("GET", "/moto-api/")
                conn.getresponse().read()
                break
            except OSError:
                time.sleep(0.1)
        fs = s3_filesystem(allow_bucket_creation=True)
        fs.create_dir("images")
        pafs.copy_files(str(head / "data"), "images/demo", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        shutil.rmtree(head / "data")  # from here on the images exist only in the bucket
        command = [sys.executable, "-m", "flora_ray.cli", "pretrain", "run.yaml", "--address", os.environ["RAY_ADDRESS"]]
        with open(head / "pretrain.log", "wb") as log:
            code = subprocess.run(command, cwd=head, stdout=log, stderr=subprocess.STDOUT).returncode
    finally:
        moto.terminate()
        moto.wait(30)
    sys.exit(code)
    """
)


def test_two_nodes_read_the_images_from_a_bucket(two_node_dirs):
    """The pretrain stage on two nodes with ``data.root: s3://...`` (moto on 127.0.0.1, inside the cluster's network
    namespace) and ``data.pipeline: ray_data``: the image folder is written on the head, hidden from the worker
    node and deleted once uploaded, so the worker's Ray Data read tasks (training images) and its evaluation loaders
    (search and test images) can only have read the bucket."""
    from flora_ray.testing.multinode import run_on_two_nodes
    from flora_ray.testing.s3 import AWS_VARIABLES_CLEARED, free_port

    head, storage = two_node_dirs / "head", two_node_dirs / "storage"
    write_image_folder(head / "data", classes=4, train_per_class=24, val_per_class=6, size=32)
    cfg = load_config(
        None, [*TINY, "run.name=bucket", f"run.output_dir={head / 'runs'}", f"run.storage={storage}",
               "data.name=imagefolder", "data.root=s3://images/demo", "data.search_per_class=4",
               "data.pipeline=ray_data", "data.decoders=1", "scaling.num_workers=1", "pretrain.epochs=1"],
    )  # fmt: skip
    (head / "run.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    (two_node_dirs / "driver.py").write_text(BUCKET_DRIVER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST") and k not in AWS_VARIABLES_CLEARED}
    env.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )  # fmt: skip
    command = [sys.executable, str(two_node_dirs / "driver.py"), str(head)]
    result = run_on_two_nodes(command, hide=[head], env=env, timeout_s=540)
    log = (head / "pretrain.log").read_text() if (head / "pretrain.log").exists() else ""
    assert result.returncode == 0, log[-4000:] + result.stdout[-2000:] + result.stderr[-3000:]
    assert not (head / "data").exists()
    store = RunStore(storage / "bucket")
    assert store.is_file(ARTEFACTS.teacher) and store.is_file(ARTEFACTS.data_listing)
    history = store.read_json(ARTEFACTS.history("pretrain"))
    assert len(history) == 1 and 0 <= history[0]["search_acc"] <= 100
    requests = re.sub(r"\x1b\[[0-9;]*m", "", (head / "moto.log").read_text())  # the server's access log
    gets = re.findall(r'"GET /images/demo/(\S+) HTTP', requests)
    assert len({g for g in gets if g.startswith("train/")}) == 4 * 24, gets[-5:]  # every training image, and the
    assert len({g for g in gets if g.startswith("val/")}) == 4 * 6, gets[-5:]  # test split, read from the bucket
