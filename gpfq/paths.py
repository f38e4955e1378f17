"""Repository locations, independent of the working directory."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
LOG_DIR = REPO_ROOT / "logs"
MODEL_DIR = REPO_ROOT / "models"
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
