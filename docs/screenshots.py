"""The dashboards, looked at in a real browser while a stage runs: `make screenshots` writes docs/screenshots/*.png.

What it does, as a user would: starts its own set of the local services (`python -m pipeline up` on other ports,
state in `.services-screenshots/`, so a `make up` already running is left alone), downloads and scores the demo
photos through the `download/demo` and `quality/demo` deployments, then starts `pseudo-label/demo` and, while it
runs, opens Prefect's default UI and the Ray dashboard in headless Chromium: the progress bar, the shards table with
the shards in progress, the workers table, the flow run's log, the Ray dashboard's sign-in page, its jobs and its
actors. Once the run is over: the stage's summary, the failure list and the labelled pictures, whose every <img>
must have loaded (the check of pictures in Prefect's default UI; the script fails otherwise). Then it stops the
services it started.

Needs Chromium (Debian: `apt-get install chromium`; any other: CHROMIUM=/path/to/chrome) and Playwright's Python
package, which `make screenshots` installs (the `screenshots` extra). Nothing here is a test: the pictures are for
people; the suite checks the same artifacts through Prefect's API.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent
OUT = HERE / "screenshots"
PORTS = {"PREFECT_PORT": "4290", "RAY_PORT": "6390", "RAY_DASHBOARD_PORT": "8290", "RAY_CLIENT_PORT": "9290",
         "TENSORBOARD_PORT": "6090"}
DATA = CHECKOUT / "data" / "screenshots"
# Chromium on a machine without a display or outside network: no sandbox (root in a container), no background
# calls out (each refused one is logged)
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]
VIEW = {"width": 1280, "height": 860}


def environment() -> None:
    """This script's services: their own state folder and ports, TensorBoard on its data."""
    os.environ.update(PORTS)
    os.environ["PIPELINE_SERVICES_DIR"] = str(CHECKOUT / ".services-screenshots")
    os.environ["TENSORBOARD_LOGDIR"] = str(DATA)
    from pipeline.services import client_environment

    os.environ.update(client_environment())


def api(path: str, body: dict | None = None):
    request = urllib.request.Request(f"{os.environ['PREFECT_API_URL']}{path}", data=json.dumps(body or {}).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request) as answer:
        return json.load(answer)


def artifact(key: str) -> dict | None:
    """The latest version of an artifact (its `id`, `description`, `data`), or None."""
    found = api("/artifacts/filter", {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1})
    return found[0] if found else None


def artifact_page(u: dict, key: str) -> str:
    found = artifact(key)
    if found is None:
        sys.exit(f"no {key} artifact")
    return f"{u['prefect_ui']}/artifacts/artifact/{found['id']}"


def run(deployment: str, wait: bool = True, **parameters):
    from prefect.deployments import run_deployment

    flow_run = run_deployment(deployment, parameters=parameters, timeout=None if wait else 0)
    if wait and flow_run.state.type.value != "COMPLETED":
        sys.exit(f"{deployment} ended {flow_run.state.type.value}: see its logs in the Prefect UI")
    return flow_run


class Camera:
    """A headless Chromium page that writes each view to docs/screenshots/<name>.png."""

    def __init__(self, playwright):
        executable = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
        if not executable:
            sys.exit("no Chromium: apt-get install chromium (Debian), or set CHROMIUM=/path/to/chrome")
        self.browser = playwright.chromium.launch(executable_path=executable, args=BROWSER_ARGS)
        self.page = self.browser.new_page(viewport=VIEW)
        self.taken: list[str] = []
        self.missed: list[str] = []  # views shot without the text they should show

    def shoot(self, name: str, url: str | None = None, wait_for: str | None = None, full_page: bool = False) -> None:
        if url:
            self.page.goto(url)
        if wait_for:
            try:
                self.page.get_by_text(wait_for).first.wait_for(timeout=30_000)
            except Exception:  # noqa: BLE001 - shot anyway, to see what it shows instead; reported at the end
                self.missed.append(f"{name}: no {wait_for!r}")
        self.page.wait_for_load_state("networkidle")
        path = OUT / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        with Image.open(path) as shot:  # 256 colours: a third of the bytes, the same to the eye for a UI
            shot.convert("RGB").quantize(256).save(path, optimize=True)
        self.taken.append(path.name)
        print(f"  {path.relative_to(CHECKOUT)}")

    def pictures_loaded(self) -> tuple[int, int]:
        """(loaded, all) of the page's pictures in its main pane (the UI's own icons are svg)."""
        sizes = self.page.eval_on_selector_all("img", "els => els.map(e => e.complete ? e.naturalWidth : 0)")
        return sum(1 for width in sizes if width > 0), len(sizes)


def ray_dashboard(camera: Camera, ui: str, token: str) -> None:
    """The printed link, its sign-in dialog, the token pasted in as `make up` says, then the jobs and the actors."""
    camera.shoot("ray-sign-in", ui, wait_for="Authentication Token Required")
    dialog = camera.page.get_by_role("dialog")
    dialog.get_by_label("Authentication Token").fill(token)
    dialog.get_by_role("button", name="Submit").click()
    dialog.wait_for(state="hidden", timeout=30_000)
    camera.shoot("ray-jobs", f"{ui}/#/jobs", wait_for="pseudo-label /")
    camera.shoot("ray-actors", f"{ui}/#/actors", wait_for="LabelWorker (pseudo-label /")


def label_workers() -> list[int]:
    """The processes labelling a shard now (Ray titles them after their task: `ray::label shard-000001`), read
    from /proc (Linux)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            title = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if title.startswith("ray::label shard-"):
            found.append(int(cmdline.parent.name))
    return found


def main() -> None:
    environment()
    from playwright.sync_api import sync_playwright

    from pipeline.services import down, ray_token, up, urls

    OUT.mkdir(exist_ok=True)
    shutil.rmtree(DATA, ignore_errors=True)  # its own dataset, made anew: the stage has work to show
    try:
        up()
        u = urls()
        print("the demo photos, downloaded and scored (download/demo, quality/demo) ...")
        run("download/demo", input="demo", output=str(DATA), profile="demo")
        run("quality/demo", data=str(DATA), profile="demo")
        print("pseudo-label/demo, watched while it runs ...")
        labelling = run("pseudo-label/demo", wait=False, data=str(DATA), profile="demo",
                        overrides=["dashboards.progress_every=1", "dashboards.poll_seconds=0.5",
                                   "dashboards.table_seconds=0", "dashboards.running_table_seconds=0"])
        with sync_playwright() as playwright:
            camera = Camera(playwright)
            deadline = time.monotonic() + 600
            # a shard committed and another some samples in: the stage is then paused (its labelling processes
            # stopped, SIGSTOP) while the views are shot, and let go after; the flow run and dashboards stay live
            while not re.search(r"[1-9] of \d+ shards \(\d+ in progress: shard-\d+ [1-9]",
                                (artifact("pseudo-label-progress") or {}).get("description") or ""):
                if time.monotonic() > deadline:
                    sys.exit("pseudo-label/demo never showed a shard in progress")
                time.sleep(0.1)
            paused = label_workers()
            for pid in paused:
                os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(1.5)  # the driver's next reading of the workers' counts (every 0.5 s here)
                flow_run = f"{u['prefect_ui']}/runs/flow-run/{labelling.id}"
                camera.page.goto(flow_run)
                camera.page.get_by_text("Artifacts", exact=True).first.click()
                camera.shoot("prefect-flow-run-artifacts", wait_for="pseudo-label-progress")
                camera.shoot("prefect-shards-running", artifact_page(u, "pseudo-label-shards"), wait_for="running")
                camera.shoot("prefect-workers", artifact_page(u, "pseudo-label-workers"), wait_for="pid")
                camera.page.goto(flow_run)
                camera.shoot("prefect-flow-run-logs", wait_for="committed")
                while artifact("pseudo-label-samples") is None:  # the first shard's, drawn once it committed
                    if time.monotonic() > deadline:
                        sys.exit("pseudo-label/demo published no pictures while it ran")
                    time.sleep(0.2)
                camera.shoot("pseudo-label-samples-running", artifact_page(u, "pseudo-label-samples"),
                             wait_for="Labelled samples")
                pictures_while_running = camera.pictures_loaded()
                ray_dashboard(camera, u["ray_dashboard"], Path(ray_token()).read_text().strip())
            finally:
                for pid in paused:
                    os.kill(pid, signal.SIGCONT)

            from prefect import get_client

            with get_client(sync_client=True) as client:
                while not client.read_flow_run(labelling.id).state.is_final():
                    time.sleep(1)
            print("after the run ...")
            camera.shoot("pseudo-label-summary", artifact_page(u, "pseudo-label-summary"), wait_for="failure reason",
                         full_page=True)
            camera.shoot("pseudo-label-stages", artifact_page(u, "pseudo-label-stages"), wait_for="label_depth")
            camera.shoot("pseudo-label-samples", artifact_page(u, "pseudo-label-samples"),
                         wait_for="Labelled samples")
            for view, (loaded, pictures) in (("while running", pictures_while_running),
                                              ("at the end", camera.pictures_loaded())):
                print(f"pictures rendered in Prefect's default UI {view}: {loaded} of {pictures}")
                if not pictures or loaded < pictures:
                    camera.missed.append(f"pseudo-label-samples {view}: {loaded} of {pictures} pictures rendered")
            camera.browser.close()
    finally:
        down()
    print(f"{len(camera.taken)} screenshots in {OUT.relative_to(CHECKOUT)}/")
    if camera.missed:
        sys.exit("views that did not show what they should:\n  " + "\n  ".join(camera.missed))


if __name__ == "__main__":
    main()
