"""FedDF's ensemble at FedGen MNIST alpha 0.05, in plain PyTorch on fedkd's prepared data.

Each round: 10 of 20 clients train 20 SGD steps (lr 0.01 x 0.99^round, momentum 0.9, batch 32)
from the global model; their weighted average is evaluated ("avg"), and so is the ensemble of
the 10 local models on the test set under four aggregators (class_weighted, mean_probs,
mean_logits, entropy_weighted). With ``feddf`` the ensemble's soft targets on the 1,000 public
rows (T=3) are distilled into the average (Adam 1e-3, `epochs` passes) and that is the next
global model ("global"); with ``fedavg`` the average is.

    python docs/results/fedgen_mnist/feddf_ensemble_probe.py CACHE_DIR feddf ml 5

CACHE_DIR is the run's data cache (its main.log names it: ``~/.cache/fedkd/<hash>``).
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from torch import nn

from fedkd.aggregation.averaging import entropy_weighted, mean_logits, mean_probs
from fedkd.aggregation.classwise import class_weighted
from fedkd.aggregation.core import TeacherMeta
from fedkd.models.fedgen import FedGenCNN
from fedkd.server_distill import average_states, distill

AGGREGATORS = {"cw": class_weighted, "mp": mean_probs, "ml": mean_logits, "ew": entropy_weighted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache")
    parser.add_argument("mode", choices=["feddf", "fedavg"])
    parser.add_argument("aggregator", choices=sorted(AGGREGATORS), nargs="?", default="ml")
    parser.add_argument("epochs", type=int, nargs="?", default=5)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = lambda name: np.load(f"{args.cache}/{name}.npz")  # noqa: E731
    clients = [load(f"client_{i}") for i in range(20)]
    xs = [torch.tensor(c["x"], dtype=torch.float32) for c in clients]
    ys = [torch.tensor(c["y"]).long() for c in clients]
    public = torch.tensor(load("public")["x"], dtype=torch.float32)
    test = load("test")
    tx, ty = torch.tensor(test["x"], dtype=torch.float32), test["y"]
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    global_model = FedGenCNN((28, 28), 10)
    for rnd in range(1, args.rounds + 1):
        chosen = rng.choice(20, 10, replace=False)
        models, sizes, counts = [], [], []
        for k in chosen:
            model = copy.deepcopy(global_model).train()
            opt = torch.optim.SGD(model.parameters(), lr=0.01 * 0.99 ** rnd, momentum=0.9)
            for _ in range(20):
                idx = torch.randint(len(xs[k]), (32,))
                loss = nn.functional.cross_entropy(model(xs[k][idx]), ys[k][idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            models.append(model.eval())
            sizes.append(len(xs[k]))
            counts.append(np.bincount(ys[k].numpy(), minlength=10))
        meta = TeacherMeta(num_examples=np.array(sizes, float), partition_ids=np.array(chosen),
                           class_counts=np.array(counts, float))
        average = FedGenCNN((28, 28), 10)
        average.load_state_dict(average_states([m.state_dict() for m in models], sizes))
        with torch.no_grad():
            average.eval()
            avg_acc = float((average(tx).argmax(1).numpy() == ty).mean())
            test_logits = np.stack([m(tx).numpy() for m in models])
            ensemble = {name: round(float((f(test_logits, meta, temperature=1.0).argmax(1) == ty)
                                          .mean()), 3) for name, f in AGGREGATORS.items()}
            public_logits = np.stack([m(public).numpy() for m in models])
        if args.mode == "feddf":
            soft = AGGREGATORS[args.aggregator](public_logits, meta, temperature=3.0)
            distill(average, public, torch.tensor(soft, dtype=torch.float32), temperature=3.0,
                    epochs=args.epochs, lr=1e-3, batch_size=32, seed=(0, rnd))
        global_model = average
        if rnd % 5 == 0 or rnd <= 3:
            with torch.no_grad():
                acc = float((global_model.eval()(tx).argmax(1).numpy() == ty).mean())
            print(f"round {rnd}: avg {avg_acc:.3f} ensemble {ensemble} global {acc:.3f}",  # noqa: T201
                  flush=True)


if __name__ == "__main__":
    main()
