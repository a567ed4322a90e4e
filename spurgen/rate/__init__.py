"""``spurgen rate``: the paper's human study as a local web page, and the answers it collects.

A study holds the chosen classes' images in the workspace: references (``refs/<class>/``), generated
images (``generated/<class>/<run>/``) and, with ``--dataset``, Spurious ImageNet's class folders. Each
distinct image (by content: references are copies of data set images) is in it once. A rater answers two
questions per image: how natural it looks (1-5) and whether the class object is in it (yes / no / unsure).

The source stays hidden from the rater: images are addressed by their content hash, never by path, and
served re-encoded (same format, same size, no embedded text), and each rater gets their own seeded order.
Every click is saved at once to ``ratings/<rater>.json`` (one file per rater, so raters never write the
same file; a per-rater lock and an atomic replace for one rater's overlapping requests).

:func:`load_ratings` reads every rater's answers for evaluate; ``spurgen rate --export`` writes them as CSV.
The web server needs the ``rate`` extra (Flask and waitress), imported only when serving.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import importlib
import io
import random
import re
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from PIL import Image

from .._runtime import console, progress_bar, warn
from ..config import RateConfig
from ..errors import SpurgenError
from ..images import SpuriousImageNetFolder, UnreadableImage, file_sha256, list_images, load_rgb
from ..labels import ClassInfo, get_label_set
from ..workspace import GENERATION_FILE, Workspace, atomic_write_json, atomic_write_text, read_json, safe_name, utc_now

if TYPE_CHECKING:
    from flask import Flask
    from waitress.server import BaseWSGIServer, MultiSocketServer

__all__ = [
    "SOURCES",
    "OBJECT_ANSWERS",
    "Rating",
    "StudyImage",
    "Study",
    "RatingsStore",
    "build_study",
    "print_study_table",
    "ratings_dir",
    "sanitize_rater",
    "load_ratings",
    "export_ratings_csv",
    "create_app",
    "make_server",
    "server_urls",
    "rate",
]

# In this order an image found in several places takes its source: a reference is also a data set image.
SOURCES = ("reference", "dataset", "generated")
OBJECT_ANSWERS = ("yes", "no", "unsure")
RATINGS_FORMAT = 1
MISSING_EXTRA = "the rating server needs Flask and waitress; install them with: pip install 'spurgen[rate]'"
# Marks a run folder as spurgen generate's; it exists from the first image on, so unfinished runs count too.
STATIC_DIR = Path(__file__).with_name("static")
_MAX_RATER_LENGTH = 40


@dataclass(frozen=True)
class Rating:
    """One rater's answers for one image, as evaluate and the CSV export see them.

    Attributes:
        rater: The sanitised rater name (also the ratings file's name).
        sha256: Content hash of the image file, the key to join with predictions and manifests.
        path: Where the image was: relative to the workspace for references and generated images,
            relative to the ``--dataset`` folder for data set images.
        source: ``"reference"``, ``"dataset"`` or ``"generated"``.
        class_index: The class the image belongs to.
        class_name: Its display name.
        run: The generation run of a generated image, else ``None``.
        naturalness: 1 (very unnatural) to 5 (very natural), ``None`` while unanswered.
        object_present: ``"yes"``, ``"no"`` or ``"unsure"``, ``None`` while unanswered.
        timestamp: When this answer last changed (UTC, ISO 8601).
    """

    rater: str
    sha256: str
    path: str
    source: str
    class_index: int
    class_name: str
    run: str | None
    naturalness: int | None
    object_present: str | None
    timestamp: str


@dataclass(frozen=True)
class StudyImage:
    """One image of a study and what its answers record about it."""

    sha256: str
    file: Path
    path: str
    source: str
    cls: ClassInfo
    run: str | None

    def question(self) -> str:
        article = "an" if self.cls.name[:1].lower() in "aeiou" else "a"
        return f"Do you see {article} {self.cls.name} in this image?"


@dataclass
class Study:
    """The images to rate, by content hash, and the seed of every rater's order."""

    images: dict[str, StudyImage]
    seed: int

    def order_for(self, rater: str) -> list[StudyImage]:
        """The rater's own order of the images.

        Sorting by a hash keyed with the seed and the rater is a seeded shuffle that stays stable when
        images are added mid-study (another generate run): the images keep their order relative to each other.
        """
        def key(image: StudyImage) -> bytes:
            return hashlib.sha256(f"{self.seed}\0{rater}\0{image.sha256}".encode()).digest()

        return sorted(self.images.values(), key=key)


def sanitize_rater(name: str) -> str:
    """A rater's typed name as a file-safe, case-folded name: ``"José Müller"`` -> ``"jose-muller"``.

    Case is folded so that "Alice" and "alice" are one rater on every file system.

    Raises:
        SpurgenError: nothing usable is left (no ASCII letter or digit).
    """
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii").lower()
    slug = re.sub(r"[^a-z0-9_]+", "-", ascii_name).strip("-_")[:_MAX_RATER_LENGTH].rstrip("-_")
    if not slug:
        raise SpurgenError(f"rater name {name!r} has no letter or digit; type a name such as 'alice'")
    return safe_name(slug, "rater name")


def _generated_files(run_dir: Path) -> list[Path]:
    """A generate run's images, less those the safety checker blanked (black squares are no study material)."""
    manifest = read_json(run_dir / GENERATION_FILE)
    entries = manifest.get("images", []) if isinstance(manifest, dict) else []
    blanked = {entry.get("file") for entry in entries if isinstance(entry, dict) and entry.get("nsfw_flagged")}
    return [f for f in list_images(run_dir) if f.name not in blanked]


def _class_candidates(cls: ClassInfo, workspace: Workspace,
                      dataset: SpuriousImageNetFolder | None) -> dict[str, list[tuple[Path, str, str | None]]]:
    """One class's image files by source, each as (file, recorded path, generation run)."""
    found: dict[str, list[tuple[Path, str, str | None]]] = {source: [] for source in SOURCES}
    refs = workspace.refs_dir(cls)
    if refs.is_dir():
        found["reference"] = [(f, f.relative_to(workspace.root).as_posix(), None) for f in list_images(refs)]
    if dataset is not None:
        found["dataset"] = [(f, f.relative_to(dataset.root).as_posix(), None) for f in dataset.class_images(cls.index)]
    generated = workspace.class_generated_dir(cls)
    for run_dir in sorted(generated.iterdir()) if generated.is_dir() else []:
        # Hidden folders are atomic_directory's staging areas; a folder without the manifest is not a run.
        if run_dir.is_dir() and not run_dir.name.startswith(".") and (run_dir / GENERATION_FILE).is_file():
            found["generated"] += [(f, f.relative_to(workspace.root).as_posix(), run_dir.name)
                                   for f in _generated_files(run_dir)]
    return found


def build_study(config: RateConfig, workspace: Workspace) -> Study:
    """Collects and hashes the images of the configured classes.

    With ``max_images``, each class and source keeps a sample seeded by the study seed, so a restarted
    server offers the same images.

    Raises:
        SpurgenError: unknown classes, a malformed ``--dataset`` folder, or no image at all.
    """
    labels = get_label_set(config.labels)
    classes = labels.resolve_many(config.classes)
    dataset = SpuriousImageNetFolder(config.dataset) if config.dataset else None
    chosen: list[tuple[ClassInfo, str, Path, str, str | None]] = []
    for cls in classes:
        for source, files in _class_candidates(cls, workspace, dataset).items():
            if config.max_images is not None and len(files) > config.max_images:
                sample = random.Random(f"{config.seed}/{cls.index}/{source}").sample(files, config.max_images)
                files = sorted(sample)
            chosen += [(cls, source, file, path, run) for file, path, run in files]
    if not chosen:
        names = ", ".join(c.dirname for c in classes[:5]) + (", ..." if len(classes) > 5 else "")
        raise SpurgenError(f"no images to rate for {names}; run select-refs and generate first, "
                           "or pass Spurious ImageNet's 'images' folder to --dataset")
    images: dict[str, StudyImage] = {}
    with progress_bar("images") as progress:
        task = progress.add_task("hashing images", total=len(chosen))
        for cls, source, file, path, run in chosen:
            digest = file_sha256(file)
            # Sources come in SOURCES order per class, so the first one seen is the one that counts.
            images.setdefault(digest, StudyImage(digest, file, path, source, cls, run))
            progress.advance(task)
    return Study(images=images, seed=config.seed)


def print_study_table(study: Study) -> None:
    """Images per class and source; the rater never sees this split."""
    from rich.table import Table

    counts: dict[ClassInfo, dict[str, int]] = {}
    for image in study.images.values():
        per_source = counts.setdefault(image.cls, dict.fromkeys(SOURCES, 0))
        per_source[image.source] += 1
    table = Table(title=f"rating study: {len(study.images)} images")
    for column in ("class", *SOURCES, "total"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for cls in sorted(counts, key=lambda c: c.index):
        table.add_row(str(cls), *(str(counts[cls][s]) for s in SOURCES), str(sum(counts[cls].values())))
    console.print(table)


# --- storage ---------------------------------------------------------------------------------------------------


def ratings_dir(workspace: Workspace) -> Path:
    return workspace.root / "ratings"


class RatingsStore:
    """The per-rater answer files ``ratings/<rater>.json`` of one workspace, safe for a threaded server.

    A file holds ``{"format": 1, "rater": ..., "answers": {sha256: {path, source, class_index, class_name,
    run, naturalness, object_present, timestamp}}}``. Each answer records where its image was, so the
    answers can be read without rebuilding the study.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def file(self, rater: str) -> Path:
        return self.folder / f"{rater}.json"

    def answers(self, rater: str) -> dict[str, dict[str, Any]]:
        """The rater's answers by image hash (empty for a new rater)."""
        path = self.file(rater)
        return _read_ratings_file(path)["answers"] if path.is_file() else {}

    def record(self, rater: str, image: StudyImage, naturalness: int | None = None,
               object_present: str | None = None) -> dict[str, Any]:
        """Sets the given answers of one image (the other one is kept) and rewrites the rater's file.

        The lock makes one rater's overlapping requests (two quick clicks, two tabs) a read-modify-write
        each in turn, so neither answer is lost; the atomic replace means a reader never sees half a file.
        """
        with self._lock(rater):
            answers = self.answers(rater)
            entry = answers.get(image.sha256, {"naturalness": None, "object_present": None})
            entry.update(path=image.path, source=image.source, class_index=image.cls.index,
                         class_name=image.cls.name, run=image.run, timestamp=utc_now())
            if naturalness is not None:
                entry["naturalness"] = naturalness
            if object_present is not None:
                entry["object_present"] = object_present
            answers[image.sha256] = entry
            atomic_write_json(self.file(rater), {"format": RATINGS_FORMAT, "rater": rater, "answers": answers})
            return entry

    def _lock(self, rater: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(rater, threading.Lock())


def _read_ratings_file(path: Path) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != RATINGS_FORMAT or not isinstance(data.get("answers"), dict):
        raise SpurgenError(f"{path} is not a spurgen ratings file (format {RATINGS_FORMAT}); move it out of ratings/")
    return data


def load_ratings(workspace: Workspace) -> list[Rating]:
    """Every rater's answers in the workspace, by rater then image hash; empty when nobody has rated.

    Partly answered images are included with ``None`` for the open question.

    Raises:
        SpurgenError: a file in ``ratings/`` is unreadable or not a ratings file.
    """
    folder = ratings_dir(workspace)
    ratings = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if path.name.startswith("."):
            continue
        data = _read_ratings_file(path)
        try:
            ratings += [Rating(rater=data["rater"], sha256=sha, path=a["path"], source=a["source"],
                               class_index=int(a["class_index"]), class_name=a["class_name"], run=a["run"],
                               naturalness=a["naturalness"], object_present=a["object_present"],
                               timestamp=a["timestamp"])
                        for sha, a in sorted(data["answers"].items())]
        except (KeyError, TypeError, ValueError):
            raise SpurgenError(f"{path} has a malformed answer; restore it or move it out of ratings/") from None
    return ratings


def export_ratings_csv(workspace: Workspace, target: Path | None = None) -> tuple[Path, int]:
    """Writes every rating as one CSV row (the :class:`Rating` fields as columns; empty for ``None``).

    Args:
        workspace: Whose ``ratings/`` to export.
        target: The CSV file; default ``reports/ratings.csv`` in the workspace.

    Returns:
        The file written and its number of rows.

    Raises:
        SpurgenError: no ratings yet.
    """
    ratings = load_ratings(workspace)
    if not ratings:
        raise SpurgenError(f"no ratings in {ratings_dir(workspace)}; run 'spurgen rate' and rate some images first")
    target = target or workspace.reports_dir / "ratings.csv"
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(field.name for field in dataclasses.fields(Rating))
    for rating in ratings:
        writer.writerow("" if value is None else value for value in dataclasses.astuple(rating))
    atomic_write_text(target, buffer.getvalue())
    return target, len(ratings)


# --- web server ------------------------------------------------------------------------------------------------


def _import_extra(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SpurgenError(MISSING_EXTRA) from None


def render_image(file: Path, size: int) -> bytes:
    """The image as a PNG without metadata whose longer side is ``size`` pixels.

    Every source then looks the same to the browser: no JPEG-versus-PNG, no tell-tale 512 px square,
    no generation parameters in text chunks.

    Raises:
        UnreadableImage: the file cannot be decoded.
    """
    image = load_rgb(file)
    scale = size / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _answer_fields(payload: dict[str, Any]) -> tuple[int | None, str | None]:
    """The answers of a POST body, checked; at least one must be given."""
    naturalness, present = payload.get("naturalness"), payload.get("object_present")
    if naturalness is not None and (type(naturalness) is not int or not 1 <= naturalness <= 5):
        raise SpurgenError(f"naturalness must be a whole number from 1 to 5, got {naturalness!r}")
    if present is not None and present not in OBJECT_ANSWERS:
        raise SpurgenError(f"object_present must be one of {', '.join(OBJECT_ANSWERS)}, got {present!r}")
    if naturalness is None and present is None:
        raise SpurgenError("no answer given; send naturalness and/or object_present")
    return naturalness, present


def create_app(study: Study, store: RatingsStore, image_size: int = 512) -> Flask:
    """The rating page and its JSON API as a Flask app.

    Routes: ``GET /`` the page; ``GET /api/study?rater=NAME`` the sanitised name, the rater's images in
    their order with the answers so far, and where to resume; ``GET /image/<sha256>`` an image;
    ``POST /api/answer`` ``{rater, id, naturalness?, object_present?}``. Errors are ``{"error": ...}``
    with status 400, or 404 for an id outside the study.

    Raises:
        SpurgenError: Flask is not installed.
    """
    flask = _import_extra("flask")
    app = flask.Flask(__name__, static_folder=str(STATIC_DIR), static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = 4096  # an answer is a few dozen bytes

    @functools.lru_cache(maxsize=64)
    def encoded(sha256: str) -> bytes:
        return render_image(study.images[sha256].file, image_size)

    def image_or_404(image_id: Any) -> StudyImage:
        # The id is only ever a dictionary key, never part of a path: nothing outside the study can be reached.
        image = study.images.get(image_id) if isinstance(image_id, str) else None
        if image is None:
            flask.abort(flask.make_response({"error": f"no image {image_id!r} in this study"}, 404))
        return image

    @app.errorhandler(SpurgenError)
    def bad_request(error: SpurgenError) -> tuple[dict[str, str], int]:
        return {"error": str(error)}, 400

    @app.get("/")
    def page() -> Any:
        return app.send_static_file("index.html")

    @app.get("/api/study")
    def rater_study() -> dict[str, Any]:
        rater = sanitize_rater(flask.request.args.get("rater", ""))
        answers = store.answers(rater)
        items = []
        for image in study.order_for(rater):
            answer = answers.get(image.sha256, {})
            items.append({"id": image.sha256, "question": image.question(),
                          "naturalness": answer.get("naturalness"), "object_present": answer.get("object_present")})
        resume = next((i for i, item in enumerate(items)
                       if item["naturalness"] is None or item["object_present"] is None), len(items))
        return {"rater": rater, "items": items, "resume": resume}

    @app.get("/image/<image_id>")
    def image(image_id: str) -> Any:
        try:
            data = encoded(image_or_404(image_id).sha256)
        except UnreadableImage as exc:
            warn(f"cannot show {study.images[image_id].file}: {exc}")
            return {"error": "this image cannot be decoded"}, 404
        response = flask.Response(data, mimetype="image/png")
        # The id is the content hash, so a cached copy never goes stale; private keeps it off shared proxies.
        response.cache_control.private = True
        response.cache_control.max_age = 3600
        return response

    @app.post("/api/answer")
    def answer() -> dict[str, Any]:
        payload = flask.request.get_json(silent=True)
        if not isinstance(payload, dict):
            raise SpurgenError("the body must be a JSON object")
        rater = sanitize_rater(str(payload.get("rater", "")))
        image = image_or_404(payload.get("id"))
        naturalness, present = _answer_fields(payload)
        entry = store.record(rater, image, naturalness, present)
        return {"naturalness": entry["naturalness"], "object_present": entry["object_present"]}

    return app


def make_server(app: Flask, host: str, port: int) -> BaseWSGIServer | MultiSocketServer:
    """Binds a waitress server for ``app`` (port 0 picks a free one); ``run()`` then serves until Ctrl-C.

    waitress rather than Werkzeug's development server: it is made for real use on a network, runs its
    requests on a thread pool, and is pure Python on every platform.

    Raises:
        SpurgenError: waitress is not installed, or the address cannot be bound.
    """
    waitress = _import_extra("waitress")
    try:
        return waitress.create_server(app, host=host, port=port, threads=8)
    except OSError as exc:
        raise SpurgenError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
                           "pass another --port, or a --host address of this machine") from None


def server_urls(server: BaseWSGIServer | MultiSocketServer) -> list[str]:
    """The page's address on each socket the server listens on (``localhost`` can be both IPv4 and IPv6)."""
    listening = getattr(server, "effective_listen", None) or [(server.effective_host, server.effective_port)]
    return [f"http://[{host}]:{port}/" if ":" in str(host) else f"http://{host}:{port}/" for host, port in listening]


def rate(config: RateConfig, workspace: Workspace) -> None:
    """Builds the study and serves the rating page until interrupted.

    Raises:
        SpurgenError: the ``rate`` extra is missing, no images, an unwritable workspace, or a busy port.
    """
    for module in ("flask", "waitress"):  # before hashing, which can take a while
        _import_extra(module)
    workspace.ensure_writable()
    study = build_study(config, workspace)
    print_study_table(study)
    server = make_server(create_app(study, RatingsStore(ratings_dir(workspace)), config.image_size),
                         config.host, config.port)
    console.print(f"rating page: {'  '.join(server_urls(server))}  (answers go to {ratings_dir(workspace)}; "
                  "Ctrl-C stops the server)", highlight=False, soft_wrap=True)
    server.run()
    console.print(f"server stopped; every answer is saved in {ratings_dir(workspace)}", highlight=False)
