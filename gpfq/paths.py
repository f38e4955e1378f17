"""Repository locations, independent of the working directory, and the package version (the log's
"Package Version" column; pyproject.toml states the same).

In a checkout (or an editable install of one) the scripts' data, logs and models folders are the repository's;
a package installed with `pip install .` sits in site-packages, so there they default to the working directory.
"""
from pathlib import Path

__version__ = "0.1.0"

REPO_ROOT = Path(__file__).resolve().parents[1]
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


def _in_checkout(root: Path) -> bool:
    """Whether `root` holds this project's pyproject.toml beside the package (not site-packages)."""
    try:
        return 'name = "gpfq"' in (root / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return False


def _working_directory() -> Path:
    try:
        return Path.cwd()
    except OSError:  # a working directory that was deleted
        return Path(".")


IN_CHECKOUT = _in_checkout(REPO_ROOT)
BASE_DIR = REPO_ROOT if IN_CHECKOUT else _working_directory()  # where data/, logs/ and models/ are by default
DATA_DIR = BASE_DIR / "data"
LOG_DIR = BASE_DIR / "logs"
MODEL_DIR = BASE_DIR / "models"
