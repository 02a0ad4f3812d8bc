"""FedAvg is exact: one round with one full-batch plain-SGD step per client equals one step of
full-batch gradient descent on the union of the clients' data (weights = sample counts)."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from osfed_hpc.algorithms import ClientContext, Environment
from osfed_hpc.algorithms.fedavg import FedAvg
from osfed_hpc.config import TrainConfig
from osfed_hpc.flat import FlatModel
from osfed_hpc.models import build_model
from osfed_hpc.payload import Payload
from tests.helpers import TensorClientData


def _env(model, train):
    return Environment(model=model, train=train, num_classes=10, input_shape=(1, 8, 8),
                       device=torch.device("cpu"), seed=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_one_round_equals_full_batch_gradient_descent(channels_last):
    torch.manual_seed(0)
    sizes = [7, 19, 30]
    xs = [torch.randn(n, 1, 8, 8) for n in sizes]
    ys = [torch.randint(0, 10, (n,)) for n in sizes]
    train = replace(TrainConfig(), lr=0.1, momentum=0.0, local_steps=1, batch_size=max(sizes))
    worker = FlatModel(build_model("cnn", 1, 8, 10, seed=3), channels_last=channels_last)
    server = FlatModel(build_model("cnn", 1, 8, 10, seed=3), channels_last=channels_last)
    start = server.vector.clone()
    client_algo, server_algo = FedAvg(FedAvg.Options(), _env(worker, train)), FedAvg(FedAvg.Options(), _env(server, train))
    server_algo.server_begin(1)
    for cid, (x, y) in enumerate(zip(xs, ys)):
        worker.load_(start)
        ctx = ClientContext(cid, 1, TensorClientData(x, y), {}, torch.Generator().manual_seed(cid), 0)
        result = client_algo.client_update(ctx)
        assert result.stats["local_steps"] == 1
        server_algo.server_accumulate(cid, Payload.unpack(result.payload.pack()), float(len(y)))
    federated = server_algo.server_finish()

    reference = FlatModel(build_model("cnn", 1, 8, 10, seed=3), channels_last=channels_last)
    net = reference.model
    loss = F.cross_entropy(net(torch.cat(xs)), torch.cat(ys))  # mean over the union = sample-weighted
    loss.backward()
    expected = start[: reference.param_numel] - 0.1 * reference.flat_grad()
    torch.testing.assert_close(federated[: reference.param_numel], expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(federated, start)


def test_nan_update_is_rejected_with_client_and_round():
    model = FlatModel(build_model("mlp", 1, 8, 10))
    algo = FedAvg(FedAvg.Options(), _env(model, TrainConfig()))
    algo.server_begin(4)
    bad = np.zeros(model.numel, dtype=np.float32)
    bad[5] = np.nan
    payload = Payload(meta={"client": 2, "round": 4}, arrays={"update": bad})
    try:
        algo.server_accumulate(2, payload, 10.0)
    except ValueError as exc:
        assert "client 2, round 4" in str(exc) and "NaN" in str(exc)
    else:
        raise AssertionError("NaN update accepted")
    wrong = Payload(meta={}, arrays={"update": np.zeros(3, dtype=np.float32)})
    try:
        algo.server_accumulate(2, wrong, 10.0)
    except ValueError as exc:
        assert "expected float32" in str(exc)
    else:
        raise AssertionError("wrong-size update accepted")
    assert torch.equal(algo.server_finish(), model.vector)
