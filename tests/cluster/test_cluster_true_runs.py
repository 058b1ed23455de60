"""Cluster-true runs: the whole pipeline where the run and the data live in a bucket, not on any node's disk.

Two Ray nodes of ``flora_ray.testing.multinode`` (a network namespace with only loopback): a head without CPUs and a
worker node that cannot see the head's working directory. An S3 server (moto) runs on 127.0.0.1 inside the same
namespace; the image folder (JPEG files, 5 classes) is uploaded to it and deleted from the head, and
``flora-ray run --address`` runs every stage with ``data.root: s3://...`` (``data.pipeline: ray_data``: the training
images through Ray Data's reader, the others through the loaders) and ``run.storage: s3://...``. Then the head's
working directory is deleted and a second run finds the finished run in the bucket and skips every stage; the run is
read back from the bucket as a user would (``load_front("s3://...")``, ``flora_ray.Run.open``). The server's access
log shows every training and test image fetched from the bucket. (Storage on a shared directory across two nodes:
tests/cluster/test_preemption.py.)
"""

import json
import os
import re
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

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


DRIVER = textwrap.dedent(
    """
    import http.client, json, os, shutil, subprocess, sys, time
    from pathlib import Path

    import pyarrow.fs as pafs

    from flora_ray.storage.filesystems import s3_filesystem

    head, port = Path(sys.argv[1]), int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    RUN = "s3://flora-runs/runs/s3run"


    def flora_ray_run(log_name):
        command = [sys.executable, "-m", "flora_ray.cli", "run", "run.yaml", "--address", os.environ["RAY_ADDRESS"]]
        with open(head / log_name, "wb") as log:
            return subprocess.run(command, cwd=head, stdout=log, stderr=subprocess.STDOUT).returncode


    def read_back():
        # What a user reads straight from the bucket, recorded for the test to check.
        import torch

        import flora_ray as fr
        from flora_ray.results import load_front, load_trials
        from flora_ray.search.study import DUPLICATE_OF

        run, trials, front = fr.Run.open(RUN), load_trials(RUN), load_front(RUN)
        with torch.no_grad():
            out = run.subnet(run.knee())(torch.zeros(1, 3, 32, 32))
        return {"location": run.location, "name": run.config.run.name, "trials": sorted(map(int, trials["trial"])),
                "front": sorted(map(int, front["trial"])), "frames_equal": bool(run.trials.equals(trials)),
                "study_trials": len([t for t in run.study.trials if DUPLICATE_OF not in t.user_attrs]),
                "classes": int(out.shape[-1])}


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
        fs.create_dir("flora-runs")
        pafs.copy_files(str(head / "data"), "images/demo", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        shutil.rmtree(head / "data")  # from here on the images exist only in the bucket
        code, record = flora_ray_run("first.log"), {}
        if code == 0:
            work = head / "runs" / "s3run"
            record["working_copies"] = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())
            shutil.rmtree(head / "runs")  # the head's disk is lost: the run resumes from the bucket
            code = flora_ray_run("second.log")
        if code == 0:
            record.update(read_back())
            pafs.copy_files("flora-runs/runs/s3run", str(head / "bucket" / "s3run"), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
            (head / "record.json").write_text(json.dumps(record))
    finally:
        moto.terminate()
        moto.wait(30)
    sys.exit(code)
    """
)


def test_two_nodes_that_share_nothing_but_a_bucket(two_node_dirs):
    from flora_ray.testing.multinode import run_on_two_nodes
    from flora_ray.testing.s3 import AWS_VARIABLES_CLEARED, free_port

    head = two_node_dirs / "head"
    write_image_folder(head / "data", classes=5, train_per_class=24, val_per_class=6, size=32)
    cfg = load_config(
        None, [*TINY, "run.name=s3run", f"run.output_dir={head / 'runs'}", "run.storage=s3://flora-runs/runs",
               "data.name=imagefolder", "data.root=s3://images/demo", "data.search_per_class=4",
               "data.pipeline=ray_data", "data.decoders=1", "scaling.num_workers=1"],
    )  # fmt: skip
    (head / "run.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    (two_node_dirs / "driver.py").write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST") and k not in AWS_VARIABLES_CLEARED}
    env.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )  # fmt: skip
    result = run_on_two_nodes([sys.executable, str(two_node_dirs / "driver.py"), str(head)], hide=[head], env=env,
                              timeout_s=840)  # fmt: skip
    logs = "".join((head / n).read_text()[-3000:] for n in ("first.log", "second.log") if (head / n).exists())
    assert result.returncode == 0, logs + result.stdout[-2000:] + result.stderr[-3000:]
    assert not (head / "data").exists()
    # Every artefact in the bucket (copied out after the runs), the listing made once by the driver.
    store = RunStore(head / "bucket" / "s3run")
    _check_run_in_storage(store, classes=5)
    assert store.is_file(ARTEFACTS.data_listing)
    second = (head / "second.log").read_text()
    assert second.count("done earlier") == len(STAGES), second[-3000:]
    record = json.loads((head / "record.json").read_text())
    trial = store.read_json(ARTEFACTS.stage_marker("export"))["summary"]["trial"]
    names = ("model.safetensors", "subnet.json", "export.json", "config.json", "README.md")  # the HF layout
    exported = {f"{ARTEFACTS.export_dir(trial)}/{n}" for n in names}
    assert set(record["working_copies"]) == {ARTEFACTS.journal} | exported  # the run itself is in the bucket
    # Read straight from the bucket: pandas, the Run object, its study (from the stored journal), a subnet.
    assert record["location"] == "s3://flora-runs/runs/s3run" and record["name"] == "s3run"
    assert len(record["trials"]) == 6 and set(record["front"]) <= set(record["trials"]) and record["front"]
    assert record["frames_equal"] and record["study_trials"] == 6 and record["classes"] == 5
    # The worker read every training and test image from the bucket (the server's access log).
    requests = re.sub(r"\x1b\[[0-9;]*m", "", (head / "moto.log").read_text())
    gets = re.findall(r'"GET /images/demo/(\S+) HTTP', requests)
    assert len({g for g in gets if g.startswith("train/")}) == 5 * 24, gets[-5:]
    assert len({g for g in gets if g.startswith("val/")}) == 5 * 6, gets[-5:]
