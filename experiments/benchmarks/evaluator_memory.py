"""Evaluator memory: what a search evaluator actor holds with N search images at 224 px, uint8 shared against the
float32 copy that every evaluator used to hold.

An image folder of real JPEG files (``flora_ray.testing.imagefolder``, 256 px, 100 classes) is written to a
temporary directory; its search split holds at least N images. As ``stages.search.search_stage`` does, a Ray task
decodes the stratified search subset once (``search.evaluator.search_images``: uint8 ``(N, 3, 224, 224)``) and the
driver puts it, with a random-init DeiT-Ti supernet's numpy weights, into one ``SearchProblem`` in the object
store. Two actors (one CPU, one torch thread each) receive that object and build their evaluator with the search's
code (``SearchProblem.build_evaluator``: ``build_evaluator`` wraps the read-only object-store arrays with
``torch.from_numpy``) and score one subnet on all N images at ``search.batch_size``. A third actor, after the two,
measures the old way: it makes the same images float32 (``Preprocess`` batch by batch, equal to the float items of
the old path), holds them as its evaluator's images and scores the same subnet.

Per actor, from ``psutil``'s ``memory_full_info`` and ``/proc/self/status``: RSS, USS (pages of this process
alone), anonymous (private) memory and mapped shared memory before building the evaluator (the problem received,
the images mapped but not yet read), after building it, and after the evaluation; the peak over the evaluation is
sampled every few milliseconds from ``/proc/self/statm`` (RSS and private memory), and ``ru_maxrss`` gives the
process's lifetime peak RSS. The budget of one evaluator is then the uint8 images (shared: once per node) + one
float batch (``batch_size x 3 x 224 x 224 x 4`` bytes) + the model + the activations of one batch, against the
float32 copy (``N x 3 x 224 x 224 x 4`` bytes) per actor before. Prints a table, writes
``results/evaluator_memory.json``.

    .venv/bin/python experiments/benchmarks/evaluator_memory.py            # full run: 10,000 images (~20 minutes)
    .venv/bin/python experiments/benchmarks/evaluator_memory.py --smoke    # 200 images (about a minute)
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # local Ray on 127.0.0.1 only; before Ray is imported

import logging
import resource
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
from harness import bench_parser, environment, write_result

import flora_ray as fr
from flora_ray.config import Config, DataConfig, RunConfig, SearchConfig, config_to_dict
from flora_ray.search.evaluator import anchor_points, search_images
from flora_ray.search.filtering import as_numpy_state
from flora_ray.search.study import SearchProblem
from flora_ray.testing.imagefolder import write_image_folder

IMG_SIZE, FOLDER_SIZE = 224, 256
GB, MB = 1e9, 1e6


def image_bytes(n: int, dtype_bytes: int) -> int:
    return n * 3 * IMG_SIZE * IMG_SIZE * dtype_bytes


def process_memory() -> dict[str, int]:
    """This process's memory in bytes: RSS, USS, PSS (psutil) and the resident set's split into anonymous (private)
    memory, shared memory (object-store pages) and file pages (library code), from ``/proc/self/status``."""
    import psutil

    info = psutil.Process().memory_full_info()
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    kb = {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssShmem", "RssFile")}
    return {
        "rss": info.rss,
        "uss": info.uss,
        "pss": info.pss,
        "anon": kb["RssAnon"],
        "shmem": kb["RssShmem"],
        "file": kb["RssFile"],
    }


class PeakSampler:
    """Samples ``/proc/self/statm`` every ``interval_s`` in a thread: peak RSS and peak anonymous memory."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.rss = self.anon = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        resident, shared = int(fields[1]) * self.page, int(fields[2]) * self.page
        self.rss, self.anon = max(self.rss, resident), max(self.anon, resident - shared)

    def _run(self) -> None:
        while not self._done.is_set():
            self._sample()
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self._sample()


def mapping_of(address: int) -> str:
    """The ``/proc/self/maps`` entry holding ``address`` (its path: Ray's plasma file, or anonymous memory)."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            low, high = (int(v, 16) for v in parts[0].split("-"))
            if low <= address < high:
                return " ".join(parts[5:]) or "[anonymous]"
    return "?"


class EvaluatorProbe:
    """A Ray actor that builds an evaluator of a ``SearchProblem`` and measures its own memory on the way."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        # What building an evaluator imports, so that "before" holds the libraries already.
        import timm.data  # noqa: F401

        import flora_ray.data.datasets
        import flora_ray.training.worker  # noqa: F401

    def pid(self) -> int:
        return os.getpid()

    def memory(self) -> dict[str, int]:
        return process_memory()

    def measure(self, problem: SearchProblem, config: dict[str, int], as_float: bool) -> dict:
        """Memory before building the evaluator, after building it, over and after one evaluation of ``config``.

        ``as_float``: the old way, the images made float32 in this process and held as the evaluator's images."""
        from flora_ray.config import Config, build_dataclass
        from flora_ray.data.datasets import preprocess_for
        from flora_ray.search.evaluator import build_evaluator

        images = problem.images
        image_address = images.__array_interface__["data"][0]
        out = {
            "pid": os.getpid(),
            "images_writeable": bool(images.flags.writeable),
            "images_mapping": mapping_of(image_address),
            "before": process_memory(),
        }
        started = time.perf_counter()
        if as_float:
            cfg = build_dataclass(Config, problem.config, "")
            preprocess = preprocess_for(cfg.data)
            floats = torch.empty(images.shape, dtype=torch.float32)
            with warnings.catch_warnings():  # object-store arrays are read-only; this only reads them
                warnings.simplefilter("ignore", UserWarning)
                pixels = torch.from_numpy(images)
            step = cfg.search.batch_size
            for start in range(0, len(floats), step):
                floats[start : start + step] = preprocess(pixels[start : start + step])
            evaluator = build_evaluator(problem.header, problem.weights, problem.config, floats.numpy(), problem.labels)
        else:
            evaluator = problem.build_evaluator()
        out["build_seconds"] = time.perf_counter() - started
        out["built"] = process_memory()
        out["images_dtype"] = str(evaluator.images.dtype)
        out["images_bytes"] = evaluator.images.nbytes
        out["images_shared"] = evaluator.images.data_ptr() == image_address  # no copy of the object-store array
        with PeakSampler() as peak:
            metrics = evaluator.evaluate(config)
        out["after"] = process_memory()
        out["peak_rss"], out["peak_anon"] = peak.rss, peak.anon
        out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["model_bytes"] = sum(t.nbytes for t in evaluator.supernet.model.state_dict().values())
        out["metrics"] = metrics
        out["threads"] = torch.get_num_threads()
        return out


def write_folder(root: Path, classes: int, per_class: int) -> float:
    """The image folder (skipped when ``root/train`` exists already); returns the seconds it took."""
    started = time.perf_counter()
    if not (root / "train").is_dir():
        print(f"writing {classes} x {per_class + 1} JPEG files of {FOLDER_SIZE} px to {root} ...", flush=True)
        write_image_folder(root, classes, train_per_class=per_class, val_per_class=1, size=FOLDER_SIZE)
    return time.perf_counter() - started


def run_config(root: Path, args) -> dict:
    """The run configuration (a plain dict, as the search stage ships it)."""
    search_per_class = -(-args.images // args.classes)  # the search split holds >= N images
    cfg = Config(
        data=DataConfig(
            name="imagefolder",
            root=str(root),
            img_size=IMG_SIZE,
            in_chans=3,
            search_per_class=search_per_class,
            augment=False,
        ),
        search=SearchConfig(eval_images=args.images, batch_size=args.batch_size),
        run=RunConfig(threads_per_worker=1),
    )
    return config_to_dict(cfg)


def plasma_usage() -> str:
    """Ray's one-line object store figure (``Plasma memory usage ...``), or an empty string."""
    import ray

    try:
        from ray._private.internal_api import memory_summary

        # This instance's address: other Ray instances on the machine would make "auto" ambiguous.
        summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    except Exception:  # a private API: the figure is informative only
        return ""
    return next((line.strip() for line in summary.splitlines() if line.startswith("Plasma memory usage")), "")


def measure(root: Path, args) -> dict:
    """Decode the search images in a Ray task, ship one ``SearchProblem`` to two actors and a float32 one."""
    import ray

    config = run_config(root, args)
    supernet = fr.build_supernet(args.model, model_kwargs={"num_classes": args.classes})
    space = supernet.space
    uniform = space.uniform_configs()
    ratio = min(uniform, key=lambda r: abs(r - args.ratio)) if args.ratio is not None else min(uniform)
    subnet = uniform[ratio]
    subnet_gmacs, dense_gmacs = supernet.cost.macs(subnet) / 1e9, supernet.cost.dense_macs / 1e9
    started = time.perf_counter()
    # search_stage: ``backend.call(search_images, ...)`` on a trial's resources, then into the problem.
    images, labels = ray.get(ray.remote(search_images).options(num_cpus=1).remote(config))
    decode_seconds = time.perf_counter() - started
    problem = SearchProblem(
        header=supernet.header(),
        weights=as_numpy_state(supernet.model.state_dict()),
        config=config,
        key="evaluator-memory",
        genes={b.name: len(b.candidates) for b in space.blocks},
        anchors=anchor_points(space),
        trials=1,
        study_name="evaluator-memory",
        journal=str(root / "journal.log"),
        images=images,
        labels=labels,
    )
    del supernet
    problem_ref = ray.put(problem)  # what ``tune.with_parameters`` does with the problem
    store = plasma_usage()
    print(f"{len(labels)} search images decoded in {decode_seconds:.0f} s; object store: {store}", flush=True)
    probe = ray.remote(num_cpus=1)(EvaluatorProbe)
    actors = [probe.remote() for _ in range(args.actors)]
    ray.get([a.pid.remote() for a in actors])  # started and imported
    rows = ray.get([a.measure.remote(problem_ref, subnet, False) for a in actors])
    after_all = ray.get([a.memory.remote() for a in actors])  # every actor has read the images by now
    for i, (row, memory) in enumerate(zip(rows, after_all, strict=True)):
        row.update(actor=f"uint8 {i}", after_all=memory)
    for actor in actors:
        ray.kill(actor)
    if args.float:
        actor = probe.remote()
        row = ray.get(actor.measure.remote(problem_ref, subnet, True))
        row.update(actor="float32 (old)", after_all=row["after"])
        rows.append(row)
        ray.kill(actor)
    return {
        "rows": rows,
        "n_images": len(labels),
        "classes_in_images": len(set(labels.tolist())),
        "subnet_ratio": ratio,
        "subnet_gmacs": subnet_gmacs,
        "dense_gmacs": dense_gmacs,
        "decode_seconds": decode_seconds,
        "object_store": store,
        "config": config,
    }


def summarize(result: dict, args) -> dict:
    """Per-evaluator figures: the float32 copy before, the shared uint8 images and the private increase now."""
    n = result["n_images"]
    new = [r for r in result["rows"] if r["images_dtype"] == "torch.uint8"]
    old = [r for r in result["rows"] if r["images_dtype"] != "torch.uint8"]
    float_batch = image_bytes(min(args.batch_size, n), 4)
    model = new[0]["model_bytes"]
    peak_private = max(r["peak_anon"] - r["before"]["anon"] for r in new)
    summary = {
        "uint8_images_bytes": image_bytes(n, 1),
        "float32_images_bytes": image_bytes(n, 4),
        "float_batch_bytes": float_batch,
        "model_bytes": model,
        "new_private_peak_bytes": peak_private,
        "new_private_after_bytes": max(r["after"]["anon"] - r["before"]["anon"] for r in new),
        "new_uss_after_bytes": max(r["after_all"]["uss"] - r["before"]["uss"] for r in new),
        "new_shared_read_bytes": max(r["after"]["shmem"] - r["before"]["shmem"] for r in new),
        "activations_and_rest_bytes": peak_private - float_batch - model,
        "images_shared_in_place": all(r["images_shared"] and not r["images_writeable"] for r in new),
        # uint8 + Preprocess batch by batch scores exactly what the float32 images score
        "accuracy_equal": len({r["metrics"]["accuracy"] for r in result["rows"]}) == 1,
    }
    if old:
        summary["old_private_after_bytes"] = old[0]["after"]["anon"] - old[0]["before"]["anon"]
        summary["old_private_peak_bytes"] = old[0]["peak_anon"] - old[0]["before"]["anon"]
    return summary


def print_tables(result: dict, summary: dict) -> None:
    def g(value: float) -> str:
        return f"{value / GB:.2f}"

    print(
        "\n| actor | images held | RSS before / built / after / peak GB | USS before / built / after GB "
        "| private (anonymous) + at peak / after GB | shared memory read GB |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in result["rows"]:
        b, m, a = r["before"], r["built"], r["after"]
        held = (
            f"uint8 {g(r['images_bytes'])} GB, shared" if r["images_shared"] else f"float32 {g(r['images_bytes'])} GB"
        )
        print(
            f"| {r['actor']} | {held} | {g(b['rss'])} / {g(m['rss'])} / {g(a['rss'])} / {g(r['peak_rss'])} "
            f"| {g(b['uss'])} / {g(m['uss'])} / {g(a['uss'])} "
            f"| +{g(r['peak_anon'] - b['anon'])} / +{g(a['anon'] - b['anon'])} | {g(a['shmem'] - b['shmem'])} |"
        )
    n = result["n_images"]
    print(
        f"\n{n} images at {IMG_SIZE} px: float32 {g(summary['float32_images_bytes'])} GB per actor before; uint8 "
        f"{g(summary['uint8_images_bytes'])} GB shared per node now (object store: {result['object_store']})."
    )
    print(
        f"Per evaluator now: private memory +{g(summary['new_private_peak_bytes'])} GB at the peak "
        f"(one float batch {summary['float_batch_bytes'] / MB:.0f} MB + model {summary['model_bytes'] / MB:.0f} MB "
        f"+ activations and the rest {summary['activations_and_rest_bytes'] / MB:.0f} MB), "
        f"+{g(summary['new_private_after_bytes'])} GB after; USS +{g(summary['new_uss_after_bytes'])} GB once every "
        f"actor has read the images."
    )
    accuracies = sorted({r["metrics"]["accuracy"] for r in result["rows"]})
    print(
        f"Subnet: uniform {result['subnet_ratio']:.2f} ({result['subnet_gmacs']:.3f} GMACs per image); accuracy "
        f"{' / '.join(f'{a:.2f}' for a in accuracies)}% ({'equal' if summary['accuracy_equal'] else 'DIFFERENT'} "
        "in every actor)."
    )
    if "old_private_after_bytes" in summary:
        print(
            f"Old way (float32 held): private memory +{g(summary['old_private_after_bytes'])} GB after, "
            f"+{g(summary['old_private_peak_bytes'])} GB at the peak."
        )


def main() -> None:
    parser = bench_parser(
        __doc__, smoke={"images": 200, "classes": 10}, smoke_help="200 images of 10 classes, about a minute"
    )
    parser.add_argument("--images", type=int, default=10_000, help="search images N (search.eval_images)")
    parser.add_argument("--classes", type=int, default=100, help="classes of the image folder")
    parser.add_argument("--batch-size", type=int, default=SearchConfig().batch_size, help="search.batch_size")
    parser.add_argument("--model", default="deit_tiny_patch16_224", help="timm model of the supernet (random init)")
    parser.add_argument(
        "--ratio", type=float, help="uniform rank ratio of the subnet (the space's nearest; default: the smallest)"
    )
    parser.add_argument("--actors", type=int, default=2, help="evaluator actors sharing the images")
    parser.add_argument("--no-float", dest="float", action="store_false", help="skip the float32 (old way) actor")
    parser.add_argument("--folder", type=Path, help="image folder to write or reuse (default: a temporary one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    env_before = environment(1)
    started = time.perf_counter()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        root = args.folder or Path(tmp) / "folder"
        per_class = -(-args.images // args.classes) + 1  # search split + one training image per class
        write_seconds = write_folder(root, args.classes, per_class)
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        try:
            result = measure(root, args)
        finally:
            ray.shutdown()
    summary = {**summarize(result, args), "write_seconds": write_seconds, "seconds": time.perf_counter() - started}
    print_tables(result, summary)
    record = {
        "smoke": args.smoke,
        **result,
        "summary": summary,
        "batch_size": args.batch_size,
        "model": args.model,
        **environment(1),
        "loadavg_before": env_before["loadavg"],
    }
    print(f"wrote {write_result(args.output / 'evaluator_memory.json', record)}")


if __name__ == "__main__":
    main()
