"""A whole digits run with token merging (in this process): the teacher, the supernet, the search's MACs and the
exported subnet (fp32 and int8) all merge the same ``r`` tokens per block."""

import json

from conftest import DIGITS_OVERRIDES

import flora_ray as fr
from flora_ray.core.cost import build_cost_model
from flora_ray.core.models import ModelSpec
from flora_ray.core.tome import token_merging_r
from flora_ray.storage.files import read_checkpoint_header

TOME_R = 3  # 17 tokens -> 14 -> 11 over the digits ViT's two blocks


def test_digits_run_with_token_merging_end_to_end(tmp_path):
    overrides = [*DIGITS_OVERRIDES, f"model.tome_r={TOME_R}", "run.name=tome", "filter.mode=zero_training",
                 "filter.eval_images=100", "train.epochs=1", "search.trials=6", "search.population=3",
                 "search.eval_images=100", "search.concurrency=1"]  # fmt: skip
    run = fr.run({"model": {"name": "test_vit"}, "data": {"name": "digits"}}, overrides=overrides, backend="local",
                 output=tmp_path / "runs")  # fmt: skip
    for artefact in ("teacher.safetensors", "supernet.safetensors"):
        assert read_checkpoint_header(run.store.location(artefact))["model"]["tome_r"] == TOME_R
    spec = ModelSpec.from_dict(read_checkpoint_header(run.store.location("supernet.safetensors"))["model"])
    cost = build_cost_model(spec.create(device="meta"))
    plain = build_cost_model(ModelSpec(spec.name, spec.kwargs).create(device="meta"))
    assert cost.dense_macs < plain.dense_macs
    for row in run.trials.itertuples():
        assert row.macs == cost.macs(json.loads(row.ranks))  # the search charged the merged token counts
    report = run.export(run.knee(), output=tmp_path / "export", formats=["int8"], backend="local")
    assert json.loads((tmp_path / "export" / "subnet.json").read_text())["model"]["tome_r"] == TOME_R
    fp32, int8 = fr.load_subnet(tmp_path / "export"), fr.load_subnet(tmp_path / "export", int8=True)
    assert token_merging_r(fp32) == token_merging_r(int8) == TOME_R
    assert report["macs"] == cost.macs(json.loads(run.knee()["ranks"]))
    assert report["int8"]["fp32_test_accuracy"] == report["test_accuracy"]  # int8 is measured on the merging model
