"""Training pieces without Ray: samplers, losses, parameter groups, the worker loop and its resume logic."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import flora_ray as fr
from flora_ray.config import config_to_dict
from flora_ray.core.supernet import build_space
from flora_ray.stages.inputs import build_run_supernet, full_space, resolve_space
from flora_ray.stages.training import train_worker
from flora_ray.storage.run_store import RunStore
from flora_ray.testing.faults import FaultSession
from flora_ray.training.optim import distillation_loss, param_groups, soft_cross_entropy
from flora_ray.training.sampling import BlockwiseSampler, SandwichSampler, build_sampler, config_digest, step_generator
from flora_ray.training.tasks import probe_configs
from flora_ray.training.trainer import LocalSession


def _space():
    model = fr.create_model("test_vit", img_size=32, depth=2, embed_dim=48, device="meta")
    return build_space(model, ratios=[0.25, 0.5, 1.0], model_name="test_vit")


def test_lowrank_sampler_frequencies_match_inverse_ratio_product():
    space = _space()
    sampler = BlockwiseSampler(space, "lowrank")
    block = space.blocks[0]
    # Hand-computed: weight of a tuple = 1 / (rho_qkv * rho_fc1 * rho_fc2); ratios here are 0.25, 0.5, 1.
    ratios = {12: 0.25, 24: 0.5, 48: 1.0}
    weights = np.array([1 / math.prod(ratios[r] for r in cand) for cand in block.candidates])
    np.testing.assert_allclose(sampler.probabilities[0], weights / weights.sum())
    rng = np.random.default_rng(0)
    index = {cand: i for i, cand in enumerate(block.candidates)}
    counts = np.zeros(len(block.candidates))
    for _ in range(20000):
        config = sampler.sample(rng)[0]
        counts[index[tuple(config[f] for f in block.fqns)]] += 1
    expected = sampler.probabilities[0] * counts.sum()
    assert chisquare(counts, expected).pvalue > 1e-3
    # The smallest triple is drawn 64x as often as the full-rank one.
    smallest, largest = index[(12, 12, 12)], index[(48, 48, 48)]
    assert counts[smallest] / counts[largest] == pytest.approx(64, rel=0.35)


def test_uniform_and_sandwich_samplers():
    space = _space()
    uniform = BlockwiseSampler(space, "uniform")
    np.testing.assert_allclose(uniform.probabilities[1], np.full(27, 1 / 27))
    configs = SandwichSampler(space).sample(np.random.default_rng(0))
    assert configs[0] == space.largest() and configs[1] == space.smallest() and len(configs) == 3
    with pytest.raises(ValueError, match="sampler 'greedy' is not supported"):
        build_sampler("greedy", space)


def test_samplers_respect_a_filtered_space():
    space = _space()
    kept = [space.blocks[0].candidates[i] for i in (0, 5, 26)]
    filtered = space.restrict({space.blocks[0].name: kept})
    sampler = build_sampler("lowrank", filtered)
    rng = np.random.default_rng(1)
    draws = [sampler.sample(rng)[0] for _ in range(300)]
    seen = {tuple(config[f] for f in space.blocks[0].fqns) for config in draws}
    assert seen == set(kept)


def test_step_generator_is_shared_and_deterministic():
    space = _space()
    sampler = build_sampler("lowrank", space)
    a = sampler.sample(step_generator(7, 2, 13))[0]
    b = sampler.sample(step_generator(7, 2, 13))[0]
    assert a == b and config_digest(a) == config_digest(b)
    draws = {config_digest(sampler.sample(step_generator(7, 2, s))[0]) for s in range(50)}
    assert len(draws) > 40


def test_distillation_loss_equals_hand_computed_value():
    student = torch.tensor([[1.0, 2.0, 0.5]])
    teacher = torch.tensor([[0.0, 3.0, 1.0]])
    p = [math.exp(v) / sum(math.exp(u) for u in (0.0, 3.0, 1.0)) for v in (0.0, 3.0, 1.0)]
    log_q = [v - math.log(sum(math.exp(u) for u in (1.0, 2.0, 0.5))) for v in (1.0, 2.0, 0.5)]
    expected = -sum(pi * qi for pi, qi in zip(p, log_q, strict=True))
    assert soft_cross_entropy(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    # Temperature 2: softened distributions, scaled by T^2.
    p2 = [math.exp(v / 2) / sum(math.exp(u / 2) for u in (0.0, 3.0, 1.0)) for v in (0.0, 3.0, 1.0)]
    log_q2 = [v / 2 - math.log(sum(math.exp(u / 2) for u in (1.0, 2.0, 0.5))) for v in (1.0, 2.0, 0.5)]
    expected2 = -4 * sum(pi * qi for pi, qi in zip(p2, log_q2, strict=True))
    assert soft_cross_entropy(student, teacher, 2.0).item() == pytest.approx(expected2, rel=1e-6)
    label = torch.tensor([1])
    ce = -log_q[1]
    assert distillation_loss(student, teacher, label, 1.0, 0.5).item() == pytest.approx(expected + 0.5 * ce, rel=1e-6)


def test_param_groups_skip_norms_biases_tokens_and_pos_embed():
    supernet = fr.build_supernet("test_vit", model_kwargs={"img_size": 32})
    decay, no_decay = param_groups(supernet, 0.01)
    names = {id(p): n for n, p in supernet.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "model.pos_embed" in skipped and "model.cls_token" in skipped
    assert "model.blocks.0.norm1.weight" in skipped and "model.blocks.0.attn.qkv.bias" in skipped
    assert "model.blocks.0.attn.qkv.u" in decayed and "model.blocks.0.attn.qkv.vt" in decayed
    assert "model.blocks.0.attn.proj.weight" in decayed and "model.head.weight" in decayed
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert len(decayed) + len(skipped) == len(list(supernet.parameters()))


def test_probe_configs():
    space = _space()
    probes = probe_configs(space)
    assert probes["largest"] == space.uniform(1.0) and probes["smallest"] == space.uniform(0.25)
    assert probes["middle"] == space.uniform(0.5)


def _payload(cfg, stage):
    payload = {"config": config_to_dict(cfg), "stage": stage, "run": str(cfg.run.run_dir)}
    if stage == "train":  # what the train stage's driver resolves and sends
        payload["space"] = resolve_space(cfg, RunStore(cfg.run.run_dir), full_space(cfg)).to_dict()
    return payload


def test_local_train_interrupted_then_resumed_matches_checkpoint(digits_config, with_teacher, tmp_path):
    cfg = digits_config()
    with_teacher(cfg)
    session = LocalSession(tmp_path / "ckpt")
    fault = {"epoch": 1, "rank": 0, "marker": str(tmp_path / "failed")}
    with pytest.raises(RuntimeError, match="injected failure at epoch 1"):
        train_worker(_payload(cfg, "train"), FaultSession(session, fault, str(tmp_path / "s")))
    assert [r["epoch"] for r in session.reports] == [1]
    state = torch.load(tmp_path / "ckpt" / "latest" / "state.pt", weights_only=True)
    assert state["epoch"] == 1
    train_worker(_payload(cfg, "train"), FaultSession(session, fault, str(tmp_path / "s")))
    assert [r["epoch"] for r in session.reports] == [1, 2, 3]
    lines = [json.loads(line) for line in (tmp_path / "s" / "rank0.jsonl").read_text().splitlines()]
    steps = [(d["epoch"], d["step"]) for d in lines]
    assert len(steps) == len(set(steps))  # no epoch trained twice: the resumed run started at epoch 1
    assert {e for e, _ in steps} == {0, 1, 2}


def test_resumed_run_draws_what_an_uninterrupted_run_draws(digits_config, with_teacher, tmp_path):
    cfg = digits_config("train.epochs=2")
    with_teacher(cfg)
    train_worker(_payload(cfg, "train"), FaultSession(LocalSession(tmp_path / "c1"), sample_log=str(tmp_path / "a")))
    session = LocalSession(tmp_path / "c2")
    fault = {"epoch": 1, "marker": str(tmp_path / "m")}
    with pytest.raises(RuntimeError):
        train_worker(_payload(cfg, "train"), FaultSession(session, fault, str(tmp_path / "b")))
    train_worker(_payload(cfg, "train"), FaultSession(session, fault, str(tmp_path / "b")))
    draws = [
        [
            (r["epoch"], r["step"], r["digest"])
            for r in map(json.loads, (tmp_path / d / "rank0.jsonl").read_text().splitlines())
        ]
        for d in ("a", "b")
    ]
    assert draws[0] == draws[1]


def test_pretrain_learns_digits(digits_config, tmp_path):
    cfg = digits_config("pretrain.epochs=8", "pretrain.lr=0.003", "pretrain.batch_size=32")
    session = LocalSession(tmp_path / "ckpt")
    train_worker(_payload(cfg, "pretrain"), session)
    accuracies = [r["search_acc"] for r in session.reports]
    assert len(accuracies) == 8 and accuracies[-1] > 40  # chance is 10%
    assert session.reports[-1]["loss"] < session.reports[0]["loss"]


def test_space_file_for_another_model_is_rejected(digits_config, with_teacher, tmp_path):
    cfg = digits_config()
    full = _space()  # a different model (embed 48, 32 px)
    full.save(tmp_path / "other.json")
    cfg2 = digits_config(f"train.space_file={tmp_path / 'other.json'}")
    with_teacher(cfg2)
    with pytest.raises(ValueError, match="was made for another model"):
        build_run_supernet(cfg2, RunStore(cfg2.run.run_dir))
    (tmp_path / "corrupt.json").write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        resolve_space(digits_config(f"train.space_file={tmp_path / 'corrupt.json'}"), RunStore(cfg.run.run_dir), full)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_training_with_mixed_precision(digits_config, with_teacher, tmp_path, amp):
    cfg = digits_config("train.epochs=1", f"train.amp={amp}")
    with_teacher(cfg)
    session = LocalSession(tmp_path / "ckpt", device="cuda")
    train_worker(_payload(cfg, "train"), session)
    assert math.isfinite(session.reports[-1]["loss"])
    supernet = fr.load_supernet(tmp_path / "ckpt" / "latest" / "model.safetensors", device="cuda")
    assert next(supernet.parameters()).device.type == "cuda"


def test_the_cross_worker_check_puts_its_collectives_on_the_models_device(monkeypatch):
    """NCCL accepts only tensors on the GPU: every tensor a collective receives lives where the model lives."""
    from types import SimpleNamespace

    from flora_ray.training.callbacks import ConfigCheck

    seen = []

    class Seen(Exception):
        pass

    def all_reduce(tensor, op=None):
        seen.append(tensor.device)
        raise Seen  # a meta tensor cannot be reduced; the device is what this test is about

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    model = torch.nn.Linear(2, 2, device="meta")  # stands in for a model on cuda:N
    trainer = SimpleNamespace(session=SimpleNamespace(world_size=2), model=model, device=torch.device("cpu"), epoch=0)
    with pytest.raises(Seen):
        ConfigCheck().on_configs(trainer, 0, [{"blocks.0.attn.qkv": 4}])
    assert seen == [torch.device("meta")]


def test_a_supernet_worker_never_guesses_its_space(digits_config, with_teacher, tmp_path):
    """The driver resolves the space; a worker without it fails, and a finished filter whose space cannot be read
    is an error on the driver, not a silent fallback to the full space."""
    cfg = digits_config()
    with_teacher(cfg)
    payload = _payload(cfg, "train")
    del payload["space"]
    with pytest.raises(ValueError, match="needs the run's rank space"):
        train_worker(payload, LocalSession(tmp_path / "ckpt"))
    store = RunStore(cfg.run.run_dir)
    assert resolve_space(cfg, store, full_space(cfg)) == full_space(cfg)  # no filter run: the full space, said so
    store.write_json("stages/filter.json", {"stage": "filter"})
    with pytest.raises(FileNotFoundError, match="the filter stage finished but its space .* cannot be read"):
        resolve_space(cfg, store, full_space(cfg))


def test_resume_from_a_mid_epoch_checkpoint_repeats_at_most_the_interval_and_ends_identical(
    digits_config, with_teacher, tmp_path
):
    """checkpoint_every_steps=2 and augmented data: a failure after step 3 of epoch 1 resumes at step 2 (one step
    repeated), draws the subnets and images an uninterrupted run draws, and ends with the same weights."""
    cfg = digits_config("train.epochs=2", "train.checkpoint_every_steps=2", "train.batch_size=64", "data.augment=true")
    with_teacher(cfg)
    clean = LocalSession(tmp_path / "c1")
    train_worker(_payload(cfg, "train"), FaultSession(clean, sample_log=str(tmp_path / "a")))
    session = LocalSession(tmp_path / "c2")
    fault = {"epoch": 1, "step": 3, "marker": str(tmp_path / "m")}
    with pytest.raises(RuntimeError, match="injected failure at epoch 1 step 3"):
        train_worker(_payload(cfg, "train"), FaultSession(session, fault, str(tmp_path / "b")))
    state = torch.load(tmp_path / "c2" / "latest" / "state.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2)
    train_worker(_payload(cfg, "train"), FaultSession(session, fault, str(tmp_path / "b")))
    log = [json.loads(line) for line in (tmp_path / "b" / "rank0.jsonl").read_text().splitlines()]
    steps = [(r["epoch"], r["step"]) for r in log]
    assert len(steps) - len(set(steps)) == 1  # step 2 of epoch 1 ran twice: at most checkpoint_every_steps repeated
    deduplicated = {(r["epoch"], r["step"]): r["digest"] for r in log}
    reference = [json.loads(line) for line in (tmp_path / "a" / "rank0.jsonl").read_text().splitlines()]
    assert deduplicated == {(r["epoch"], r["step"]): r["digest"] for r in reference}
    assert [r["epoch"] for r in session.reports if "loss" in r][-1] == 2
    final, resumed = (
        torch.load(d / "latest" / "state.pt", weights_only=True) for d in (tmp_path / "c1", tmp_path / "c2")
    )
    assert json.loads(final["history"])[-1]["loss"] == pytest.approx(json.loads(resumed["history"])[-1]["loss"])
    from flora_ray.storage.files import read_checkpoint

    a, _ = read_checkpoint(tmp_path / "c1" / "latest" / "model.safetensors")
    b, _ = read_checkpoint(tmp_path / "c2" / "latest" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


def test_a_checkpoint_staged_by_a_killed_process_is_removed_by_the_next_report(tmp_path, monkeypatch):
    """A worker killed between staging its checkpoint and Ray Train collecting it (a reclaimed node, a stopped job)
    leaves the staging directory behind; the next process to stage one removes it, and nothing of a live process."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    from flora_ray.training.callbacks import staging_dir

    script = ("import os, signal; from flora_ray.training.callbacks import staging_dir; "
              "(staging_dir() / 'model.safetensors').write_bytes(b'weights'); os.kill(os.getpid(), signal.SIGKILL)")  # fmt: skip
    killed = subprocess.run([sys.executable, "-c", script], env={**os.environ, "TMPDIR": str(tmp_path)}, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    (orphan,) = tmp_path.glob("flora-ckpt-*")
    older = tmp_path / "flora-ckpt-04vlyg_z"  # a name without a process id (earlier versions): not ours to judge
    older.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    first = staging_dir()
    second = staging_dir()  # this process is alive: its own directories stay
    assert not orphan.exists() and older.is_dir() and first.is_dir() and second.is_dir()
    assert first.name.startswith(f"flora-ckpt-{os.getpid()}-")
