"""Ray Data batch inference over cases with an actor pool: the model is loaded once per actor.

Actors that die (a preempted node, an out-of-memory kill) are restarted and their cases retried;
every output file is written atomically to a path determined by the case, so a retried case
overwrites its own files and no case is lost or duplicated.
"""

from __future__ import annotations

import json
from typing import Any

import ray

from raysemi.config import RaysemiConfig
from raysemi.data.brats import CaseRecord


def case_rows(cases: list[CaseRecord], **extra: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the inference dataset: the case as JSON, plus per-case extras (``extra[name][case_id]``)."""
    rows = []
    for case in cases:
        row = {"case_json": json.dumps(case.to_dict())}
        for name, values in extra.items():
            row[name] = values.get(case.case_id)
        rows.append(row)
    return rows


def run_batch_inference(
    callable_class: type, rows: list[dict[str, Any]], cfg: RaysemiConfig, constructor_kwargs: dict[str, Any]
) -> list[dict[str, Any]]:
    """Map ``callable_class`` over ``rows`` (one case per call) with ``train.inference_actors`` actors.

    Returns one result dict per case (order not guaranteed), with ``error`` set for failed cases.
    """
    if not rows:
        return []
    from raysemi.train.launch import use_gpu

    actors = max(1, min(cfg.train.inference_actors, len(rows)))
    # GPU where present: train.inference_gpus_per_actor, else one GPU per actor when train.use_gpu allows.
    gpus = cfg.train.inference_gpus_per_actor or (1.0 if use_gpu(cfg) else 0.0)
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    results = dataset.map_batches(
        callable_class,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=1,
        # One case in flight per actor: cases are few and long, so an idle actor should get the next one.
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
        num_cpus=1,
        num_gpus=gpus or None,
        # Ray Data's actor pools default to max_restarts=-1 and max_task_retries=-1: a dead actor
        # is restarted and its in-flight case retried.
    )
    return [json.loads(row["result_json"]) for row in results.take_all()]
