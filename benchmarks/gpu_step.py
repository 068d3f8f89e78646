"""One client's round of the FedGen MNIST setting on the CPU and on CUDA: the per-round speed-up.

No Ray, no Flower: the FedGen CNN of conf/experiment/fedgen_mnist.yaml (channels 6, 16, hidden 32,
SGD lr 0.01 momentum 0.9, batch 32) does what a KD client does in a round, through
`fedkd.training`: digest the transfer rows (KD on soft targets + CE on private batches, alpha
0.5), revisit its ~600 private rows for one epoch, answer logits on the transfer rows. Each arm
runs one warm-up round, then `--rounds` timed rounds, from the same seeds; the speed-up is the CPU
arm's median round over the CUDA arm's. Without a GPU only the CPU arm runs.

    python -m benchmarks.gpu_step --json gpu_step.json [--rounds 5] [--rows 600] [--threads 1]

MNIST comes from ``--data`` (``mnist_train.npz``, the ``files`` format: x N x 28 x 28 in [0, 1]);
without it, random data of the same shape (the timing does not depend on the pixels).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedkd.losses import distill_loss
from fedkd.models import build_model
from fedkd.optim import build_optimizer
from fedkd.training import digest, predict_logits, revisit, round_generator

SPEC = {"_target_": "fedkd.models.FedGenCNN", "channels": [6, 16], "hidden": 32}
OPTIMIZER = {"_target_": "torch.optim.SGD", "lr": 0.01, "momentum": 0.9}
SHAPE, CLASSES = (1, 28, 28), 10


def load_data(folder: Path, rows: int, transfer: int, seed: int) -> dict[str, torch.Tensor | str]:
    """Private rows, labels, transfer rows and soft targets (MNIST, standardised, or random)."""
    gen = torch.Generator().manual_seed(seed)
    path = folder / "mnist_train.npz"
    if path.is_file():
        with np.load(path) as npz:
            x, y = torch.from_numpy(npz["x"]).float(), torch.from_numpy(npz["y"]).long()
        x = ((x - x.mean()) / x.std()).unsqueeze(1)  # dataset.normalize: standard
        pick = torch.randperm(len(x), generator=gen)[: rows + transfer]
        x, y, source = x[pick], y[pick], str(path)
    else:
        x = torch.randn(rows + transfer, *SHAPE, generator=gen)
        y, source = torch.randint(CLASSES, (rows + transfer,), generator=gen), "random"
    soft = torch.softmax(torch.randn(transfer, CLASSES, generator=gen), 1)
    return {"x": x[:rows], "y": y[:rows], "public": x[rows:], "soft": soft, "source": source}


def run_arm(device: torch.device, data: dict, rounds: int, batch_size: int) -> dict:
    """One warm-up round and `rounds` timed rounds on `device`: seconds per round and per phase."""
    torch.manual_seed(0)
    model = build_model(SPEC, SHAPE, CLASSES).to(device)  # initialised on the CPU, as a client's
    optimizer = build_optimizer(OPTIMIZER, model.parameters())
    loss = distill_loss(0.5, 1.0)
    phases: dict[str, list[float]] = {"digest": [], "revisit": [], "logits": [], "round": []}
    logits = None
    for server_round in range(rounds + 1):
        gen = round_generator(0, 0, server_round)
        start = time.perf_counter()
        digest(model, optimizer, data["public"], data["soft"], data["x"], data["y"], loss=loss,
               epochs=1, batch_size=batch_size, gen=gen)  # returns a CPU float: synchronised
        after_digest = time.perf_counter()
        revisit(model, optimizer, data["x"], data["y"], epochs=1, batch_size=batch_size, gen=gen)
        after_revisit = time.perf_counter()
        logits = predict_logits(model, data["public"])  # CPU numpy: synchronised
        end = time.perf_counter()
        if server_round:  # round 0 warms up (CUDA context, cuDNN kernels)
            for name, seconds in (("digest", after_digest - start),
                                  ("revisit", after_revisit - after_digest),
                                  ("logits", end - after_revisit), ("round", end - start)):
                phases[name].append(seconds)
    return {"device": str(device), "median_s": {k: float(np.median(v)) for k, v in phases.items()},
            "round_s": phases["round"], "logits": logits}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/mnist"))
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per arm")
    parser.add_argument("--rows", type=int, default=600, help="private rows (one epoch)")
    parser.add_argument("--transfer", type=int, default=1000, help="transfer rows (FedGen: 1,000)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (a client: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_data(args.data, args.rows, args.transfer, seed=0)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    else:
        print("cuda is absent (torch.cuda.is_available() is False): the CPU arm only")
    arms = [run_arm(device, data, args.rounds, args.batch_size) for device in devices]
    result = {"data": data["source"], "rows": args.rows, "transfer": args.transfer,
              "batch_size": args.batch_size, "threads": args.threads, "rounds": args.rounds,
              "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if len(arms) > 1 else None,
              "arms": [{k: v for k, v in arm.items() if k != "logits"} for arm in arms],
              "speedup": None, "max_logit_diff": None}
    for arm in arms:
        print(f"{arm['device']:>5}: " + "  ".join(f"{k} {v * 1e3:.1f} ms"
                                                   for k, v in arm["median_s"].items()))
    if len(arms) > 1:
        cpu, gpu = arms
        result["speedup"] = cpu["median_s"]["round"] / gpu["median_s"]["round"]
        result["max_logit_diff"] = float(np.abs(cpu["logits"] - gpu["logits"]).max())
        print(f"speed-up per round (cpu / cuda): {result['speedup']:.2f}x; max |logit difference| "
              f"after {args.rounds + 1} rounds: {result['max_logit_diff']:.2e}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
