import os
import threading

import pytest

from tests.helpers import MisbehavingServer

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


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

    context = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024 * 1024,
                       log_to_driver=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()
