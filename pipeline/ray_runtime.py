"""Starting or joining Ray: a cluster when RAY_ADDRESS (or ray.address) names one, a local Ray otherwise."""
from __future__ import annotations

import os

from pipeline.config import RayConfig


def init_ray(cfg: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry calls out
    address = os.environ.get("RAY_ADDRESS") or cfg.address
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_memory,
                 include_dashboard=False, log_to_driver=True)
