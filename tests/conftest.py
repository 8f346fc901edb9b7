import os
import threading

import pytest

from tests.helpers import MisbehavingServer

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ["HF_HUB_OFFLINE"] = "1"  # models load from local folders only; nothing is fetched from a hub


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
