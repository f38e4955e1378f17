"""Repository locations, independent of the working directory, and the package version (the log's
"Package Version" column; pyproject.toml states the same)."""
from pathlib import Path

__version__ = "0.1.0"

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
LOG_DIR = REPO_ROOT / "logs"
MODEL_DIR = REPO_ROOT / "models"
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
