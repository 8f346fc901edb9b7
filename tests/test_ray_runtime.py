"""Starting Ray: its idle workers import the stages' heavy libraries before work arrives."""
import sys

STAGE_LIBRARIES = ("torch", "transformers", "webdataset")


def _imported_on_arrival() -> list[str]:
    return [name for name in STAGE_LIBRARIES if name in sys.modules]


def test_a_task_starts_on_a_worker_that_has_the_stage_libraries_already(ray_address):
    """The session's Ray is started as the pipeline's own (init_ray) and the services' head are: the task imports
    nothing itself, yet finds them loaded (without the preload a fresh worker has none of them)."""
    import ray

    assert ray.get(ray.remote(_imported_on_arrival).remote()) == list(STAGE_LIBRARIES)


def test_the_services_ray_head_preloads_them_and_a_users_own_setting_wins(monkeypatch):
    from core.ray_runtime import PRELOAD_VARIABLE, PRELOADED_MODULES
    from pipeline.services import _environment

    monkeypatch.delenv(PRELOAD_VARIABLE, raising=False)
    assert _environment()[PRELOAD_VARIABLE] == PRELOADED_MODULES
    assert PRELOADED_MODULES.split(",") == list(STAGE_LIBRARIES)
    monkeypatch.setenv(PRELOAD_VARIABLE, "torch")
    assert _environment()[PRELOAD_VARIABLE] == "torch"
