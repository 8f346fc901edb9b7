import os
import threading
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test`'s two processes on two cores compute on one thread each (their subprocesses and Ray's workers
    # too): with torch's default, a thread per core in each, OpenMP's threads spun waiting for threads the other
    # process had descheduled (measured: the suite 16-19 min -> 14)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.helpers import MisbehavingServer  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ["HF_HUB_OFFLINE"] = "1"  # models load from local folders only; nothing is fetched from a hub


SESSION_SERVICES = ("ray_address", "prefect_api")


def modules_with_session_services() -> set[str]:
    """The test modules that name the session's Ray or Prefect server (xdist's scheduler sees node ids only)."""
    return {p.name for p in Path(__file__).parent.glob("test_*.py") if any(s in p.read_text() for s in SESSION_SERVICES)}


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: without it (`-p no:xdist`) there is nothing to schedule
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs two pytest-xdist processes (`--dist loadscope`). The modules that use the session's Ray or
    Prefect server all run in one of them, so the run starts one of each (two Rays, each counting both cores as
    its own, oversubscribed them); every other module runs whole (its module fixtures built once) in the other:
    in-process training and the services test fill the cores that Ray's tests leave idle."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    together = modules_with_session_services()

    class SessionServicesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "session-services" if Path(module).name in together else module

    return SessionServicesTogether(config, log)


def pytest_collection_modifyitems(config, items):
    """A test that reaches the session's services through a fixture defined elsewhere would be scheduled apart
    from them (and start a second Ray): say so instead."""
    together = modules_with_session_services()
    for item in items:
        used = [name for name in SESSION_SERVICES if name in item.fixturenames]
        if used and item.path.name not in together:
            raise pytest.UsageError(f"{item.nodeid} uses {', '.join(used)} without naming it in its module: name "
                                    "the fixture there (tests/conftest.py schedules by module text)")


@pytest.fixture(autouse=True)
def builtin_modalities():
    """Each test ends with the built-in modalities only: a profile that names more (the demo's 4M-21 ones)
    activates them for the process that loads it, and one test's profile must not become the next one's."""
    from core import registry

    yield
    registry.use()


@pytest.fixture
def server():
    srv = MisbehavingServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.stop_misbehaving.set()
    srv.release.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray for the whole session (it takes seconds to start); subprocesses join it by address."""
    import ray

    # address="local": a new Ray even when `make up` runs a head on this machine
    context = ray.init(address="local", num_cpus=2, include_dashboard=False,
                       object_store_memory=150 * 1024 * 1024, log_to_driver=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture
def tls_server(tmp_path):
    """The misbehaving server behind TLS, with a certificate for 'localhost' from a throwaway CA."""
    import ssl

    from tests.helpers import make_tls_files

    ca, cert, key = make_tls_files(tmp_path)
    srv = MisbehavingServer()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    srv.socket = context.wrap_socket(srv.socket, server_side=True)
    srv.ca_bundle = ca
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API server for the session's flow tests (it takes seconds to start)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Every labeler's tiny random-weight model of the real class, saved once for the session (read only)."""
    from models.random_weights import save_random_models

    return save_random_models(tmp_path_factory.mktemp("models"), "tiny")
