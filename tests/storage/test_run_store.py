"""The run store: every artefact through one filesystem, atomic writes, no pickle, on local and non-local stores."""

import fsspec
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from pyarrow.fs import FileSelector, FileType, FSSpecHandler, PyFileSystem

from flora_ray.storage.files import read_checkpoint
from flora_ray.storage.run_store import ARTEFACTS, RunStore


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        return RunStore(tmp_path / "runs" / "demo")
    memory = fsspec.filesystem("memory")
    memory.store.clear()
    return RunStore("/runs/demo", PyFileSystem(FSSpecHandler(memory)))


def test_artefacts_round_trip(store):
    store.write_json(ARTEFACTS.search_summary, {"front_size": 3})
    assert store.read_json(ARTEFACTS.search_summary) == {"front_size": 3}
    frame = pd.DataFrame({"trial": [0, 1], "macs": [2.0, 1.0], "accuracy": [80.0, 70.0]})
    store.write_parquet(ARTEFACTS.trials, frame, {"flora_ray.seed": "7"})
    pd.testing.assert_frame_equal(store.read_parquet(ARTEFACTS.trials), frame)
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    store.write_checkpoint(ARTEFACTS.supernet, tensors, {"format": "x", "space": [1, 2]})
    loaded, header = store.read_checkpoint(ARTEFACTS.supernet)
    assert torch.equal(loaded["w"], tensors["w"]) and header == {"format": "x", "space": [1, 2]}
    for stage in ("train", "pretrain"):
        store.write_json(ARTEFACTS.stage_marker(stage), {"stage": stage})
    assert store.list(ARTEFACTS.stages, ".json") == ["stages/pretrain.json", "stages/train.json"]
    assert store.is_file(ARTEFACTS.trials) and not store.is_file(ARTEFACTS.pareto)
    assert store.name == "demo"


def test_writes_leave_no_temporary_files_and_replace_atomically(store):
    store.write_text(ARTEFACTS.report, "old")
    store.write_text(ARTEFACTS.report, "new")
    assert store.read_text(ARTEFACTS.report) == "new"
    assert store.list("") == [ARTEFACTS.report]
    everything = store.filesystem.get_file_info(FileSelector(store.root, recursive=True))
    files = [info.base_name for info in everything if info.type == FileType.File]
    assert files == [ARTEFACTS.report]  # no temporary file left beside it


def test_missing_and_corrupt_artefacts_are_one_line_errors(store):
    with pytest.raises(FileNotFoundError, match="checkpoint .*supernet.safetensors' does not exist"):
        store.read_checkpoint(ARTEFACTS.supernet)
    store.write_bytes(ARTEFACTS.supernet, b"\x00" * 100)
    with pytest.raises(ValueError, match="corrupt or not safetensors"):
        store.read_checkpoint(ARTEFACTS.supernet)
    store.write_text(ARTEFACTS.space, "{not json")
    with pytest.raises(ValueError, match="space file .* is not valid JSON"):
        store.read_json(ARTEFACTS.space, "space file")


def test_local_files_are_ordinary_files_other_tools_read(tmp_path):
    store = RunStore(tmp_path / "run")
    store.write_checkpoint(ARTEFACTS.teacher, {"w": torch.ones(2)}, {"model": {"name": "m"}})
    tensors, header = read_checkpoint(store.local_path(ARTEFACTS.teacher))
    assert header == {"model": {"name": "m"}} and torch.equal(tensors["w"], torch.ones(2))
    store.write_parquet(ARTEFACTS.pareto, pd.DataFrame({"macs": [1.0], "accuracy": [2.0]}), {"k": "v"})
    assert pq.read_schema(tmp_path / "run" / ARTEFACTS.pareto).metadata[b"k"] == b"v"


def test_a_non_local_store_has_no_local_paths():
    memory = PyFileSystem(FSSpecHandler(fsspec.filesystem("memory")))
    with pytest.raises(ValueError, match="is not on a local filesystem"):
        RunStore("/runs/x", memory).local_path(ARTEFACTS.journal)


def test_a_failed_write_keeps_the_previous_version_and_leaves_no_temporary():
    class FailingMove(FSSpecHandler):
        def move(self, src, dest):
            raise OSError("the store went away")

    memory = fsspec.filesystem("memory")
    memory.store.clear()
    store = RunStore("/runs/failing", PyFileSystem(FailingMove(memory)))
    memory.pipe("/runs/failing/report.md", b"previous")
    with pytest.raises(OSError, match="went away"):
        store.write_text(ARTEFACTS.report, "new")
    assert store.read_text(ARTEFACTS.report) == "previous"
    assert memory.ls("/runs/failing", detail=False) == ["/runs/failing/report.md"]
