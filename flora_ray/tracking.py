"""Optional MLflow tracking (``tracking.mlflow_uri``), through Ray's own MLflow integrations where Ray runs the work.

* Training (``pretrain``, ``train``): rank 0 opens an MLflow run with Ray's ``setup_mlflow`` and logs each epoch's
  metrics (``EpochMetrics``, a trainer callback).
* Search on the Ray backend: Ray Tune's ``MLflowLoggerCallback`` logs one MLflow run per trial (its genes and its
  accuracy, MACs, parameters, predicted latency).
* Results (the report stage, every backend): one run with the configuration as parameters, the headline figures as
  metrics, and ``trials.parquet`` (the table of every trial), the front, the uniform baseline, the plots,
  ``front.html`` and the report as artifacts.

Every MLflow run is tagged ``flora_ray.run`` (the run name) and ``flora_ray.kind`` (``train``, ``trial``,
``results``). Tracking never changes results; without ``mlflow`` installed a configured URI is an error in preflight.
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
from pathlib import Path
from typing import Any

from flora_ray.config import Config, config_to_dict
from flora_ray.errors import InputError
from flora_ray.storage.run_store import ARTEFACTS, RunStore
from flora_ray.training.trainer import Callback

RESULT_ARTEFACTS = ("trials", "pareto", "uniform", "pareto_plot", "hypervolume_plot", "front_html", "report",
                    "report_json")  # fmt: skip


def enabled(cfg: Config) -> bool:
    return cfg.tracking.mlflow_uri is not None


def check_tracking(cfg: Config) -> None:
    """Preflight: a configured tracking URI needs mlflow installed."""
    if enabled(cfg) and importlib.util.find_spec("mlflow") is None:
        raise InputError(
            "tracking.mlflow_uri is set but mlflow is not installed: pip install 'flora-ray[tracking]', or unset it"
        )


def experiment_name(cfg: Config) -> str:
    return cfg.tracking.experiment or cfg.run.name


def artifact_location(cfg: Config) -> str | None:
    """Where a new experiment's artifacts go: as configured, or ``mlartifacts`` beside a sqlite database."""
    uri = cfg.tracking.mlflow_uri or ""
    if cfg.tracking.artifact_location or not uri.startswith("sqlite:///"):
        return cfg.tracking.artifact_location
    return str(Path(uri.removeprefix("sqlite:///")).expanduser().resolve().parent / "mlartifacts")


def ensure_experiment(cfg: Config) -> None:
    """Create the MLflow experiment (with its artifact location) before any worker logs to it."""
    if not enabled(cfg):
        return
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.mlflow_uri)
    if client.get_experiment_by_name(experiment_name(cfg)) is None:
        client.create_experiment(experiment_name(cfg), artifact_location=artifact_location(cfg))


def flat_params(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``section.key -> value`` of a nested config dict (MLflow parameters are flat)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def tags(cfg: Config, kind: str, **extra: str) -> dict[str, str]:
    return {"flora_ray.run": cfg.run.name, "flora_ray.kind": kind, **extra}


class EpochMetrics(Callback):
    """Each epoch's numeric metrics to MLflow from rank 0, in one MLflow run per stage (Ray's ``setup_mlflow``)."""

    def __init__(self, cfg: Config, stage: str) -> None:
        self.cfg, self.stage, self.mlflow = cfg, stage, None

    def on_fit_start(self, trainer: Any) -> None:
        from ray.air.integrations.mlflow import setup_mlflow

        sections = {k: v for k, v in config_to_dict(self.cfg).items() if k in ("model", "data", self.stage)}
        self.mlflow = setup_mlflow(
            flat_params(sections), tracking_uri=self.cfg.tracking.mlflow_uri, experiment_name=experiment_name(self.cfg),
            run_name=f"{self.cfg.run.name}-{self.stage}", create_experiment_if_not_exists=True, rank_zero_only=True,
            tags=tags(self.cfg, "train", **{"flora_ray.stage": self.stage}),
        )  # fmt: skip

    def on_epoch_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
        self.mlflow.log_metrics(numbers, step=int(metrics["epoch"]))
        if int(metrics["epoch"]) == trainer.opt.epochs:
            self.mlflow.end_run()


def trial_callbacks(config: dict[str, Any], study_name: str) -> list[Any]:
    """Ray Tune callbacks of the search: ``MLflowLoggerCallback`` (one MLflow run per trial) when tracking is on."""
    tracking = config.get("tracking") or {}
    if not tracking.get("mlflow_uri"):
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    name = config["run"]["name"]
    return [MLflowLoggerCallback(
        tracking_uri=tracking["mlflow_uri"], experiment_name=tracking.get("experiment") or name,
        tags={"flora_ray.run": name, "flora_ray.kind": "trial", "flora_ray.study": study_name}, save_artifact=False,
    )]  # fmt: skip


def log_results(cfg: Config, store: RunStore, figures: dict[str, Any]) -> str | None:
    """The results run: configuration, headline figures and the run's result files as artifacts; its run id."""
    if not enabled(cfg):
        return None
    import mlflow

    ensure_experiment(cfg)
    mlflow.set_tracking_uri(cfg.tracking.mlflow_uri)
    mlflow.set_experiment(experiment_name(cfg))
    metrics = {k: float(figures[k]) for k in ("dense_accuracy", "dense_macs", "front_size") if k in figures}
    for drop, gain in (figures.get("gain_over_uniform") or {}).items():
        if isinstance(gain, int | float):
            metrics[f"gain_over_uniform_{drop}"] = float(gain)
    export = figures.get("export") or {}
    metrics.update({f"export_{k}": float(export[k]) for k in ("macs", "test_accuracy") if k in export})
    with mlflow.start_run(run_name=f"{cfg.run.name}-results", tags=tags(cfg, "results")) as active:
        mlflow.log_params(flat_params(config_to_dict(cfg)))
        mlflow.log_metrics(metrics)
        with tempfile.TemporaryDirectory(prefix="flora-mlflow-") as tmp:
            for key in RESULT_ARTEFACTS:
                name = getattr(ARTEFACTS, key)
                if store.is_file(name):
                    (Path(tmp) / name).write_bytes(store.read_bytes(name))
                    mlflow.log_artifact(str(Path(tmp) / name))
        return active.info.run_id
