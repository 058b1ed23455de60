"""The training loop run by every data-parallel worker: dense teacher pretraining and supernet training.

The loop is plain PyTorch. Everything distributed goes through a small ``Session`` (rank, device, model wrapping,
checkpoint in / report out) that ``ray_train`` implements with Ray Train; ``LocalSession`` runs it in-process.

Supernet training trains ONE sampled subnet per step, the same on every worker: each worker draws it from a
generator seeded by ``(seed, epoch, step)`` and the workers check with an all-reduce of the configuration's digest
that they agree. A checkpoint holds the model (safetensors), the optimiser and scheduler state, the epoch and the
metric history; the sampler is stateless, so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from flora_ray.config import Config, build_dataclass
from flora_ray.core.models import ModelSpec, dense_checkpoint_metadata, load_state_dict_strict
from flora_ray.core.space import RankSpace
from flora_ray.core.supernet import Supernet, build_supernet
from flora_ray.data.datasets import build_datasets
from flora_ray.storage.files import read_checkpoint, read_checkpoint_header, write_checkpoint, write_json
from flora_ray.training.optim import build_optimizer, build_scheduler, distillation_loss
from flora_ray.training.sampling import build_sampler, config_digest, step_generator

logger = logging.getLogger(__name__)

STAGES = ("pretrain", "train")
PREFLIGHT_STAGES = (*STAGES, "filter", "search")
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
TEACHER_FILE = "teacher.safetensors"
SUPERNET_FILE = "supernet.safetensors"
SPACE_FILE = "space.json"
SMALL_DATASETS = ("fashion_mnist", "digits")


class Session(Protocol):
    """What the loop needs from the distributed runtime."""

    world_rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def checkpoint_dir(self) -> contextlib.AbstractContextManager[Path | None]: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None: ...


class LocalSession:
    """A single-process session: checkpoints go to ``directory`` (the latest one is kept)."""

    world_rank, world_size = 0, 1

    def __init__(self, directory: str | Path, device: str = "cpu") -> None:
        self.directory = Path(directory)
        self.device = torch.device(device)
        self.reports: list[dict[str, Any]] = []

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    @contextlib.contextmanager
    def checkpoint_dir(self) -> Iterator[Path | None]:
        latest = self.directory / "latest"
        yield latest if (latest / STATE_FILE).is_file() else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir is not None:
            target = self.directory / "latest"
            tmp = self.directory / "latest.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(checkpoint_dir, tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)


# --- model and space resolution (shared by the driver and the workers) ---------------------------------------------


def resolve_model_spec(cfg: Config) -> ModelSpec:
    """The timm spec of the run: data geometry (``img_size``, ``in_chans``, ``num_classes``) plus model kwargs."""
    kwargs: dict[str, Any] = {"img_size": cfg.data.img_size, "in_chans": cfg.data.in_chans}
    if cfg.data.name in SMALL_DATASETS:
        kwargs["num_classes"] = 10
    kwargs.update(cfg.model.kwargs)
    for key in ("img_size", "in_chans"):
        if kwargs[key] != getattr(cfg.data, key):
            raise ValueError(f"model.kwargs.{key}={kwargs[key]} contradicts data.{key}={getattr(cfg.data, key)}")
    return ModelSpec(cfg.model.name, kwargs)


def teacher_source(cfg: Config, run_dir: Path) -> bool | str:
    """Where the dense weights come from: the configured pretrained weights, else the run's own teacher."""
    if cfg.model.pretrained:
        return cfg.model.pretrained
    path = run_dir / TEACHER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no dense teacher at {str(path)!r}: run `flora-ray pretrain CONFIG` first "
            "or set model.pretrained to a weight file"
        )
    return str(path)


def resolve_space(cfg: Config, run_dir: Path, full: RankSpace) -> RankSpace:
    """The space to train on: ``train.space_file``, else the run's filtered ``space.json``, else ``full``."""
    path = Path(cfg.train.space_file) if cfg.train.space_file else run_dir / SPACE_FILE
    if not path.is_file():
        if cfg.train.space_file:
            raise FileNotFoundError(f"space file {str(path)!r} does not exist; run `flora-ray filter` or fix the path")
        return full
    space = RankSpace.load(path)
    full.check_compatible(space, source=f"space file {str(path)!r}")
    logger.info("sampling from %s: %.3g of %.3g configurations", path, space.num_configs, full.num_configs)
    return space


def build_run_supernet(cfg: Config, run_dir: Path, device: torch.device | str = "cpu") -> tuple[Supernet, nn.Module]:
    """The supernet (SVD of the teacher) and the frozen dense teacher of a run."""
    spec = resolve_model_spec(cfg)
    source = teacher_source(cfg, run_dir)
    supernet = build_supernet(
        spec.name,
        model_kwargs=spec.kwargs,
        pretrained=source,
        ratios=cfg.model.ratios,
        include_proj=cfg.model.include_proj,
        targets=cfg.model.targets,
        sv_placement=cfg.model.sv_placement,
        device=device,
    )
    supernet.space = resolve_space(cfg, run_dir, supernet.space)
    teacher = spec.create(pretrained=source, device=device).eval()
    teacher.requires_grad_(False)
    return supernet, teacher


def full_space(cfg: Config) -> RankSpace:
    """The run's unfiltered rank space, from the model built on the meta device (no weights, no SVD)."""
    from flora_ray.core.models import create_model
    from flora_ray.core.supernet import build_space

    spec = resolve_model_spec(cfg)
    return build_space(
        create_model(spec.name, device="meta", **spec.kwargs),
        ratios=cfg.model.ratios,
        include_proj=cfg.model.include_proj,
        targets=cfg.model.targets,
        model_name=spec.name,
    )


def provenance(cfg: Config, seed: int | None = None, **extra: str) -> dict[str, str]:
    """Parquet key-value metadata of a run's results: config, seed, model, data set and package versions."""
    from flora_ray.config import config_to_dict
    from flora_ray.core.subnet import package_versions

    return {
        "flora_ray.config": json.dumps(config_to_dict(cfg)),
        "flora_ray.versions": json.dumps(package_versions()),
        "flora_ray.seed": str(cfg.run.seed if seed is None else seed),
        "flora_ray.model": cfg.model.name,
        "flora_ray.dataset": cfg.data.name,
        **{f"flora_ray.{k}": v for k, v in extra.items()},
    }


def preflight(cfg: Config, stage: str) -> None:
    """Cheap checks of a stage's inputs before any Ray worker starts (missing data, teacher or space file)."""
    if stage not in PREFLIGHT_STAGES:
        raise ValueError(f"stage {stage!r} is not one of {PREFLIGHT_STAGES}")
    spec = resolve_model_spec(cfg)
    from flora_ray.core.models import create_model

    create_model(spec.name, device="meta", **spec.kwargs)  # unknown model or kwargs: fail here, not in a worker
    pretrained = cfg.model.pretrained
    if isinstance(pretrained, str) and not Path(pretrained).expanduser().is_file():
        raise FileNotFoundError(f"model.pretrained weight file {pretrained!r} does not exist; fix the path")
    if cfg.data.name in SMALL_DATASETS:
        build_datasets(cfg.data)
    elif cfg.data.root is None or not Path(cfg.data.root).is_dir():
        raise FileNotFoundError(f"data.root {cfg.data.root!r} is not a directory with train/ and val/ class folders")
    if stage in ("filter", "train"):
        _check_checkpoint(teacher_source(cfg, cfg.run.run_dir), spec)
    if stage == "search":
        if not (cfg.run.run_dir / SUPERNET_FILE).is_file():
            raise FileNotFoundError(
                f"no supernet at {str(cfg.run.run_dir / SUPERNET_FILE)!r}: run `flora-ray train CONFIG` first"
            )
        _check_checkpoint(str(cfg.run.run_dir / SUPERNET_FILE), spec)
    if stage == "train":
        run_dir = cfg.run.run_dir
        if cfg.train.space_file or (run_dir / SPACE_FILE).is_file():
            resolve_space(cfg, run_dir, full_space(cfg))


def _check_checkpoint(source: bool | str, spec: ModelSpec) -> None:
    """A safetensors checkpoint must be readable and, if flora-ray wrote it, be of this model (header only)."""
    if not isinstance(source, str) or not source.endswith(".safetensors"):
        return
    header = read_checkpoint_header(source)
    if "model" in header and ModelSpec.from_dict(header["model"]) != spec:
        raise ValueError(
            f"checkpoint {source!r} holds {json.dumps(header['model'])}, not {json.dumps(spec.to_dict())}; "
            "use the checkpoint made for this model or change the model config"
        )


# --- evaluation --------------------------------------------------------------------------------------------------


@torch.no_grad()
def accuracy(
    model: nn.Module, dataset, device: torch.device, max_images: int | None = None, batch_size: int = 256
) -> float:
    """Top-1 accuracy (%) on the first ``max_images`` images of ``dataset``."""
    if max_images is not None and max_images < len(dataset):
        dataset = Subset(dataset, range(max_images))
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        logits = model(x.to(device))
        correct += (logits.argmax(-1).cpu() == y).sum().item()
        total += len(y)
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def probe_configs(space: RankSpace) -> dict[str, dict[str, int]]:
    """The largest, middle uniform and smallest configurations reported every epoch."""
    uniform = list(space.uniform_configs().values())
    probes = {"largest": space.largest()}
    if len(uniform) > 2:
        probes["middle"] = uniform[len(uniform) // 2]
    probes["smallest"] = space.smallest()
    return probes


# --- the loop ------------------------------------------------------------------------------------------------------


def run_worker(payload: dict[str, Any], session: Session) -> None:
    """Train one stage (``payload["stage"]``: ``pretrain`` or ``train``) on this worker."""
    cfg: Config = build_dataclass(Config, payload["config"], "")
    stage, run_dir = payload["stage"], Path(payload["run_dir"])
    if cfg.run.threads_per_worker:
        torch.set_num_threads(cfg.run.threads_per_worker)
    torch.manual_seed(cfg.run.seed)
    loop = _Loop(cfg, stage, run_dir, session, payload)
    loop.run()


class _Loop:
    def __init__(self, cfg: Config, stage: str, run_dir: Path, session: Session, payload: dict[str, Any]) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} is not one of {STAGES}")
        self.cfg, self.stage, self.run_dir, self.session = cfg, stage, run_dir, session
        self.opt = cfg.pretrain if stage == "pretrain" else cfg.train
        self.fault = payload.get("fault_injection")
        self.sample_log = Path(payload["sample_log_dir"]) if payload.get("sample_log_dir") else None
        self.device = session.device
        self.is_main = session.world_rank == 0
        self.splits = build_datasets(cfg.data)
        self.spec = resolve_model_spec(cfg)
        if self.spec.kwargs.get("num_classes") != self.splits.num_classes:
            raise ValueError(
                f"model.kwargs.num_classes={self.spec.kwargs.get('num_classes')} but the data has "
                f"{self.splits.num_classes} classes"
            )
        if stage == "pretrain":
            self.supernet, self.teacher, self.sampler = None, None, None
            self.net = self.spec.create(device=self.device)
        else:
            self.supernet, self.teacher = build_run_supernet(cfg, run_dir, self.device)
            self.sampler = build_sampler(cfg.train.sampler, self.supernet.space)
            self.net = self.supernet
        self.model = session.prepare_model(self.net)
        self.optimizer = build_optimizer(self.model, self.opt.lr, self.opt.weight_decay)
        self.train_sampler = DistributedSampler(
            self.splits.train,
            num_replicas=session.world_size,
            rank=session.world_rank,
            shuffle=True,
            seed=cfg.run.seed,
            drop_last=True,
        )
        self.loader = DataLoader(
            self.splits.train, batch_size=self.opt.batch_size, sampler=self.train_sampler, drop_last=True
        )
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{stage}.batch_size={self.opt.batch_size} is larger than a worker's share of the training data "
                f"({len(self.train_sampler)} images); lower the batch size"
            )
        total = self.opt.epochs * self.steps_per_epoch
        self.scheduler = build_scheduler(
            self.optimizer, total, int(self.opt.warmup_epochs * self.steps_per_epoch), self.opt.min_lr
        )
        self.autocast, self.scaler = self._amp()
        self.epoch, self.global_step, self.history = 0, 0, []
        self.config_checks = 0

    def _amp(self):
        if self.device.type != "cuda" or self.opt.amp == "off":
            return contextlib.nullcontext, None
        dtype = torch.float16 if self.opt.amp == "fp16" else torch.bfloat16
        if self.opt.amp == "auto" and not torch.cuda.is_bf16_supported():
            dtype = torch.float16
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        return (lambda: torch.autocast("cuda", dtype=dtype)), scaler

    # -- checkpoints --

    def _restore(self) -> None:
        with self.session.checkpoint_dir() as directory:
            if directory is None:
                return
            tensors, _ = read_checkpoint(Path(directory) / MODEL_FILE, device=self.device)
            load_state_dict_strict(self.net.model if self.supernet else self.net, tensors, directory)
            state = torch.load(Path(directory) / STATE_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.history = json.loads(state["history"])
        if self.is_main:
            logger.info("%s: resumed from the checkpoint after epoch %d", self.stage, self.epoch)

    def _write_checkpoint(self, directory: Path) -> None:
        if self.supernet is not None:
            write_checkpoint(directory / MODEL_FILE, self.supernet.model.state_dict(), self.supernet.header())
        else:
            write_checkpoint(directory / MODEL_FILE, self.net.state_dict(), dense_checkpoint_metadata(self.spec))
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "history": json.dumps(self.history),
        }
        torch.save(state, directory / STATE_FILE)

    # -- steps --

    def _configs_for_step(self, step: int) -> list[dict[str, int]]:
        configs = self.sampler.sample(step_generator(self.cfg.run.seed, self.epoch, step))
        digest = config_digest(configs[-1])
        if self.session.world_size > 1:
            low = torch.tensor([digest], dtype=torch.int64)
            high = low.clone()
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
            if low.item() != high.item():
                raise RuntimeError(f"workers sampled different subnets at epoch {self.epoch} step {step}")
            self.config_checks += 1
        if self.sample_log is not None:
            self.sample_log.mkdir(parents=True, exist_ok=True)
            with open(self.sample_log / f"rank{self.session.world_rank}.jsonl", "a") as handle:
                handle.write(json.dumps({"epoch": self.epoch, "step": step, "digest": digest}) + "\n")
        return configs

    def _train_step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.supernet is None:
            with self.autocast():
                loss = nn.functional.cross_entropy(self.model(x).float(), y, label_smoothing=self.opt.label_smoothing)
            self._backward(loss)
            return loss.item()
        configs = self._configs_for_step(step)
        with torch.no_grad(), self.autocast():
            teacher_logits = self.teacher(x)
        total = 0.0
        for i, config in enumerate(configs):
            self.supernet.set_ranks(config)
            last = i == len(configs) - 1
            no_sync = getattr(self.model, "no_sync", None)
            context = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
            with context:
                with self.autocast():
                    logits = self.model(x)
                loss = distillation_loss(
                    logits,
                    teacher_logits,
                    y,
                    self.opt.temperature,
                    self.opt.label_weight,
                    self.opt.label_smoothing,
                )
                self._backward(loss / len(configs))
            total += loss.item() / len(configs)
        return total

    def _backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.opt.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.opt.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self.scheduler.step_update(self.global_step)

    # -- epochs --

    def run(self) -> None:
        self._restore()
        start = time.perf_counter()
        start_epoch = self.epoch
        while self.epoch < self.opt.epochs:
            self._maybe_fail()
            loss, images, seconds = self._train_epoch(start, start_epoch)
            metrics = {
                "epoch": self.epoch + 1,
                "loss": loss,
                "images_per_s": images * self.session.world_size / seconds,
                "lr": self.optimizer.param_groups[0]["lr"],
                "config_checks": self.config_checks,
            }
            if self.is_main:
                metrics.update(self._evaluate())
            self.epoch += 1
            self.history.append(metrics)
            if self.is_main:
                logger.info("%s epoch %d/%d: %s", self.stage, self.epoch, self.opt.epochs, _fmt(metrics))
            self._report(metrics)

    def _train_epoch(self, start: float, start_epoch: int) -> tuple[float, int, float]:
        self.train_sampler.set_epoch(self.epoch)
        self.model.train()
        t0, loss_sum, images = time.perf_counter(), 0.0, 0
        for step, (x, y) in enumerate(self.loader):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            loss_sum += self._train_step(step, x, y)
            self._optimizer_step()
            images += len(y)
            if self.is_main and (step + 1) % self.opt.log_every == 0:
                self._log_progress(step + 1, images, t0, start, start_epoch)
        seconds = max(time.perf_counter() - t0, 1e-9)
        return loss_sum / self.steps_per_epoch, images, seconds

    def _log_progress(self, step: int, images: int, t0: float, start: float, start_epoch: int) -> None:
        elapsed = time.perf_counter() - start
        done = (self.epoch - start_epoch) * self.steps_per_epoch + step
        left = (self.opt.epochs - self.epoch) * self.steps_per_epoch - step
        rate = images * self.session.world_size / max(time.perf_counter() - t0, 1e-9)
        eta = elapsed / max(done, 1) * left
        logger.info(
            "%s epoch %d/%d step %d/%d: %.0f img/s, ETA %s",
            self.stage,
            self.epoch + 1,
            self.opt.epochs,
            step,
            self.steps_per_epoch,
            rate,
            _duration(eta),
        )

    def _evaluate(self) -> dict[str, float]:
        limit = getattr(self.opt, "eval_images", None)
        if self.supernet is None:
            out = {"search_acc": accuracy(self.net, self.splits.search, self.device, limit)}
            if self.epoch + 1 == self.opt.epochs:  # the dense teacher's final test accuracy, for the report
                out["test_acc"] = accuracy(self.net, self.splits.test, self.device)
            return out
        out = {}
        for name, config in probe_configs(self.supernet.space).items():
            self.supernet.set_ranks(config)
            out[f"search_acc_{name}"] = accuracy(self.supernet, self.splits.search, self.device, limit)
        return out

    def _report(self, metrics: dict[str, Any]) -> None:
        due = self.epoch % self.opt.checkpoint_every == 0 or self.epoch == self.opt.epochs
        if not due:
            self.session.report(metrics, None)
            return
        directory = Path(tempfile.mkdtemp(prefix="flora-ckpt-")) if self.is_main else None
        try:
            if directory is not None:
                self._write_checkpoint(directory)
            self.session.report(metrics, directory)
        finally:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)

    def _maybe_fail(self) -> None:
        """Test hook: raise once on one rank at the start of an epoch (marker file makes it once)."""
        fault = self.fault
        if not fault or self.session.world_rank != fault.get("rank", 0) or self.epoch != fault["epoch"]:
            return
        marker = Path(fault["marker"])
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"failed at epoch {self.epoch}\n")
        raise RuntimeError(f"injected failure at epoch {self.epoch} on rank {self.session.world_rank}")


def _fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def save_stage_outputs(checkpoint_dir: Path, run_dir: Path, stage: str) -> Path:
    """Copy the final model of a stage into the run directory (atomically) with its metric history."""
    target = run_dir / (TEACHER_FILE if stage == "pretrain" else SUPERNET_FILE)
    tensors, header = read_checkpoint(checkpoint_dir / MODEL_FILE)
    state = torch.load(checkpoint_dir / STATE_FILE, map_location="cpu", weights_only=True)
    history = json.loads(state["history"])
    header = {**header, "history": history}
    write_checkpoint(target, tensors, header)
    write_json(run_dir / f"{stage}_history.json", history)
    return target
