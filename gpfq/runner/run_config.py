"""RunConfig: what a grid point's run needs besides its quantization (`gpfq.QuantConfig`).

`gpfq.runner.header.parse_point` builds a `Point` (QuantConfig, RunConfig) from each grid point's dict, once,
checking it; below that the runner reads attributes only. A variant's own header keys become its typed
`options` (e.g. `adhoc.AdhocOptions`).
"""
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from gpfq.config import QuantConfig


@dataclass(frozen=True)
class RunConfig:
    """Model, data, folders, evaluation, execution, resume and export of one grid point."""
    model_name: str
    dataset: str
    weights: str = "DEFAULT"  # "DEFAULT", "random" (drawn from the seed) or a weights file
    data_dir: Optional[str] = None  # None: gpfq.paths.DATA_DIR
    image_size: Optional[int] = None  # imagefolder: side of the prepared images (None: the model's own)
    log_dir: Optional[str] = None  # None: gpfq.paths.LOG_DIR
    model_dir: Optional[str] = None  # None: gpfq.paths.MODEL_DIR
    author: str = ""
    eval_subset: Optional[int] = None  # None: the whole evaluation set; N: a class-balanced N images
    eval_batch_size: int = 256
    chunk_size: int = 256  # images per chunk of the calibration stream
    num_workers: int = 0
    num_threads: Optional[int] = None  # None: distributed.threads_per_rank() (OMP_NUM_THREADS, or the cores)
    device: str = "cpu"
    checkpoint: object = "auto"  # per-layer checkpoints: "auto", True or False
    resume: bool = False
    debug: bool = False  # known errors show their stack (gpfq.runner.cli reads it from the header itself)
    export_onnx: bool = False
    export_qdq: bool = False
    options: object = None  # the variant's own options, typed by the variant (None for the plain script)
    # The point's dict as given, for the saved record's "hyperparameters" and the model file's header: both keep
    # every key of the script's header, in its order, so they stay readable by the tools that read them.
    header: dict = field(default_factory=dict, repr=False, hash=False)


class Point(NamedTuple):
    """One grid point, parsed: how its layers are quantized and how it runs."""
    config: QuantConfig
    run: RunConfig
