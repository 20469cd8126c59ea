"""The project's page in a real browser (Debian's chromium, driven by Selenium), over the real stack: Label Studio
1.23.2, Redis, the backend under gunicorn behind basic auth, a worker. Annotations are made from the base model's
predictions, as Label Studio's editor makes them (``parent_prediction``); a round trains on them; the page shows its
progress while it runs, then the figures ``/status`` and the registry hold, and a page without credentials gets 401.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

from testkit import synthetic
from testkit.label_studio_stand_in import LABEL_CONFIG
from tests.conftest import ROOT, wait_for
from tests.integration.conftest import all_tasks, ground_truth, next_task

USER, PASSWORD = "lab-lead", "page-test-password"
N_TASKS, N_ANNOTATED = 20, 12


@pytest.fixture(scope="module")
def backend_env() -> dict[str, str]:
    # rounds only on Start Training; long enough to watch; behind basic auth like every page
    return {"MIN_NEW_ANNOTATIONS": "1000", "TRAIN_EPOCHS": "30", "BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD}


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from the machine's packages (no driver or browser is downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.fail("the page test needs Chromium and its driver: apt-get install chromium chromium-driver "
                    "(.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1900"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    chrome.set_page_load_timeout(30)
    yield chrome
    chrome.quit()


def authorised(browser) -> None:
    """Every request of the browser carries the page's credentials (as a browser does after the login prompt)."""
    import base64

    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})


def status(backend, project: int) -> dict:
    response = requests.get(f"{backend.url}/status", params={"project": project}, auth=(USER, PASSWORD), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_page_follows_a_round_and_shows_what_status_and_the_registry_hold(live_label_studio, live_backend,
                                                                              browser, tmp_path):
    from selenium.webdriver.common.by import By

    ls = live_label_studio
    project = ls.api("POST", "/api/projects/", json={"title": "ALE page", "label_config": LABEL_CONFIG})["id"]
    rng = np.random.default_rng(36)
    samples, files = {}, []
    for i in range(N_TASKS):
        sample = synthetic.shapes_image(rng, 160)
        samples[f"page{i:03d}.png"] = sample
        png = cv2.imencode(".png", sample.image)[1].tobytes()
        files.append((f"file{i}", (f"page{i:03d}.png", io.BytesIO(png), "image/png")))
    ls.api("POST", f"/api/projects/{project}/import", files=files)
    connected = live_backend.cli("connect", "--project", str(project), "--backend-url", live_backend.url)
    assert connected.returncode == 0, connected.stderr + connected.stdout
    base = ls.api("GET", f"/api/projects/{project}/")["model_version"]

    # annotations made from the base model's predictions, as the editor makes them
    tasks = sorted(all_tasks(ls, project), key=lambda t: t["id"])[:N_ANNOTATED]
    for task in tasks:
        [shown] = [p for p in task["predictions"] if p["model_version"] == base]
        sample = samples[task["data"]["image"].rsplit("-", 1)[-1]]
        ls.api("POST", f"/api/tasks/{task['id']}/annotations/", json={
            "result": ground_truth(sample), "was_cancelled": False, "parent_prediction": shown["id"]})

    # without credentials the browser gets a 401 and no page
    browser.get(f"{live_backend.url}/projects/{project}")
    assert browser.execute_script("return performance.getEntriesByType('navigation')[0].responseStatus;") == 401
    assert not browser.find_elements(By.ID, "versions")
    authorised(browser)

    started = requests.post(f"{live_backend.url}/webhook", auth=(USER, PASSWORD), timeout=30,
                            json={"action": "START_TRAINING", "project": {"id": project}})
    assert started.status_code == 201, started.text
    wait_for(lambda: (s := status(live_backend, project))["running"] and s["running"].get("epoch", 0) >= 1, 300,
         "the round's first epoch", interval=0.3)
    browser.get(f"{live_backend.url}/projects/{project}")
    browser.execute_script("window.loadedOnce = true;")  # gone if the page were loaded again
    seen = [browser.find_element(By.ID, "round").text]
    assert "epoch" in seen[0], seen
    # the progress part follows the round without a reload
    wait_for(lambda: seen.append(browser.find_element(By.ID, "round").text) or seen[-1] != seen[0], 120,
         "the progress to move on the page", interval=0.3)
    assert "epoch" in seen[-1] and browser.execute_script("return window.loadedOnce === true;")
    done = wait_for(lambda: status(live_backend, project)["last_training"], 600, "the round", interval=0.3)
    wait_for(lambda: (r := status(live_backend, project)["last_result"]) and r["job"] != done["job"]
         and r.get("model_version") == done["version"], 300, "the re-scoring with the new version", interval=0.3)

    browser.get(f"{live_backend.url}/projects/{project}")
    now = status(live_backend, project)
    row = browser.find_element(By.CSS_SELECTOR, f'#versions tr[data-version="{done["version"]}"]')
    shown_map = row.find_element(By.CSS_SELECTOR, "td.map").text
    assert shown_map == f"{done['metrics']['map50_95']:.3f}"
    agreement = now["agreement"][base]
    assert agreement["tasks"] == N_ANNOTATED  # Label Studio kept each annotation's parent prediction
    measured = browser.find_element(By.CSS_SELECTOR, f'#agreement tr[data-version="{base}"]')
    for figure in ("precision", "recall", "ap50", "kept"):
        assert measured.find_element(By.CSS_SELECTOR, f"td.{figure}").text == f"{agreement[figure]:.3f}"
    assert browser.find_element(By.ID, "served").text == now["current_version"]
    assert browser.find_elements(By.CSS_SELECTOR, "#chart polyline")
    # the queue: the unlabelled tasks only, and first the task Label Studio serves next
    listed = [int(r.get_attribute("data-task")) for r in browser.find_elements(By.CSS_SELECTOR, "#next tr[data-task]")]
    annotated = {task["id"] for task in tasks}
    assert listed and not annotated & set(listed)
    assert listed[0] == next_task(ls, project)
    shot = tmp_path / "project-page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("PAGE_SCREENSHOT"):  # to refresh the one the docs show
        shutil.copyfile(shot, ROOT / os.environ["PAGE_SCREENSHOT"])

    browser.get(f"{live_backend.url}/projects")
    assert browser.find_element(By.CSS_SELECTOR, f'a[href="projects/{project}"]').text == f"project {project}"
    assert Path(shot).exists()
