"""spurgen rate: the study, the ratings files, the web API (Flask's test client) and the page in a real Chromium."""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from PIL import Image, PngImagePlugin
from typer.testing import CliRunner

from spurgen.cli import app as cli_app
from spurgen.config import RateConfig
from spurgen.errors import SpurgenError
from spurgen.images import file_sha256
from spurgen.rate import (
    RatingsStore,
    Study,
    build_study,
    create_app,
    load_ratings,
    make_server,
    ratings_dir,
    sanitize_rater,
    server_urls,
)
from spurgen.workspace import Workspace

IMAGE_SIZE = 64


def _png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 30), text: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if text:
        info.add_text("parameters", text)
    Image.new("RGB", size, color).save(path, pnginfo=info)
    return path


@dataclass
class StudySetup:
    workspace: Workspace
    dataset: Path
    labels: Path
    files: dict[str, Path]  # what each image of the study is, by a readable name

    def config(self, **overrides: Any) -> RateConfig:
        config = RateConfig(**{"dataset": str(self.dataset), "labels": str(self.labels), "image_size": IMAGE_SIZE,
                               **overrides})
        config.validate()
        return config

    def sha(self, name: str) -> str:
        return file_sha256(self.files[name])


@pytest.fixture
def setup(tmp_path: Path) -> StudySetup:
    """Two classes: references, a data set folder (one image is also a reference), finished and unrelated runs."""
    labels = tmp_path / "labels.tsv"
    labels.write_text("index\tclass_name\n94\thummingbird\n105\tkoala\n")
    ws = Workspace(tmp_path / "work")
    refs, koala_refs = ws.root / "refs" / "94-hummingbird", ws.root / "refs" / "105-koala"
    dataset = tmp_path / "images"
    files = {
        "ref0": _png(refs / "ref_0.png", (200, 30, 30)),
        "ref1": _png(refs / "ref_1.png", (30, 200, 30), size=(30, 40)),
        "data1": _png(dataset / "spurious_imagenet_94_hummingbird_0" / "data_1.png", (30, 30, 200)),
        "gen0": _png(ws.root / "generated/94-hummingbird/run1/00000.png", (90, 90, 0), (96, 96), "prompt: a sks photo"),
        "gen1": _png(ws.root / "generated/94-hummingbird/run1/00001.png", (0, 90, 90), (96, 96)),
        "koala_ref": _png(koala_refs / "koala.png", (120, 60, 10)),
        "koala_gen": _png(ws.root / "generated/105-koala/run1/00000.png", (10, 60, 120), (96, 96)),
    }
    # The data set's copy of a reference is the same image: it must be rated once.
    shutil.copyfile(files["ref0"], dataset / "spurious_imagenet_94_hummingbird_0" / "ref_0.png")
    _png(ws.root / "generated/94-hummingbird/run1/00002.png", (0, 0, 0), (96, 96))  # blanked by the safety checker
    (ws.root / "generated/94-hummingbird/run1/generation.json").write_text(json.dumps({"status": "complete", "images": [
        {"index": 2, "file": "00002.png", "nsfw_flagged": True}]}))
    (ws.root / "generated/105-koala/run1/generation.json").write_text(json.dumps({"status": "incomplete"}))
    _png(ws.root / "generated/105-koala/loose/00000.png", (1, 2, 3))  # no generation.json: not a run
    _png(ws.root / "generated/105-koala/.run2.x1.tmp/00000.png", (4, 5, 6))  # an atomic_directory staging area
    (ws.root / "generated/105-koala/.run2.x1.tmp/generation.json").write_text("{}")
    return StudySetup(ws, dataset, labels, files)


@pytest.fixture
def served(setup: StudySetup) -> tuple[FlaskClient, Study]:
    study = build_study(setup.config(), setup.workspace)
    flask_app = create_app(study, RatingsStore(ratings_dir(setup.workspace)), IMAGE_SIZE)
    return flask_app.test_client(), study


def _answer(client: FlaskClient, rater: str, image_id: str, **answers: Any):
    return client.post("/api/answer", json={"rater": rater, "id": image_id, **answers})


def _saved(setup: StudySetup, rater: str) -> dict[str, dict[str, Any]]:
    return json.loads((ratings_dir(setup.workspace) / f"{rater}.json").read_text())["answers"]


# --- the study --------------------------------------------------------------------------------------------------


def test_study_mixes_sources_once_per_image(setup):
    study = build_study(setup.config(), setup.workspace)
    found = {(image.source, image.path, image.cls.index, image.run) for image in study.images.values()}
    assert found == {
        ("reference", "refs/94-hummingbird/ref_0.png", 94, None),
        ("reference", "refs/94-hummingbird/ref_1.png", 94, None),
        ("dataset", "spurious_imagenet_94_hummingbird_0/data_1.png", 94, None),
        ("generated", "generated/94-hummingbird/run1/00000.png", 94, "run1"),
        ("generated", "generated/94-hummingbird/run1/00001.png", 94, "run1"),
        ("reference", "refs/105-koala/koala.png", 105, None),
        ("generated", "generated/105-koala/run1/00000.png", 105, "run1"),
    }
    assert study.images[setup.sha("koala_ref")].question() == "Do you see a koala in this image?"
    # Without --dataset only the workspace's images take part.
    assert {i.source for i in build_study(setup.config(dataset=None), setup.workspace).images.values()} == {
        "reference", "generated"}


def test_max_images_keeps_a_seeded_sample_per_class_and_source(setup):
    study = build_study(setup.config(max_images=1), setup.workspace)
    per_group = [(i.cls.index, i.source) for i in study.images.values()]
    assert sorted(per_group) == sorted(set(per_group))  # one image per class and source
    again = build_study(setup.config(max_images=1), setup.workspace)
    assert set(again.images) == set(study.images)


def test_no_images_is_a_clear_error(setup):
    with pytest.raises(SpurgenError, match="no images to rate .* run select-refs and generate first"):
        build_study(setup.config(dataset=None), Workspace(setup.workspace.root / "empty"))


def test_each_rater_has_a_stable_order_of_their_own(setup):
    study = build_study(setup.config(), setup.workspace)
    alice = [i.sha256 for i in study.order_for("alice")]
    assert alice == [i.sha256 for i in build_study(setup.config(), setup.workspace).order_for("alice")]
    assert alice != [i.sha256 for i in study.order_for("bob")]
    assert alice != [i.sha256 for i in Study(study.images, seed=1).order_for("alice")]
    # A new image (another generate run) joins without reshuffling the others.
    _png(setup.workspace.root / "generated/94-hummingbird/run1/00003.png", (7, 7, 7), (96, 96))
    grown = [i.sha256 for i in build_study(setup.config(), setup.workspace).order_for("alice")]
    assert [sha for sha in grown if sha in study.images] == alice


@pytest.mark.parametrize("typed, name", [
    ("Alice", "alice"), ("  José Müller ", "jose-muller"), ("../../etc/passwd", "etc-passwd"),
    ("a..b", "a-b"), ("x" * 90, "x" * 40), ("r2_d2", "r2_d2"),
])
def test_rater_names_are_sanitised(typed, name):
    assert sanitize_rater(typed) == name


@pytest.mark.parametrize("typed", ["", "   ", "李", "../"])
def test_rater_names_without_letters_are_refused(typed):
    with pytest.raises(SpurgenError, match="has no letter or digit"):
        sanitize_rater(typed)


# --- the web API ------------------------------------------------------------------------------------------------


def test_answers_are_saved_on_every_click_and_the_study_resumes(setup, served):
    client, study = served
    first = client.get("/api/study?rater=Alice").get_json()
    assert first["rater"] == "alice" and first["resume"] == 0 and len(first["items"]) == len(study.images) == 7
    order = [item["id"] for item in first["items"]]
    assert order == [i.sha256 for i in study.order_for("alice")]

    assert _answer(client, "alice", order[0], naturalness=4).status_code == 200
    assert _saved(setup, "alice")[order[0]]["naturalness"] == 4
    assert client.get("/api/study?rater=alice").get_json()["resume"] == 0  # one question is still open
    reply = _answer(client, "Alice", order[0], object_present="no")
    assert reply.get_json() == {"naturalness": 4, "object_present": "no"}
    _answer(client, "alice", order[1], naturalness=2, object_present="unsure")
    _answer(client, "alice", order[2], object_present="yes")
    _answer(client, "alice", order[0], naturalness=5)  # a changed answer replaces the earlier one

    again = client.get("/api/study?rater=alice").get_json()
    assert [item["id"] for item in again["items"]] == order
    assert again["resume"] == 2
    assert again["items"][2] == {"id": order[2], "question": study.images[order[2]].question(),
                                 "naturalness": None, "object_present": "yes"}
    saved = _saved(setup, "alice")
    assert {sha: (a["naturalness"], a["object_present"]) for sha, a in saved.items()} == {
        order[0]: (5, "no"), order[1]: (2, "unsure"), order[2]: (None, "yes")}
    image = study.images[order[1]]
    assert saved[order[1]]["path"] == image.path and saved[order[1]]["source"] == image.source
    # Atomic writes leave no temporary file behind.
    assert [p.name for p in ratings_dir(setup.workspace).iterdir()] == ["alice.json"]


def test_two_raters_write_their_own_files(setup, served):
    client, _ = served
    sha = setup.sha("gen0")
    _answer(client, "alice", sha, naturalness=1, object_present="yes")
    _answer(client, "Bob", sha, naturalness=5, object_present="no")
    assert sorted(p.name for p in ratings_dir(setup.workspace).iterdir()) == ["alice.json", "bob.json"]
    assert (_saved(setup, "alice")[sha]["naturalness"], _saved(setup, "bob")[sha]["naturalness"]) == (1, 5)


def test_overlapping_requests_of_one_rater_lose_no_answer(setup, served):
    client, study = served
    flask_app = client.application
    requests = [(sha, field, value) for sha in study.images
                for field, value in (("naturalness", 3), ("object_present", "unsure"))]

    def send(sha: str, field: str, value: Any) -> None:
        assert _answer(flask_app.test_client(), "carol", sha, **{field: value}).status_code == 200

    threads = [threading.Thread(target=send, args=request) for request in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    saved = _saved(setup, "carol")
    assert {sha: (a["naturalness"], a["object_present"]) for sha, a in saved.items()} == {
        sha: (3, "unsure") for sha in study.images}


@pytest.mark.parametrize("body, status", [
    ({"rater": "alice", "id": "0" * 64, "naturalness": 3}, 404),
    ({"rater": "alice", "id": "../../spurgen.toml", "naturalness": 3}, 404),
    ({"rater": "alice", "id": None, "naturalness": 3}, 404),
    ({"rater": "alice", "id": "GEN0", "naturalness": 0}, 400),
    ({"rater": "alice", "id": "GEN0", "naturalness": 6}, 400),
    ({"rater": "alice", "id": "GEN0", "naturalness": "3"}, 400),
    ({"rater": "alice", "id": "GEN0", "naturalness": True}, 400),
    ({"rater": "alice", "id": "GEN0", "object_present": "maybe"}, 400),
    ({"rater": "alice", "id": "GEN0"}, 400),
    ({"rater": "..", "id": "GEN0", "naturalness": 3}, 400),
    ([1, 2], 400),
])
def test_bad_answers_are_refused_and_nothing_is_written(setup, served, body, status):
    client, _ = served
    if isinstance(body, dict) and body.get("id") == "GEN0":
        body = {**body, "id": setup.sha("gen0")}
    reply = client.post("/api/answer", json=body)
    assert reply.status_code == status
    assert "error" in reply.get_json()
    assert not ratings_dir(setup.workspace).exists()


@pytest.mark.parametrize("url", ["/image/" + "0" * 64, "/image/..%2F..%2Fspurgen.toml", "/image/../refs",
                                 "/static/../rate.py", "/static/%2e%2e/rate.py"])
def test_nothing_outside_the_study_is_served(served, url):
    client, _ = served
    assert client.get(url).status_code == 404


def test_images_are_served_reencoded_without_their_metadata(setup, served):
    client, _ = served
    assert client.get("/api/study").status_code == 400  # no rater name
    for name in ("gen0", "ref1", "data1"):
        reply = client.get(f"/image/{setup.sha(name)}")
        assert reply.status_code == 200 and reply.mimetype == "image/png"
        image = Image.open(io.BytesIO(reply.data))
        assert max(image.size) == IMAGE_SIZE and not image.text  # same size for every source, no "parameters"
    page = client.get("/")
    assert page.status_code == 200 and b"/static/rate.js" in page.data
    assert client.get("/static/rate.js").status_code == 200


# --- reading and exporting ratings ------------------------------------------------------------------------------


def test_load_ratings_and_export_csv(setup, served):
    client, _ = served
    _answer(client, "alice", setup.sha("gen0"), naturalness=2, object_present="no")
    _answer(client, "bob", setup.sha("data1"), naturalness=5)
    ratings = load_ratings(setup.workspace)
    assert [(r.rater, r.path, r.source, r.class_index, r.run, r.naturalness, r.object_present) for r in ratings] == [
        ("alice", "generated/94-hummingbird/run1/00000.png", "generated", 94, "run1", 2, "no"),
        ("bob", "spurious_imagenet_94_hummingbird_0/data_1.png", "dataset", 94, None, 5, None)]
    assert ratings[0].sha256 == setup.sha("gen0") and ratings[0].class_name == "hummingbird"

    runner = CliRunner()
    result = runner.invoke(cli_app, ["rate", "--export", "-w", str(setup.workspace.root)])
    assert result.exit_code == 0, result.output
    with open(setup.workspace.reports_dir / "ratings.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["rater"], r["sha256"], r["source"], r["run"], r["naturalness"], r["object_present"]) for r in rows] == [
        ("alice", setup.sha("gen0"), "generated", "run1", "2", "no"),
        ("bob", setup.sha("data1"), "dataset", "", "5", "")]
    assert list(rows[0]) == ["rater", "sha256", "path", "source", "class_index", "class_name", "run", "naturalness",
                             "object_present", "timestamp"]
    target = setup.workspace.root.parent / "out.csv"
    result = runner.invoke(cli_app, ["rate", "--export", str(target), "-w", str(setup.workspace.root)])
    assert result.exit_code == 0 and "2 ratings written" in result.output
    assert target.read_text() == (setup.workspace.reports_dir / "ratings.csv").read_text()


def test_cli_errors_are_one_line(setup, monkeypatch):
    runner = CliRunner()
    result = runner.invoke(cli_app, ["rate", "--export", "-w", str(setup.workspace.root)])
    assert result.exit_code == 2 and "no ratings in" in result.output
    monkeypatch.setitem(sys.modules, "waitress", None)  # as if the rate extra were not installed
    result = runner.invoke(cli_app, ["rate", "-w", str(setup.workspace.root), "--labels", str(setup.labels)])
    assert result.exit_code == 2 and "pip install 'spurgen[rate]'" in result.output


# --- the page in a real browser ---------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test drives Chromium with Playwright: "
                                   "pip install playwright")
    if CHROMIUM is None:
        pytest.skip("the browser test needs the system Chromium: apt-get install chromium")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def live_url(setup):
    study = build_study(setup.config(), setup.workspace)
    server = make_server(create_app(study, RatingsStore(ratings_dir(setup.workspace)), IMAGE_SIZE), "127.0.0.1", 0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield server_urls(server)[0]
    server.close()


class RaterPage:
    """One rater's tab, and the answers the test gave in it by image id."""

    def __init__(self, page) -> None:
        self.page = page
        self.given: dict[str, list[Any]] = {}

    def shown(self) -> tuple[int, str]:
        """The 1-based position in the progress text and the id of the image on screen, once it has loaded."""
        self.page.wait_for_selector("#frame:not(.loading)")
        position = int(self.page.inner_text("#progress-text").split()[1])
        return position, self.page.get_attribute("#image", "src").rsplit("/", 1)[1]

    def rate(self, naturalness: int | None, present: str | None, *, mouse: bool) -> None:
        _, image_id = self.shown()
        answers = self.given.setdefault(image_id, [None, None])
        if naturalness is not None:
            self.page.click(f"[data-naturalness='{naturalness}']") if mouse else self.page.keyboard.press(
                str(naturalness)
            )
            answers[0] = naturalness
        if present is not None:
            self.page.click(f"[data-object='{present}']") if mouse else self.page.keyboard.press(present[0])
            answers[1] = present

    def wait_saved(self) -> None:
        self.page.wait_for_selector("#save-status[data-pending='0']")


def test_a_rater_rates_reloads_and_resumes_in_the_browser(setup, browser, live_url, tmp_path):
    alice = RaterPage(browser.new_context().new_page())
    alice.page.goto(live_url)
    alice.page.fill("#name-input", "Alice Smith")
    alice.page.keyboard.press("Enter")
    assert alice.shown()[0] == 1
    assert alice.page.inner_text("#progress-text").startswith("Image 1 of 7")

    # Bob rates in his own browser at the same time, his clicks interleaved with Alice's.
    bob = RaterPage(browser.new_context().new_page())
    bob.page.goto(live_url + "?rater=Bob")
    alice.rate(4, "no", mouse=False)
    bob.rate(1, "yes", mouse=True)
    alice.rate(2, "yes", mouse=True)
    bob.rate(5, "unsure", mouse=False)
    alice.rate(5, "unsure", mouse=False)
    alice.rate(3, None, mouse=True)  # half-answered: the page stays on this image
    assert alice.shown()[0] == 4
    alice.wait_saved()
    bob.wait_saved()

    # Reloading resumes at the half-answered image, its answer shown; the name came back from the address.
    alice.page.reload()
    assert "rater=alice-smith" in alice.page.url
    position, image_id = alice.shown()
    assert position == 4 and alice.given[image_id] == [3, None]
    assert alice.page.get_attribute("[data-naturalness='3']", "aria-pressed") == "true"
    alice.rate(None, "no", mouse=False)
    assert alice.shown()[0] == 5
    # Back to an answered image and change one answer: the page stays there for a second change.
    alice.page.keyboard.press("ArrowLeft")
    _, image_id = alice.shown()
    alice.rate(1, None, mouse=False)
    assert alice.shown()[1] == image_id
    alice.wait_saved()

    # A new tab without the name in the address finds it in the browser's storage.
    again = RaterPage(alice.page.context.new_page())
    again.page.goto(live_url)
    assert again.shown()[0] == 5  # shown() waits for the study to load
    assert again.page.inner_text("#rater-name") == "alice-smith"

    for rater, page in (("alice-smith", alice), ("bob", bob)):
        saved = _saved(setup, rater)
        assert {sha: [a["naturalness"], a["object_present"]] for sha, a in saved.items()} == page.given
    assert sorted(p.name for p in ratings_dir(setup.workspace).iterdir()) == ["alice-smith.json", "bob.json"]
