"""Independent plain-PyTorch FedAvg in the FedGen setting (a check of the harness, not part of fedkd).

    python independent_fedavg.py ALPHA NORM DECAY SEED ROUNDS [PART [MOMENTUM [LR]]]

NORM: std | half | unit; PART: flwr (flwr-datasets Dirichlet, users cut at 1,500 rows) or fedgen
(FedGen's generator; then the lr decays per global round). Prints full-test accuracy every 50 rounds.
"""
import sys, time, numpy as np, torch, datasets, copy
from torch import nn
from flwr_datasets.partitioner import DirichletPartitioner
torch.set_num_threads(1)
alpha = float(sys.argv[1]); norm = sys.argv[2]; decay = float(sys.argv[3]); seed = int(sys.argv[4]); rounds = int(sys.argv[5])
d = np.load('/work/shared/data/mnist/mnist_train.npz'); t = np.load('/work/shared/data/mnist/mnist_test.npz')
x, y = d['x'], d['y']; tx, ty = t['x'], t['y']
rng = np.random.default_rng(0)
perm = rng.permutation(len(y)); pub = perm[:1000]; pool = perm[1000:16000]
if norm == 'std':
    m, s = x[pub].mean(), x[pub].std(); f = lambda a: (a - m) / s
elif norm == 'half':
    f = lambda a: (a - 0.5) / 0.5
else:
    f = lambda a: a
X = torch.tensor(f(x[pool]))[:, None]; Y = torch.tensor(y[pool]).long()
TX = torch.tensor(f(tx))[:, None]; TY = torch.tensor(ty).long()
ds = datasets.Dataset.from_dict({"label": Y.numpy(), "idx": np.arange(len(Y))})
part = sys.argv[6] if len(sys.argv) > 6 else 'flwr'
MOM = float(sys.argv[7]) if len(sys.argv) > 7 else 0.0
LR = float(sys.argv[8]) if len(sys.argv) > 8 else 0.01
if part == 'flwr':
    p = DirichletPartitioner(num_partitions=20, partition_by="label", alpha=alpha, min_partition_size=10, seed=42); p.dataset = ds
    parts = [np.array(p.load_partition(i)['idx'])[:1500] for i in range(20)]
else:
    # FedGen generator: 1500 rows per label, Dirichlet, users >= 1500 rows get nothing more
    r = np.random.default_rng(42); yy = y[perm[1000:]]
    XX = x[perm[1000:]]
    while True:
        parts = [[] for _ in range(20)]; n = np.zeros(20)
        for l in r.permutation(10):
            idx = r.permutation(np.flatnonzero(yy == l))[:1500]
            pr = r.dirichlet([alpha]*20) * (n < 1500); pr = pr / pr.sum()
            for u, chunk in enumerate(np.split(idx, (np.cumsum(pr) * len(idx)).astype(int)[:-1])):
                parts[u] += chunk.tolist(); n[u] += len(chunk)
        if n.min() >= 10: break
    allidx = np.concatenate([np.array(p_, int) for p_ in parts])
    X = torch.tensor(f(XX))[:, None]; Y = torch.tensor(yy).long()
    parts = [np.array(p_, int) for p_ in parts]
    print('sizes', sorted(len(p_) for p_ in parts), sum(len(p_) for p_ in parts), flush=True)
def net():
    return nn.Sequential(nn.Conv2d(1,6,3,2,1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6,16,3,2,1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(784,32), nn.ReLU(), nn.Linear(32,10))
torch.manual_seed(seed)
g = net(); done = [0]*20
srng = np.random.default_rng(seed)
t0 = time.time()
for r in range(rounds):
    users = sorted(srng.choice(20, 10, replace=False))
    states, ns = [], []
    for u in users:
        m = copy.deepcopy(g); opt = torch.optim.SGD(m.parameters(), lr=LR * decay ** (r if part == 'fedgen' else done[u]), momentum=MOM); done[u] += 1
        idx = parts[u]; m.train(); steps = 0
        while steps < 20:
            for b in np.array_split(srng.permutation(idx), max(1, int(np.ceil(len(idx)/32)))):
                loss = nn.functional.cross_entropy(m(X[b]), Y[b]); opt.zero_grad(); loss.backward(); opt.step(); steps += 1
                if steps == 20: break
        states.append(m.state_dict()); ns.append(len(idx))
    w = np.array(ns, float) / sum(ns)
    new = {k: sum(wi * s[k].float() for wi, s in zip(w, states)).to(states[0][k].dtype) for k in states[0]}
    g.load_state_dict(new)
    if (r + 1) % 50 == 0:
        g.eval()
        with torch.no_grad(): acc = (g(TX).argmax(1) == TY).float().mean().item()
        print(f"alpha {alpha} norm {norm} decay {decay} round {r+1} acc {acc:.4f} {time.time()-t0:.0f}s", flush=True)
