"""The search evaluator's memory budget, on a scaled-down case: 300 search images at 224 px.

Evaluators hold the search images as uint8 pixels (one read-only copy per node, from Ray's object store) and make
model inputs batch by batch. So building an evaluator and scoring a subnet may add to a process's private memory
only what one batch needs: the normalised float batch (two while ``Preprocess`` normalises it out of place), the
model, the activations of one forward pass and a fixed slack (allocator, thread pools, kernels) -- never a float
copy of the images (``N x 3 x 224 x 224 x 4`` bytes, what evaluators used to hold each). The images themselves are
shared memory: the process maps them, it does not own them. ``experiments/benchmarks/evaluator_memory.py``
measures the same at 10,000 images on Ray.

The budget is checked in a fresh Python process (so that its memory holds nothing but what the check adds) that
maps the images read-only from a ``/dev/shm`` segment the test process wrote, as an actor maps Ray's object store.
"""

import json
import pickle
import subprocess
import sys
from collections import Counter
from multiprocessing import shared_memory

import numpy as np
import pytest
import torch

import flora_ray as fr
from flora_ray.config import Config, DataConfig, RunConfig, SearchConfig, config_to_dict
from flora_ray.search.evaluator import build_evaluator, search_images
from flora_ray.search.filtering import as_numpy_state
from flora_ray.testing.imagefolder import write_image_folder

pytestmark = [
    pytest.mark.slow,  # about 13 s: 336 JPEG files to write and decode, a fresh Python process
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self and /dev/shm"),
]

N_IMAGES, CLASSES, SEARCH_PER_CLASS, IMG_SIZE, BATCH = 300, 3, 110, 224, 8
MODEL = ("test_vit", {"img_size": IMG_SIZE, "num_classes": CLASSES})  # 6 blocks, width 64, 2 heads, MLP 192
SLACK = 32 * 2**20  # allocator arenas, torch's thread pool and kernel scratch space: measured 15-25 MB
MB = 2**20

# The fresh process: imports what an evaluator actor has imported, maps the shared images read-only, then measures
# its memory before building the evaluator, after building it, at the peak of one evaluation (a sampling thread)
# and after it. /proc/self/status splits the resident set into anonymous (private) memory, shared memory (the
# mapped images) and file pages (code of the libraries, shared with every process that loads them).
CHILD = r"""
import json, mmap, os, pickle, sys, threading, time

import numpy as np
import flora_ray.config, flora_ray.data.datasets, flora_ray.training.worker, timm.data  # what build_evaluator imports
from flora_ray.search.evaluator import build_evaluator

def status():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssShmem", "RssFile")}

PAGE = os.sysconf("SC_PAGE_SIZE")

def anon():
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * PAGE  # resident minus file and shared memory pages

with open(sys.argv[1], "rb") as f:
    problem = pickle.load(f)
fd = os.open(problem["path"], os.O_RDONLY)
segment = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
os.close(fd)
shape = problem["shape"]
images = np.frombuffer(segment, np.uint8, count=int(np.prod(shape))).reshape(shape)  # read-only, as from Ray
before = status()
evaluator = build_evaluator(problem["header"], problem["weights"], problem["config"], images, problem["labels"])
built = status()
peak, done = [anon()], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
metrics = evaluator.evaluate(evaluator.supernet.space.uniform(0.5))
done.set()
sampler.join()
after = status()
peak[0] = max(peak[0], after["RssAnon"])
shares = evaluator.images.data_ptr() == images.__array_interface__["data"][0]
print(json.dumps({"before": before, "built": built, "after": after, "peak_anon": peak[0], "shares": shares,
                  "accuracy": metrics["accuracy"]}))
"""


@pytest.fixture(scope="module")
def search_set(tmp_path_factory):
    """A 3-class folder of 256 px JPEG files (110 search images per class), its run config and search images."""
    root = write_image_folder(
        tmp_path_factory.mktemp("folder"), CLASSES, train_per_class=SEARCH_PER_CLASS + 1, val_per_class=1, size=256
    )
    cfg = Config(
        data=DataConfig(
            name="imagefolder", root=str(root), img_size=IMG_SIZE, search_per_class=SEARCH_PER_CLASS, augment=False
        ),
        search=SearchConfig(eval_images=N_IMAGES, batch_size=BATCH),
        run=RunConfig(threads_per_worker=1),
    )
    config = config_to_dict(cfg)
    images, labels = search_images(config)
    return config, images, labels


@pytest.fixture(scope="module")
def supernet():
    torch.manual_seed(0)
    return fr.build_supernet(MODEL[0], model_kwargs=MODEL[1])


def float_batch_bytes(batch: int) -> int:
    return batch * 3 * IMG_SIZE * IMG_SIZE * 4


def activation_bytes(batch: int) -> int:
    """What one block's forward pass keeps alive at most, generously: per token the qkv projection (3 x width),
    the MLP's hidden layer and two attention rows per head (scores and softmax), in float32."""
    model = fr.create_model(MODEL[0], **MODEL[1], device="meta")
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    block = model.blocks[0]
    per_token = 3 * model.embed_dim + block.mlp.fc1.out_features + 2 * block.attn.num_heads * tokens
    return batch * tokens * per_token * 4


def test_search_images_are_uint8_pixels_of_n_images_with_every_class_in_proportion(search_set):
    _, images, labels = search_set
    assert images.dtype == np.uint8 and images.shape == (N_IMAGES, 3, IMG_SIZE, IMG_SIZE)
    assert images.nbytes == N_IMAGES * 3 * IMG_SIZE * IMG_SIZE  # a quarter of the float32 copy
    assert images.flags.c_contiguous
    assert labels.dtype == np.int64 and labels.shape == (N_IMAGES,)
    # 330 search images of 3 equal classes, 300 taken: 100 of each.
    assert Counter(labels.tolist()) == dict.fromkeys(range(CLASSES), N_IMAGES // CLASSES)


def test_build_evaluator_uses_the_read_only_arrays_in_place(search_set, supernet):
    config, images, labels = search_set
    images, labels = images.copy(), labels.copy()
    images.flags.writeable = labels.flags.writeable = False  # what Ray's object store hands an actor
    evaluator = build_evaluator(supernet.header(), as_numpy_state(supernet.model.state_dict()), config, images, labels)
    assert evaluator.images.dtype == torch.uint8 and evaluator.batch_size == BATCH
    assert evaluator.images.data_ptr() == images.__array_interface__["data"][0]
    assert evaluator.labels.data_ptr() == labels.__array_interface__["data"][0]
    assert evaluator.preprocess(evaluator.images[:2]).dtype == torch.float32


def test_building_and_evaluating_from_shared_images_stays_within_the_budget(search_set, supernet, tmp_path):
    config, images, labels = search_set
    weights = as_numpy_state(supernet.model.state_dict())
    model_bytes = sum(w.nbytes for w in weights.values())
    budget = 2 * float_batch_bytes(BATCH) + model_bytes + activation_bytes(BATCH) + SLACK
    float_copy = images.size * 4  # what an evaluator held before: every image as float32
    assert budget < float_copy / 3, "the scaled-down case no longer separates the two"
    segment = shared_memory.SharedMemory(create=True, size=images.nbytes)
    try:
        np.ndarray(images.shape, np.uint8, buffer=segment.buf)[:] = images  # this process maps the pages too
        problem = {
            "header": supernet.header(),
            "weights": weights,
            "config": config,
            "labels": labels,
            "path": f"/dev/shm/{segment.name}",
            "shape": images.shape,
        }
        (tmp_path / "problem.pkl").write_bytes(pickle.dumps(problem))
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(tmp_path / "problem.pkl")], capture_output=True, text=True, timeout=300
        )
    finally:
        segment.close()
        segment.unlink()
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    before, after = result["before"], result["after"]
    assert result["shares"], "the evaluator copied the images"
    assert 0 <= result["accuracy"] <= 100
    private_peak = result["peak_anon"] - before["RssAnon"]
    private_after = after["RssAnon"] - before["RssAnon"]
    report = (
        f"private memory +{private_peak / MB:.1f} MB at the peak, +{private_after / MB:.1f} MB after; budget "
        f"{budget / MB:.1f} MB; float32 copy {float_copy / MB:.1f} MB"
    )
    assert result["built"]["RssAnon"] - before["RssAnon"] <= SLACK, report  # building copies nothing
    assert private_peak <= budget, report
    assert private_after <= budget, report
    # The resident set without library code: the images, touched once each, come in as shared memory.
    resident = (after["RssAnon"] + after["RssShmem"]) - (before["RssAnon"] + before["RssShmem"])
    assert after["RssShmem"] - before["RssShmem"] <= images.nbytes + MB, report
    assert resident <= images.nbytes + budget, report
