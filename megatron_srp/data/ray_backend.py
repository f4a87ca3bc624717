"""Run preprocessing shards on Ray: Ray Data maps shard numbers through a pool of actors.

Each actor builds the :class:`ShardProcessor` once (tokenizer and classifier loaded once, on a
GPU when the cluster has them and the classifier is a model that can use one) and processes
whole shards, writing into the run's work directory, which must be on a file system every
node sees. The shard files are exactly the local backend's, so both backends publish
byte-identical datasets. Ray is imported only here (``pip install megatron-srp[ray]``).
"""

from __future__ import annotations

import json
import os
import pickle
import re
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from megatron_srp.data.shard_worker import ShardFailed, ShardProcessor
from megatron_srp.data.shards import ShardSpec

GPU_CLASSIFIERS = ("hf",)


class _ShardActor:
    """One Ray Data actor: processes the shards whose numbers it receives."""

    def __init__(self, processor: bytes, specs: bytes) -> None:
        import ray

        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.processor: ShardProcessor = pickle.loads(processor)
        self.specs = {s.index: s for s in pickle.loads(specs)}
        self.gpus = [str(g) for g in ray.get_gpu_ids()]  # the GPU Ray gave this actor, if any

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [json.dumps({**self.processor(self.specs[int(i)]), "gpus": self.gpus})
                   for i in batch["index"]]
        return {"index": batch["index"], "result": np.array(results, dtype=object)}


def run_shards_on_ray(processor: ShardProcessor, todo: Sequence[ShardSpec], workers: int,
                      address: Optional[str] = None
                      ) -> Iterator[tuple[ShardSpec, dict[str, Any]]]:
    """(shard, its counts) as Ray finishes them. Starts a local Ray instance with ``workers``
    CPUs unless ``address`` names a cluster (or Ray is already initialised)."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise RuntimeError("backend 'ray' needs Ray Data: pip install 'megatron-srp[ray]' "
                           f"({exc})") from None
    if not todo:
        return
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else workers,
                 include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver shows its own progress
        classifier = processor.labeler.classifier
        resources = ray.cluster_resources()
        use_gpu = (resources.get("GPU", 0) > 0
                   and getattr(classifier, "name", None) in GPU_CLASSIFIERS)
        # No more actors than the cluster can place (one GPU, or one CPU, each): a fixed-size
        # pool larger than that would wait for actors that never start.
        capacity = int(resources.get("GPU" if use_gpu else "CPU", workers))
        specs = {s.index: s for s in todo}
        dataset = ray.data.from_items([{"index": s.index} for s in todo],
                                      override_num_blocks=len(todo))
        mapped = dataset.map_batches(
            _ShardActor, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=max(1, min(workers, len(todo), capacity))),
            num_gpus=1 if use_gpu else 0,
            num_cpus=0 if use_gpu else 1,
            fn_constructor_args=(pickle.dumps(processor), pickle.dumps(list(todo))))
        try:
            for row in mapped.iter_rows():
                yield specs[int(row["index"])], json.loads(row["result"])
        except Exception as exc:
            failed = _shard_failure(exc)
            if failed is None:
                raise
            raise ShardFailed(failed) from None  # the cause, not Ray's wrapping of it
    finally:
        if started:
            ray.shutdown()


def _shard_failure(exc: BaseException) -> Optional[str]:
    """The message of a :class:`ShardFailed` a worker raised. Ray Data wraps a worker's
    exception in its own (UserCodeException) and keeps the original only as traceback text."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        found = re.search(r"ShardFailed: (shard \d+ .*)", str(e))
        if found:
            return found.group(1).strip()
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None
