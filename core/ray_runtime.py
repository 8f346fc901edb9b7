"""Starting or joining Ray: a cluster when RAY_ADDRESS (or ray.address) names one, a local Ray otherwise.

What reaches the console: our own progress and results (printed by the driver and, through Ray, by the
training workers), warnings and errors. Ray's own INFO lines (the local instance starting, the token
authentication notice, Ray Train's worker-group and process-group lines) stay in Ray's session logs
(/tmp/ray/session_latest/logs); `RAY_LOG_LEVEL=INFO` brings them back to the console.
"""
from __future__ import annotations

import logging
import os
import sys

from core.config import RayConfig
from core.storage import storage_env

_dashboard: dict[str, str | None] = {"url": None}


class RayUnavailable(ValueError):
    """The Ray cluster named (RAY_ADDRESS or ray.address) cannot be joined: names the address and where it came
    from. Joining a dead address would otherwise cost Ray's own two minutes of retries, then an exit."""


def _reachable(address: str, source: str) -> None:
    """A cluster address (host:port, or ray://host:port) answers on its port, or RayUnavailable, in seconds."""
    import socket

    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailable(f"{source} = {address!r}: expected host:port (the head's GCS, port 6379 by default), "
                             f"ray://host:port, or auto")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as err:
        raise RayUnavailable(f"{source} = {address!r}: no Ray head answers there ({err}); start one (`ray start "
                             f"--head`, `make up`) or unset it to run on a local Ray") from None


def _console_level() -> str:
    return os.environ.get("RAY_LOG_LEVEL", "WARNING").upper()


def train_logging():
    """Ray Train's console logging: warnings and errors (its INFO lines go to its log files only).

    On a one-machine Ray there is no node to be preempted, so Ray Train's preemption watcher (an observability
    actor: it reports node drains) is left out there, unless RAY_TRAIN_ENABLE_PREEMPTION_WATCHER says otherwise;
    starting it makes Ray's core worker log an `E ... core_worker.cc` line on every run that is not a failure.
    Clusters of several machines keep it.
    """
    import ray
    from ray.train import LoggingConfig

    if len([node for node in ray.nodes() if node.get("Alive")]) == 1:
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # read by the driver, passed on by Ray
    return LoggingConfig(log_level=_console_level())


def init_ray(cfg: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry calls out
    address = os.environ.get("RAY_ADDRESS") or cfg.address
    source = "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "ray.address"
    # The driver's `ray` logger: the local-instance notices are INFO lines, so only warnings and errors.
    driver_level = logging.WARNING if _console_level() == "WARNING" else _console_level()
    quiet = {
        "logging_level": driver_level,
        "log_to_driver": True,  # the workers' own output: the training progress lines
        "logging_config": ray.LoggingConfig(log_level=_console_level()),  # Python logging in the job's workers
    }
    env = storage_env()  # the object-storage credentials this driver was given reach its workers too
    if env:
        quiet["runtime_env"] = {"env_vars": env}
    quiet["job_config"] = ray.job_config.JobConfig(metadata=job_metadata())  # what the dashboard's Jobs page shows
    if address:
        if address != "auto":
            _reachable(address, source)
        try:
            context = ray.init(address=address, **quiet)
        except ConnectionError as err:  # `auto` with no cluster on this machine
            raise RayUnavailable(f"{source} = {address!r}: {err}") from None
    else:
        # address="local": our own Ray, not a head that `ray start` left running on this machine. Its dashboard
        # shows the run (and Ray Train asks its state API about its workers). Token authentication stays on, as
        # Ray's default for a new local cluster; only its notice saying so is kept off the console (its other
        # warning, about a cluster without authentication, cannot apply to this one).
        if _console_level() == "WARNING":
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        context = ray.init(address="local", num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_memory,
                           include_dashboard=True, dashboard_host="127.0.0.1", **quiet)
    url = getattr(context, "dashboard_url", None)
    _dashboard["url"] = (url if url.startswith("http") else f"http://{url}") if url else None
    from tqdm import tqdm

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    # through tqdm: a stage's progress bar may be on the line already; it is redrawn below this one
    tqdm.write(f"Ray: {len(nodes)} node(s), {int(ray.cluster_resources().get('CPU', 0))} CPUs, "
               f"{int(ray.cluster_resources().get('GPU', 0))} GPUs" +
               (f"; dashboard {_dashboard['url']}" if _dashboard["url"] else ""), file=sys.stderr)


def job_metadata() -> dict[str, str]:
    """The Ray job's name in the dashboard: the Prefect flow run that started it, or the command."""
    command = " ".join(["python -m pipeline" if sys.argv[0].endswith(("pipeline/__main__.py", "-m")) else
                        os.path.basename(sys.argv[0]), *sys.argv[1:2]]).strip()
    metadata = {"job_name": command, "command": " ".join(sys.argv)[:500]}
    if "prefect" in sys.modules:  # in a flow run: named after it, as the Prefect UI names it
        from prefect.runtime import flow_run

        if flow_run.get_id():
            metadata |= {"job_name": f"{flow_run.get_flow_name()} / {flow_run.get_name()}",
                         "prefect_flow_run": str(flow_run.get_id())}
    return metadata


def require_resources(per_worker: dict[str, float], workers: int, what: str) -> None:
    """Before any work: the cluster's live nodes can hold `workers` workers of `per_worker` resources each (a worker
    is placed on one node), else RayUnavailable naming what is missing; Ray would otherwise wait for them forever."""
    fits, have = capacity(per_worker)
    if fits < workers:
        raise RayUnavailable(f"{what}: {workers} worker(s) of {per_worker} each, but the cluster's nodes hold {fits} "
                             f"({have}); add nodes with those resources, or ask for fewer or smaller workers")


def capacity(per_worker: dict[str, float]) -> tuple[int, str]:
    """(how many workers of `per_worker` resources the cluster's live nodes hold, a worker placed on one node;
    each live node's CPUs and GPUs, in words)."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    fits = sum(int(min(node.get(k, 0.0) / v for k, v in per_worker.items() if v > 0)) for node in nodes)
    return fits, ", ".join(f"{{CPU: {n.get('CPU', 0):g}, GPU: {n.get('GPU', 0):g}}}" for n in nodes) or "none alive"


def node_name() -> str:
    """Where this process runs, as a shard's stats record it: the host, and its Ray node where Ray runs it."""
    import socket

    import ray

    name = socket.gethostname()
    if ray.is_initialized():
        node = ray.get_runtime_context().get_node_id()
        name = f"{name}/{node[:8]}" if node else name
    return name


def live_nodes() -> set[str] | None:
    """The nodes of the cluster this process joined that are alive now, named as `node_name` names them in a
    shard's stats; None where this process is not on Ray."""
    import ray

    if not ray.is_initialized():
        return None
    return {f"{n['NodeManagerHostname']}/{n['NodeID'][:8]}" for n in ray.nodes() if n.get("Alive")}


def dashboard_url() -> str | None:
    """The Ray dashboard of the cluster this process joined (None for a local Ray without one)."""
    return _dashboard["url"]


def dashboard_sign_in(token_path: str | None = None) -> str:
    """How a browser gets past the dashboard's "Authentication Token Required" page: Ray (2.52 on) guards it with
    a token unless RAY_AUTH_MODE=disabled. `token_path`: the file the head read its token from, where known."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return "no sign-in (RAY_AUTH_MODE=disabled)"
    token_path = token_path or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if token_path:
        return f"sign in: paste the token in {token_path} into its page"
    return "sign in: paste the token `ray get-auth-token` prints on the head's machine into its page"


def named_for_the_dashboard(worker_class, job: str):
    """The worker class, shown in the Ray dashboard (and its log prefixes) as `LabelWorker (python -m pipeline
    label)` or `LabelWorker (cc12m-pipeline / lively-heron)`: Ray shows an actor's __repr__."""
    name = f"{worker_class.__name__} ({job})"
    return type(worker_class.__name__, (worker_class,), {"__repr__": lambda self: name,
                                                        "__module__": worker_class.__module__})
