"""``python -m spurgen`` (and ``accelerate launch -m spurgen ...``)."""

from spurgen.cli import run

if __name__ == "__main__":
    run()
