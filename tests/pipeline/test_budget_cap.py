"""``search.trials`` above the filtered space's size: the search spends the capped budget and ``flora-ray run``
calls the stage done (one rule, ``search.study.search_budget``), so it ends with the report, and a re-run too."""

import json
import shutil

import pandas as pd
import pytest
import yaml

from flora_ray.cli import main
from flora_ray.config import config_to_dict, load_config
from flora_ray.core.space import RankSpace
from flora_ray.storage.run_store import ARTEFACTS

pytestmark = pytest.mark.slow


def test_a_budget_above_the_space_is_capped_and_the_run_completes(in_process_run, tmp_path, capsys):
    cfg, _, _ = in_process_run
    run_dir = tmp_path / "runs" / cfg.run.name
    shutil.copytree(cfg.run.run_dir, run_dir)
    # The same run with its search (and what follows it) not done yet, and a budget far above the filtered space.
    for stage in ("search", "export", "finetune", "report"):
        (run_dir / ARTEFACTS.stage_marker(stage)).unlink(missing_ok=True)
    (run_dir / ARTEFACTS.journal).unlink()
    shutil.rmtree(run_dir / "ray", ignore_errors=True)
    data = config_to_dict(cfg)
    data["run"]["output_dir"], data["search"]["trials"] = str(tmp_path / "runs"), 500
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(data))
    (run_dir / ARTEFACTS.run_config).write_text(yaml.safe_dump(config_to_dict(load_config(config_file))))
    size = RankSpace.load(run_dir / ARTEFACTS.space).num_configs
    assert size < 500

    assert main(["run", str(config_file), "--backend", "local"]) == 0, capsys.readouterr().err
    marker = json.loads((run_dir / ARTEFACTS.stage_marker("search")).read_text())["summary"]
    assert marker["budget"] == size and marker["finished"] == size
    trials = pd.read_parquet(run_dir / ARTEFACTS.trials)
    assert trials.loc[trials["state"] == "COMPLETE", "ranks"].nunique() == size  # every configuration, once
    capsys.readouterr()
    assert main(["run", str(config_file), "--backend", "local"]) == 0  # a re-run: every stage done, the report
    assert "stopped after" not in capsys.readouterr().err
