"""Starting or joining Ray: a cluster when RAY_ADDRESS (or ray.address) names one, a local Ray otherwise."""
from __future__ import annotations

import os

from pipeline.config import RayConfig


_dashboard: dict[str, str | None] = {"url": None}


def init_ray(cfg: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry calls out
    address = os.environ.get("RAY_ADDRESS") or cfg.address
    if address:
        context = ray.init(address=address, log_to_driver=True)
    else:
        # address="local": our own Ray, not a head that `ray start` left running on this machine. Its dashboard
        # shows the run (and Ray Train asks its state API about its workers).
        context = ray.init(address="local", num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_memory,
                           include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)
    url = getattr(context, "dashboard_url", None)
    _dashboard["url"] = (url if url.startswith("http") else f"http://{url}") if url else None


def dashboard_url() -> str | None:
    """The Ray dashboard of the cluster this process joined (None for a local Ray without one)."""
    return _dashboard["url"]
