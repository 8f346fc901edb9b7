"""`make up` / `make down` / `make status`: the local services, in the background, by recorded process ids.

up      starts what is not running yet: a Prefect API server (SQLite under the state folder), a Ray head with
        its dashboard, TensorBoard on the data folder (every training run's live curves and pictures), and
        `python -m pipeline serve` (which picks up `prefect deployment run ...`); waits until each answers, records
        its process id, and prints the dashboards' addresses.
down    stops exactly the process groups `up` recorded, and nothing else.
status  says which of them run.

State folder: `.services/` in the checkout (`PIPELINE_SERVICES_DIR`); logs are `<service>.log` there. Ports:
`PREFECT_PORT` (4200), `RAY_PORT` (6379), `RAY_DASHBOARD_PORT` (8265), `RAY_CLIENT_PORT` (10001, Ray Client's
`ray://` server: two heads share 10001 silently), `TENSORBOARD_PORT` (6006): set them all to run two of these on
one machine. TensorBoard reads `TENSORBOARD_LOGDIR` (`data`, where the datasets and their runs live). No telemetry
calls out.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def state_dir() -> Path:
    return Path(os.environ.get("PIPELINE_SERVICES_DIR", ".services")).resolve()


def ports() -> dict[str, int]:
    return {"prefect": int(os.environ.get("PREFECT_PORT", 4200)), "ray": int(os.environ.get("RAY_PORT", 6379)),
            "dashboard": int(os.environ.get("RAY_DASHBOARD_PORT", 8265)),
            "ray_client": int(os.environ.get("RAY_CLIENT_PORT", 10001)),
            "tensorboard": int(os.environ.get("TENSORBOARD_PORT", 6006))}


def tensorboard_logdir() -> Path:
    return Path(os.environ.get("TENSORBOARD_LOGDIR", "data")).resolve()


def urls() -> dict[str, str]:
    p = ports()
    return {"prefect_ui": f"http://127.0.0.1:{p['prefect']}", "prefect_api": f"http://127.0.0.1:{p['prefect']}/api",
            "ray_address": f"127.0.0.1:{p['ray']}", "ray_dashboard": f"http://127.0.0.1:{p['dashboard']}",
            "tensorboard": f"http://127.0.0.1:{p['tensorboard']}"}


def ray_token() -> Path:
    """The Ray cluster's token (Ray 2.60 heads require one): made once, readable by this user only."""
    import secrets

    path = state_dir() / "ray_auth_token"
    if not path.is_file():
        state_dir().mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    return path


def client_environment() -> dict[str, str]:
    """What a process needs to reach these services (printed by `up` for the user's shell)."""
    u = urls()
    return {"PREFECT_API_URL": u["prefect_api"], "RAY_ADDRESS": u["ray_address"], "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(ray_token())}


DRAIN_SECONDS = 5


def _environment() -> dict[str, str]:
    return {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_USAGE_STATS_ENABLED": "0",
            "PREFECT_HOME": str(state_dir() / "prefect"), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            # `down` means now: the head drains its node for this long, not Ray's 30 s (a detached actor, such as
            # Ray Train's state actor, keeps a node from ever draining)
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": os.environ.get("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S",
                                                                    str(DRAIN_SECONDS)),
            **client_environment()}


def _services() -> list[tuple[str, list[str], list[str]]]:
    """(name, command, what answers once it is up: URLs, or tcp://host:port for a listening port), in start order."""
    p, u = ports(), urls()
    return [
        ("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(p["prefect"])],
         [u["prefect_api"] + "/health"]),
        ("ray-head", [str(BIN / "ray"), "start", "--head", "--block", "--port", str(p["ray"]), "--include-dashboard",
                      "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(p["dashboard"]),
                      "--ray-client-server-port", str(p["ray_client"]), "--disable-usage-stats"],
         # its client server listens last, once it has read its own node's record: a head whose client server gave
         # up on that (under load) stops everything with it
         [u["ray_dashboard"], f"tcp://127.0.0.1:{p['ray_client']}"]),
        # every run's tensorboard/ folder under the data folder, re-read every few seconds: curves while they grow
        ("tensorboard", [str(BIN / "tensorboard"), "--logdir", str(tensorboard_logdir()), "--host", "127.0.0.1",
                         "--port", str(p["tensorboard"]), "--reload_interval", "5"], [u["tensorboard"] + "/data/logdir"]),
        # ready once its deployments are registered (the demo's pipeline is the last), so `prefect deployment run`
        # right after `up` finds them
        ("deployments", [sys.executable, "-m", "pipeline", "serve"],
         [u["prefect_api"] + "/deployments/name/cc12m-pipeline/demo"]),
    ]


def _records() -> dict:
    path = state_dir() / "services.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _save(records: dict) -> None:
    state_dir().mkdir(parents=True, exist_ok=True)
    tmp = state_dir() / ".services.json.tmp"
    tmp.write_text(json.dumps(records, indent=1))
    os.replace(tmp, state_dir() / "services.json")


def _alive(record: dict) -> bool:
    """The recorded process still runs, and is still the command we started (process ids get reused)."""
    try:
        cmdline = [c.decode() for c in Path(f"/proc/{record['pid']}/cmdline").read_bytes().split(b"\0") if c]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return " ".join(cmdline).endswith(" ".join(record["cmd"][1:]))


def _answers(url: str) -> bool:
    try:
        if url.startswith("tcp://"):
            host, port = url[len("tcp://"):].rsplit(":", 1)
            socket.create_connection((host, int(port)), timeout=2).close()
            return True
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _wait_for(url: str, proc: subprocess.Popen, name: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; see {state_dir() / (name + '.log')}")
        if _answers(url):
            return
        time.sleep(0.5)  # polling a service we started; not a test synchronisation
    raise RuntimeError(f"{name} did not answer at {url} within {timeout:.0f} s; see {state_dir() / (name + '.log')}")


# The deployments server registers with the Prefect API: it starts once the services before it answer. Prefect
# and Ray start together: `up` takes about 20 s on 2 cores instead of 24.
STARTS_AFTER_THE_OTHERS = "deployments"


def _wait_for_all(starting: list[tuple[list[str], subprocess.Popen, str]]) -> None:
    for ready_urls, proc, name in starting:
        for url in ready_urls:
            _wait_for(url, proc, name)
        print(f"{name:15} started (pid {proc.pid})")


def up() -> dict:
    records, env = _records(), _environment()
    state_dir().mkdir(parents=True, exist_ok=True)
    starting = []
    for name, cmd, ready_urls in _services():
        if name in records and _alive(records[name]):
            print(f"{name:15} already running (pid {records[name]['pid']})")
            continue
        if name == STARTS_AFTER_THE_OTHERS:
            _wait_for_all(starting)
            starting = []
        with open(state_dir() / f"{name}.log", "ab") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)  # its own process group: `down` stops all of it
        records[name] = {"pid": proc.pid, "cmd": cmd, "log": str(state_dir() / f"{name}.log")}
        _save(records)
        starting.append((ready_urls, proc, name))
    _wait_for_all(starting)
    from core.ray_runtime import dashboard_sign_in

    u = urls()
    print(f"\nPrefect UI:     {u['prefect_ui']}\nRay dashboard:  {u['ray_dashboard']} ({dashboard_sign_in(str(ray_token()))})\n"
          f"TensorBoard:    {u['tensorboard']} ({tensorboard_logdir()})\n\nFor this shell:")
    print("\n".join(f"export {k}={v}" for k, v in client_environment().items()))
    return records


def _forget_ray_cluster() -> None:
    """`ray start` notes its address in /tmp/ray for `ray.init()` to find; a stopped head must not be found."""
    note = Path(os.environ.get("RAY_TMPDIR", "/tmp/ray")) / "ray_current_cluster"
    if note.is_file() and note.read_text().strip().endswith(f":{ports()['ray']}"):
        note.unlink(missing_ok=True)


def _group_running(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _signal_and_wait(send, pid: int, sig: int, running, seconds: float) -> bool:
    """Send `sig`; True once `running()` is false, False after `seconds`."""
    try:
        send(pid, sig)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + seconds
    while running():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)  # waiting for processes we signalled to exit
    return True


def _stop(record: dict) -> None:
    """SIGTERM to the service's own process first, then to what is left of its process group, then SIGKILL. The
    order matters for Ray's head: signalled alone it drains its node and stops its children in about 2 s;
    signalled together with them, its drain waits 30 s for a GCS that is already gone."""
    pid = record["pid"]
    _signal_and_wait(os.kill, pid, signal.SIGTERM, lambda: _alive(record), 30)  # an exited one has no command line
    if not _signal_and_wait(os.killpg, pid, signal.SIGTERM, lambda: _group_running(pid), 10):
        _signal_and_wait(os.killpg, pid, signal.SIGKILL, lambda: _group_running(pid), 10)


def down() -> list[str]:
    records, stopped = _records(), []
    for name in reversed(list(records)):
        record = records.pop(name)
        if not _alive(record):
            print(f"{name:15} was not running")
            continue
        _stop(record)
        stopped.append(name)
        if name == "ray-head":
            _forget_ray_cluster()
        print(f"{name:15} stopped (pid {record['pid']})")
        _save(records)
    _save(records)
    return stopped


def remember_service(name: str, pid: int) -> None:
    """A process started outside `up` (the cluster demo, with its Ray nodes) that `down` stops as well."""
    records = _records()
    cmd = [c.decode() for c in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if c]
    records[name] = {"pid": pid, "cmd": cmd, "log": None}
    _save(records)


def forget_service(name: str) -> None:
    records = _records()
    if records.pop(name, None) is not None:
        _save(records)


def status() -> dict[str, bool]:
    records, states = _records(), {}
    for name, _, _ in _services():
        record = records.get(name)
        states[name] = bool(record and _alive(record))
        print(f"{name:15} {'running (pid ' + str(record['pid']) + ')' if states[name] else 'stopped'}")
    u = urls()
    print(f"\nPrefect UI: {u['prefect_ui']}   Ray dashboard: {u['ray_dashboard']}   TensorBoard: {u['tensorboard']}")
    return states
