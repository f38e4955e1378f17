"""Train the embedded default models on Fashion-MNIST (seeded, reproducible on CPU).

    python3 scripts/train_default_models.py                 # both models, into models/trained/
    python3 scripts/train_default_models.py fashion_resnet  # one
    python3 scripts/train_default_models.py --out gpfq/pretrained --overwrite   # replace the shipped weights

Writes <out>/<name>.pt (state dict) and <name>.json (command, seed, epochs, test accuracy); quantize
with them by `--weights models/trained/<name>.pt`. The default folder is models/trained/, so the
shipped weights (gpfq/pretrained/) are never replaced by accident, and an existing file is only
replaced with --overwrite.
"""
import argparse
import json
import time
from pathlib import Path

try:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from gpfq.runner.cli import run_script
    from gpfq.io.data import fashion_mnist, evaluation_loader
    from gpfq.errors import BadInputError
    from gpfq.runner.evaluate import evaluate
    from gpfq.io.models import EMBEDDED_MODELS
    from gpfq.paths import MODEL_DIR, REPO_ROOT
except ModuleNotFoundError as error:  # e.g. the system python3 after `make demo`, which installs into .venv
    needed = "" if error.name == "gpfq" else ", which gpfq needs"
    raise SystemExit(f"this Python cannot import {error.name}{needed}: after `make demo` gpfq is installed in .venv; "
                     f"activate it (`source .venv/bin/activate`) or run "
                     f"`.venv/bin/python scripts/train_default_models.py …`; elsewhere run `pip install -e .` in the "
                     f"repository root") from None

DEFAULT_OUT = MODEL_DIR / "trained"


def train(name: str, epochs: int, seed: int, batch_size: int, lr: float, device: str = "cpu",
          out: Path = DEFAULT_OUT) -> dict:
    torch.manual_seed(seed)
    model = EMBEDDED_MODELS[name]().to(device)
    train_set, test_set = fashion_mnist("train"), fashion_mnist("test")
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * len(loader))
    loss_fn = nn.CrossEntropyLoss()
    start = time.time()
    for epoch in range(epochs):
        model.train()
        for images, labels in tqdm(loader, desc=f"{name} epoch {epoch + 1}/{epochs}", leave=False):
            # random horizontal flips (clothes are left-right symmetric), drawn from the seeded stream
            flip = torch.rand(images.shape[0]) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss_fn(model(images), labels).backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        top1, top5 = evaluate(model, evaluation_loader(test_set), device=device, progress=False)
        print(f"{name} epoch {epoch + 1}: test top-1 {top1:.4f} top-5 {top5:.4f}", flush=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.cpu().state_dict(), out / f"{name}.pt")
    record = {"model": name, "dataset": "fashion_mnist", "seed": seed, "epochs": epochs,
              "batch_size": batch_size, "max_lr": lr, "test_top1": top1, "test_top5": top5,
              "train_seconds": round(time.time() - start, 1),
              "parameters": sum(p.numel() for p in model.parameters()),
              "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
              "command": f"python3 scripts/train_default_models.py {name} --epochs {epochs} --seed {seed}"
                         + (f" --device {device}" if device != "cpu" else "") + f" --out {_shown(out)}"}
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _shown(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=sorted(EMBEDDED_MODELS), choices=sorted(EMBEDDED_MODELS))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder of the trained weights (default: "
                                                                "models/trained; the shipped ones are gpfq/pretrained)")
    parser.add_argument("--overwrite", action="store_true", help="replace weights already in --out")
    args = parser.parse_args(argv)
    existing = [Path(args.out) / f"{name}.pt" for name in args.models if (Path(args.out) / f"{name}.pt").exists()]
    if existing and not args.overwrite:
        raise BadInputError(f"{', '.join(map(str, existing))} exists; choose another --out, or add --overwrite to "
                            f"replace it")
    for name in args.models:
        print(json.dumps(train(name, args.epochs, args.seed, args.batch_size, args.lr, args.device, args.out),
                         indent=2))


if __name__ == "__main__":
    run_script(main)
