"""GPFQ with retraining: quantize layer by layer in place, fine-tuning the layers still float.

After each quantized layer (from the `retrain_start`-th on) that layer is frozen and the rest of the
network (later layers, BatchNorm scales and shifts) is fine-tuned with Adam for `retrain_epochs` on
`retrain_samples` labelled training images. Since the network is quantized in place, X̃ = X.

Edit the hyperparameters below and run `python3 quantize.py` (from this folder or the repo root).
Any name can be overridden on the command line, e.g. `python3 quantize.py --bits 3 --retrain_samples 8192`.
List values expand into a grid; each point appends one row to logs/Quantization_Log_Retrain.csv and saves
its model to models/<model_name>/retrain_… with a JSON sidecar.
"""
# ------------------------------------------------------------------ hyperparameters
model_name = "fashion_resnet"   # embedded: fashion_resnet, fashion_mobilenet; a torchvision name: resnet18, ...;
                                #   your own: "path/to/file.py:factory", "package.module:factory"; "timm:<name>"
dataset = "fashion_mnist"       # "fashion_mnist" (embedded models), "imagenet" (data/ILSVRC2012), or
                                #   "imagefolder" (data_dir/train/<class>/<image>, data_dir/val/<class>/<image>)
weights = "DEFAULT"             # "DEFAULT" (shipped / torchvision / timm pretrained), "random", or a state-dict path
method = "gpfq"                 # "gpfq", "msq" (round to nearest), "gptq" (GPTQ/OPTQ), "spfq" (stochastic GPFQ),
                                # "sparse_gpfq" (thresholded GPFQ), "qronos" (Qronos); a list compares methods
bits = [4]                      # bits per weight
batch_size = [512]              # m: calibration images drawn afresh for every layer
mlp_scalar = [1.3]              # C for Linear layers: alphabet radius = C * rad
cnn_scalar = [1.3]              # C for Conv2d layers
mlp_percentile = [1.0]          # rad = mean over neurons of this quantile of |w| (1.0 = max)
cnn_percentile = [1.0]          # the same for Conv2d layers
alphabet = "gpfq2022"           # "gpfq2022" (paper: 2^b + 1 levels), "midtread", "strict" (2^b levels)
include_0 = True                # gpfq2022 alphabet: append the level 0
alphabet_granularity = "layer"  # "layer" (paper: one radius per layer) or "channel" (one per output channel)
fold_batchnorm = False          # fold BatchNorm into the preceding Conv2d/Linear before quantizing
sparsity_threshold = 0.0        # sparse_gpfq: λ as a fraction of the alphabet's largest level
thresholding = "soft"           # sparse_gpfq: "soft" (L1) or "hard" (L0) thresholding of the argument
gptq_block_size = 128           # gptq: columns per lazy-batch block
gptq_damping = 0.01             # gptq: H += damping * mean(diag H) * I
gptq_act_order = False          # gptq: quantize columns in order of decreasing H_tt
gpfq_first_column = "paper"     # gpfq: "paper" or "code2022" (the 2022 code: Q_A(w_t) when |<X̃_t, u>| < 1e-10)
column_order = "natural"        # gpfq, spfq, sparse_gpfq, qronos: "natural" or "act_order" (decreasing ||X̃_t||²)
qronos_damping = 1e-6           # qronos: ridge λ = qronos_damping * largest eigenvalue of X̃ᵀX̃
retain_rate = 0.25              # conv layers: fraction p of each image's patches kept
patch_stride = "kernel"         # conv patches: "kernel" (paper: non-overlapping) or "layer" (the layer's stride)
ignore_layers = []              # layer indices (execution order) left float
strict_coverage = False         # True: refuse a model with > 5 % of its matmul parameters unquantizable
engine = "auto"                 # GPFQ engine: "auto" (cheaper blocked form per layer), "residual", "gram"
                                #   (streamed: memory flat in m), or "columns" (the per-column loop)
calibration = "fresh"           # "fresh" (paper: m new images per layer); retraining needs it ("fixed" caches
                                #   activations that fine-tuning would make stale)
act_bits = None                 # quantized activations: None (float, the paper) or 8 (W4A8; every tensor between
                                #   integer ops on a min-max uint8 grid calibrated on the float network, as the
                                #   int8 model rounds them; fold_batchnorm=True for a fully integer model)
act_granularity = "tensor"      # activations: one scale per tensor (what QLinearConv / QLinearAdd take)
act_calibration = "minmax"      # activations: the grid spans the input's min and max over the calibration images
export_qdq = False              # True (with act_bits 8): after the row, write <stem>.int8.onnx, the integer model
                                #   ONNX Runtime runs on int8 kernels (and say which ops, if any, stay float)
seed = 0                        # fixes the calibration images and the patch sampling (same seed, same weights)
author = ""                     # your name, for the log's Author column
num_workers = 0                 # data-loading processes
num_threads = None              # torch CPU threads (None: OMP_NUM_THREADS if set, else one per core; fewer on a shared machine)
device = "cpu"                  # "cpu" or "cuda"
resume = False                  # True: skip grid points whose row is already in the log (`--resume`)
# --- retraining
retrain_start = [1]             # fine-tune after the k-th quantized layer and every later one (original: 11)
retrain_samples = [2048]        # training images per fine-tuning step (None: the whole train set, as the original)
retrain_batch_size = 256        # images per Adam step
retrain_epochs = [1]            # epochs per fine-tuning step (0: in-place GPFQ without retraining)
retrain_lr = [1e-4]             # Adam learning rate
retrain_weight_decay = 1e-6     # Adam weight decay
retrain_batchnorm = ["update"]  # "update": train mode, running statistics follow the batches; "frozen": eval mode
evaluate_each_step = False      # test-set top-1 after every fine-tuning step (logged per step)
# ------------------------------------------------------------------------------------

HEADER = dict(model_name=model_name, dataset=dataset, weights=weights, method=method, bits=bits,
              batch_size=batch_size, mlp_scalar=mlp_scalar, cnn_scalar=cnn_scalar, mlp_percentile=mlp_percentile,
              cnn_percentile=cnn_percentile, alphabet=alphabet, include_0=include_0,
              alphabet_granularity=alphabet_granularity, fold_batchnorm=fold_batchnorm,
              sparsity_threshold=sparsity_threshold, thresholding=thresholding, gptq_block_size=gptq_block_size,
              gptq_damping=gptq_damping, gptq_act_order=gptq_act_order, gpfq_first_column=gpfq_first_column,
              column_order=column_order, qronos_damping=qronos_damping, retain_rate=retain_rate,
              patch_stride=patch_stride, ignore_layers=ignore_layers, strict_coverage=strict_coverage, engine=engine,
              calibration=calibration, act_bits=act_bits, act_granularity=act_granularity,
              act_calibration=act_calibration, export_qdq=export_qdq,
              seed=seed, author=author, num_workers=num_workers, num_threads=num_threads, device=device,
              retrain_start=retrain_start, retrain_samples=retrain_samples,
              retrain_batch_size=retrain_batch_size, retrain_epochs=retrain_epochs, retrain_lr=retrain_lr,
              retrain_weight_decay=retrain_weight_decay, retrain_batchnorm=retrain_batchnorm,
              evaluate_each_step=evaluate_each_step, resume=resume, log_dir=None, model_dir=None,
              data_dir=None)

if __name__ == "__main__":
    try:
        import gpfq  # noqa: F401
    except ModuleNotFoundError as error:  # e.g. the system python3 after `make demo`, which installs into .venv
        needed = "" if error.name == "gpfq" else ", which gpfq needs"
        raise SystemExit(f"this Python cannot import {error.name}{needed}: after `make demo` gpfq is installed in "
                         f".venv; activate it (`source .venv/bin/activate`) or run "
                         f"`.venv/bin/python retraining_scripts/quantize.py …`; "
                         f"elsewhere run `pip install -e .` in the repository root") from None
    from gpfq.runner.experiment import main
    from gpfq.runner.retrain import RETRAIN
    from gpfq.runner.cli import run_script
    run_script(main, HEADER, variant=RETRAIN)
