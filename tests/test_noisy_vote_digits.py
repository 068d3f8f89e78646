"""PATE's noisy vote with real teachers: 10 locally trained digits students label the public set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fedkd.aggregation import NoisyVote, TeacherMeta, majority_vote
from fedkd.client.state import new_optimizer
from fedkd.training import predict_logits, revisit, round_generator
from fedkd.data import load_client, load_public
from fedkd.models import build_model
from fedkd.server import compose_config, prepare_run


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Logits of 10 non-IID local models on the public rows, and the rows' true labels."""
    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("cache")
    run = prepare_run(compose_config([f"simulation.cache_dir={cache}"]))
    s, info = run.settings, run.data
    public = torch.from_numpy(load_public(info.cache_dir)).float()
    raw = load_digits()  # true labels, for this check only: fedkd never stores public labels
    label_of = {(x / 16).astype(np.float32).tobytes(): y
                for x, y in zip(raw.data.reshape(-1, 1, 8, 8), raw.target)}
    truth = np.array([label_of[row.tobytes()] for row in public.numpy()])
    logits = []
    for pid in range(10):
        x, y = load_client(info.cache_dir, pid)
        torch.manual_seed(pid)
        model = build_model(s.arch_of(pid)[1], tuple(info.input_shape), info.num_classes)
        revisit(model, new_optimizer(s, model), torch.from_numpy(x).float(),
                torch.from_numpy(y).long(), epochs=15, batch_size=32, gen=round_generator(0, pid, 1))
        logits.append(predict_logits(model, public))
    return np.stack(logits), truth


def test_noisy_vote_falls_to_chance_as_sigma_outgrows_the_teachers(teachers):
    logits, truth = teachers
    meta = TeacherMeta(num_examples=np.ones(10), partition_ids=np.arange(10))
    agreement, epsilon = {}, {}
    for sigma in (1.0, 5.0, 100.0):
        vote = NoisyVote(sigma=sigma)
        agreement[sigma] = float((vote(logits, meta).argmax(1) == truth).mean())
        epsilon[sigma] = vote.report()["epsilon"]
    clean = float((majority_vote(logits, meta).argmax(1) == truth).mean())
    assert clean > 0.8 and agreement[1.0] > 0.75  # 10 teachers, margin up to 10: sigma 1 keeps it
    assert agreement[1.0] > agreement[5.0] > agreement[100.0]
    assert abs(agreement[100.0] - 0.1) < 0.05  # sigma >> K: about chance (10 classes)
    assert epsilon[1.0] > epsilon[5.0] > epsilon[100.0]
