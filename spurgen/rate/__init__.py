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

from .._runtime import console
from ..config import RateConfig
from ..workspace import Workspace
from .ratings import (OBJECT_ANSWERS, Rating, RatingsStore, export_ratings_csv, load_ratings, ratings_dir,
                      sanitize_rater)
from .server import create_app, import_extra, make_server, server_urls
from .study import SOURCES, Study, StudyImage, build_study, print_study_table

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


def rate(config: RateConfig, workspace: Workspace) -> None:
    """Builds the study and serves the rating page until interrupted.

    Raises:
        SpurgenError: the ``rate`` extra is missing, no images, an unwritable workspace, or a busy port.
    """
    for module in ("flask", "waitress"):  # before hashing, which can take a while
        import_extra(module)
    workspace.ensure_writable()
    study = build_study(config, workspace)
    print_study_table(study)
    server = make_server(create_app(study, RatingsStore(ratings_dir(workspace)), config.image_size),
                         config.host, config.port)
    console.print(f"rating page: {'  '.join(server_urls(server))}  (answers go to {ratings_dir(workspace)}; "
                  "Ctrl-C stops the server)", highlight=False, soft_wrap=True)
    server.run()
    console.print(f"server stopped; every answer is saved in {ratings_dir(workspace)}", highlight=False)
