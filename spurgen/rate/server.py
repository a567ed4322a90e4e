"""The rating page and its JSON API (Flask), served by waitress: the ``rate`` extra, imported only here."""

from __future__ import annotations

import functools
import importlib
import io
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from PIL import Image

from .._runtime import warn
from ..errors import SpurgenError
from ..images import UnreadableImage, load_rgb
from .ratings import OBJECT_ANSWERS, RatingsStore, sanitize_rater
from .study import Study, StudyImage

if TYPE_CHECKING:
    from flask import Flask
    from waitress.server import BaseWSGIServer, MultiSocketServer

__all__ = ["MISSING_EXTRA", "STATIC_DIR", "import_extra", "render_image", "create_app", "make_server", "server_urls"]

MISSING_EXTRA = "the rating server needs Flask and waitress; install them with: pip install 'spurgen[rate]'"
STATIC_DIR = Path(__file__).with_name("static")


def import_extra(module: str) -> ModuleType:
    """Imports a module of the ``rate`` extra.

    Raises:
        SpurgenError: it is not installed.
    """
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
    flask = import_extra("flask")
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
    waitress = import_extra("waitress")
    try:
        return waitress.create_server(app, host=host, port=port, threads=8)
    except OSError as exc:
        raise SpurgenError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
                           "pass another --port, or a --host address of this machine") from None


def server_urls(server: BaseWSGIServer | MultiSocketServer) -> list[str]:
    """The page's address on each socket the server listens on (``localhost`` can be both IPv4 and IPv6)."""
    listening = getattr(server, "effective_listen", None) or [(server.effective_host, server.effective_port)]
    return [f"http://[{host}]:{port}/" if ":" in str(host) else f"http://{host}:{port}/" for host, port in listening]
