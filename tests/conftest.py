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


# `make test` hands whole modules to two pytest-xdist processes (`--dist loadscope --no-loadscope-reorder`), in
# collection order: the modules that run longest (measured, docs/benchmarks.md) go first, so the short ones fill in
# behind them instead of one long module running alone at the end. Each process starts its own Ray (and the one
# that runs test_flows.py a Prefect server) when a test first asks for it.
LONGEST_MODULES = ("test_demo.py", "test_pretrain.py", "test_operations.py", "test_tokenizer_quality.py",
                   "test_flows.py", "test_object_storage.py", "test_multinode.py", "test_label_stage.py",
                   "test_tokenizers.py", "test_cli.py", "test_modalities.py", "test_generate.py")


def pytest_collection_modifyitems(config, items):
    gone = [name for name in LONGEST_MODULES if not (Path(__file__).parent / name).is_file()]
    if gone:  # a renamed module would silently lose its place at the front
        raise pytest.UsageError(f"tests/conftest.py LONGEST_MODULES names {', '.join(gone)}: no such test module")
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module keeps its own order


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
    """One local Ray for each test process (it takes seconds to start); subprocesses join it by address."""
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


@pytest.fixture(scope="session")
def s3():
    """An S3 API server on loopback for the test process (moto's, authenticating requests)."""
    from tests.helpers import S3Server

    server = S3Server()
    yield server
    server.stop()
