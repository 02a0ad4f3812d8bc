"""Single-shared-image FL: the patch bank (deterministic, normalised, option errors), the selection
(KMeans class balance per heuristic, confidence pruning, quota), logit clipping, exact wire bytes,
heterogeneous families (flat slices, per-family payloads and fold), and a bit-exact resume between
server-phase epochs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from osfed_hpc import patch_bank
from osfed_hpc.algorithms import ClientContext, Environment, ReceivedMessage, get_algorithm
from osfed_hpc.algorithms.singleimage import (
    FamilyModels,
    SingleImage,
    classifier_layer,
    clip_logits,
    confidence_prune,
    heuristic_counts,
    infer_input_shape,
    kmeans_quota,
    kmeans_select,
)
from osfed_hpc.config import TrainConfig, load_config
from osfed_hpc.flat import FlatModel
from osfed_hpc.models import build_model
from osfed_hpc.payload import Payload
from tests.helpers import TensorClientData

ROOT = Path(__file__).resolve().parents[1]
TRAIN = TrainConfig(local_steps=2, momentum=0.0, lr=0.05, batch_size=16)
MEAN_STD = ((0.5,), (0.25,))
#: small and fast: 96 patches of 8x8, every test shares the cached bank
FAST = {"num_patches": 96, "num_select": 24, "kmeans_clusters": 8, "confidence_threshold": 0.5, "server_steps": 6,
        "server_epochs": 3, "server_batch_size": 16}


def _instance(model: str = "cnn", num_clients: int = 4, **options) -> SingleImage:
    opts = SingleImage.Options(**{**FAST, **options})
    net = SingleImage.adapt_model(build_model(model, 1, 8, 10, seed=0), opts, 10, 0)
    env = Environment(model=FlatModel(net), train=TRAIN, num_classes=10, input_shape=(1, 8, 8),
                      device=torch.device("cpu"), seed=0, num_clients=num_clients, pixel_mean_std=MEAN_STD)
    return SingleImage(opts, env)


def _received(message, round_: int = 1) -> ReceivedMessage:
    return ReceivedMessage(round=round_, model=message.model, common=Payload.unpack(message.common.pack()),
                           diagnostics=Payload.unpack(message.diagnostics.pack()))


def _ctx(client: int, round_: int, received: ReceivedMessage) -> ClientContext:
    g = torch.Generator().manual_seed(100 + client)
    data = TensorClientData(torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g))
    return ClientContext(client_id=client, round=round_, data=data, state={},
                         generator=torch.Generator().manual_seed(client), seed=0, message=received)


def _round(server: SingleImage, worker: SingleImage, clients: list[int], round_: int = 1) -> dict[int, Payload]:
    """One round: selection, every client's update from the server's W_t, the fold (not the phase)."""
    received = _received(server.server_message(round_), round_)
    worker.client_begin_round(received)
    start = server.env.model.vector.clone()
    payloads = {}
    for client in clients:
        worker.env.model.load_(start)
        payloads[client] = Payload.unpack(worker.client_update(_ctx(client, round_, received)).payload.pack())
    server.server_begin(round_)
    for client, payload in payloads.items():
        server.server_accumulate(client, payload, 32.0)
    server.env.model.load_(server.server_finish())
    return payloads


def _aligned(n: int) -> int:
    return (n + 7) // 8 * 8


# the patch bank ------------------------------------------------------------------------------------
def test_patch_bank_is_deterministic_identical_for_two_builds_and_keyed_by_seed():
    patch_bank._cache.clear()
    first = patch_bank.build_patch_bank(None, 40, 1, 8, seed=3)
    patch_bank._cache.clear()  # a second, independent build (another rank)
    second = patch_bank.build_patch_bank(None, 40, 1, 8, seed=3)
    assert first is not second and torch.equal(first, second)
    assert patch_bank.fingerprint(first) == patch_bank.fingerprint(second)
    assert first.shape == (40, 1, 8, 8) and first.dtype == torch.uint8
    assert not torch.equal(first, patch_bank.build_patch_bank(None, 40, 1, 8, seed=4))
    rgb = patch_bank.build_patch_bank(None, 12, 3, 16, seed=3)
    assert rgb.shape == (12, 3, 16, 16)
    # the patches differ from each other (augmented crops, not one picture repeated)
    assert len({bytes(p.numpy()) for p in first}) == 40
    assert patch_bank.build_patch_bank(None, 40, 1, 8, seed=3) is patch_bank.build_patch_bank(None, 40, 1, 8, seed=3)


def test_bank_inputs_are_normalised_like_the_dataset():
    algo = _instance()
    bank = algo.bank
    assert bank.shape == (96, 1, 8, 8) and bank.dtype == torch.uint8
    inputs = algo.patches()
    assert inputs.dtype == torch.float32 and inputs.shape == (96, 1, 8, 8)
    torch.testing.assert_close(inputs, (bank.float() / 255 - 0.5) / 0.25)
    pixels = inputs * 0.25 + 0.5  # back to [0, 1]: 8-bit levels
    assert float(pixels.min()) >= -1e-6 and float(pixels.max()) <= 1 + 1e-6
    torch.testing.assert_close(pixels * 255, (pixels * 255).round(), atol=1e-3, rtol=0)
    torch.testing.assert_close(algo.patches(np.array([5, 2], np.int32)), inputs[[5, 2]])


def test_a_user_image_file_is_read_and_a_bad_one_names_the_option(tmp_path):
    from PIL import Image

    path = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(path)
    bank = patch_bank.build_patch_bank(str(path), 10, 3, 8, seed=0)
    assert bank.shape == (10, 3, 8, 8)
    with pytest.raises(ValueError, match=r"algorithm\.image.*no such file"):
        patch_bank.build_patch_bank(str(tmp_path / "missing.jpg"), 10, 1, 8, seed=0)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ValueError, match=r"algorithm\.image.*cannot read"):
        patch_bank.build_patch_bank(str(text), 10, 1, 8, seed=0)
    with pytest.raises(ValueError, match=r"algorithm\.image"):
        _instance(image=str(tmp_path / "missing.jpg"))


# selection -----------------------------------------------------------------------------------------
def _synthetic(classes: int = 5, per_class: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    predicted = np.repeat(np.arange(classes), per_class)
    rng.shuffle(predicted)
    distance = rng.permutation(len(predicted)).astype(np.float64)  # distinct
    confidence = rng.permutation(len(predicted)).astype(np.float64) / len(predicted)
    return predicted, distance, confidence


@pytest.mark.parametrize("heuristic, easy, hard", [("hard", 0, 6), ("easy", 6, 0), ("mixed", 3, 3)])
def test_kmeans_selection_is_class_balanced_by_the_heuristic(heuristic, easy, hard):
    predicted, distance, _ = _synthetic()
    mask = kmeans_select(predicted, distance, quota=30, heuristic=heuristic, balance=1.0)
    assert mask.sum() == 30
    for c in range(5):
        members = np.flatnonzero(predicted == c)
        ranked = members[np.argsort(distance[members])]  # closest first
        chosen = set(np.flatnonzero(mask & (predicted == c)).tolist())
        # balance 1: the whole quota is per class, floor(30 / 5) = 6 each, nothing left to fill
        assert chosen == set(ranked[:easy].tolist()) | set(ranked[len(ranked) - hard:].tolist())


def test_kmeans_selection_fills_the_rest_globally_and_caps_at_the_bank():
    predicted, distance, _ = _synthetic()
    mask = kmeans_select(predicted, distance, quota=40, heuristic="hard", balance=0.5)
    assert mask.sum() == 40
    per_class = math.floor(40 / 5 * 0.5)  # 4 per class first
    for c in range(5):
        members = np.flatnonzero(predicted == c)
        assert mask[members].sum() >= per_class
        farthest = members[np.argsort(-distance[members])][:per_class]
        assert mask[farthest].all()
    # the 20 filled ones are the farthest of all that were left
    first = np.zeros_like(mask)
    for c in range(5):
        members = np.flatnonzero(predicted == c)
        first[members[np.argsort(-distance[members])][:per_class]] = True
    rest = np.flatnonzero(~first)
    assert set(np.flatnonzero(mask & ~first).tolist()) == set(rest[np.argsort(-distance[rest])][:20].tolist())
    # a class smaller than its share gives all it has; a quota >= N keeps everything
    small = np.array([0] * 2 + [1] * 30)
    mask = kmeans_select(small, np.arange(32.0), quota=20, heuristic="easy", balance=1.0)
    assert mask.sum() == 20 and mask[:2].all()
    assert kmeans_select(predicted, distance, quota=500, heuristic="hard", balance=1.0).all()


def test_confidence_pruning_drops_the_most_confident_fraction_per_class():
    predicted, _, confidence = _synthetic()
    mask = np.ones(len(predicted), dtype=bool)
    mask[::7] = False
    kept = confidence_prune(mask, predicted, confidence, threshold=0.3)
    assert not (kept & ~mask).any()
    for c in range(5):
        members = np.flatnonzero(mask & (predicted == c))
        dropped = members[~kept[members]]
        assert len(dropped) == math.floor(0.3 * len(members))
        assert confidence[dropped].min() > confidence[members[kept[members]]].max()
    bottom = confidence_prune(mask, predicted, confidence, threshold=0.3, strategy="bottom")
    for c in range(5):
        members = np.flatnonzero(mask & (predicted == c))
        assert confidence[members[~bottom[members]]].max() < confidence[members[bottom[members]]].min()
    assert confidence_prune(mask, predicted, confidence, threshold=0.0).tolist() == mask.tolist()


def test_quota_inflation_and_heuristic_counts_read_options_as_decimals():
    assert kmeans_quota(500, 0.9, pruning=True) == 5000  # the example script: 500 / (1 - 0.9)
    assert kmeans_quota(2250, 0.1, pruning=True) == 2500
    assert kmeans_quota(500, 0.5, pruning=True) == 1000
    assert kmeans_quota(500, 0.9, pruning=False) == 500 and kmeans_quota(500, 0.0, pruning=True) == 500
    assert heuristic_counts(7, "mixed", 0.5) == (4, 3)  # the rounding remainder goes to easy
    assert heuristic_counts(7, "easy") == (7, 0) and heuristic_counts(7, "hard") == (0, 7)
    assert heuristic_counts(10, "mixed", 0.3) == (3, 7)


def test_server_selection_is_deterministic_and_meets_the_counts():
    a, b = _instance(), _instance()
    indices, stats = a.select(1)
    assert indices.dtype == np.int32 and np.all(np.diff(indices) > 0)
    assert indices.min() >= 0 and indices.max() < 96
    assert np.array_equal(indices, b.select(1)[0])
    # quota 24 / (1 - 0.5) = 48 by KMeans, then floor(half) of each predicted class pruned: 24 + (odd classes) / 2
    assert 24 <= len(indices) <= 24 + 5 and stats["selected"] == len(indices)
    everything = _instance(kmeans=False, confidence_threshold=0.0)
    assert len(everything.select(1)[0]) == 96


# logit clipping ------------------------------------------------------------------------------------
def test_logit_clipping_rescales_norms():
    logits = torch.tensor([[3.0, 4.0], [0.3, 0.0], [0.1, 0.1], [30.0, 40.0]])
    out = clip_logits(logits, 2.5)  # reference rule: norm >= 1/2.5 = 0.4 -> norm 2.5
    norms = torch.linalg.vector_norm(out, dim=1)
    torch.testing.assert_close(norms[[0, 3]], torch.tensor([2.5, 2.5]))
    torch.testing.assert_close(out[1:3], logits[1:3])  # below 0.4: unchanged
    torch.testing.assert_close(out[0] / norms[0], logits[0] / 5.0)  # direction kept
    out = clip_logits(logits, 2.5, rule="norm")  # ours: norm > 2.5 -> 2.5
    torch.testing.assert_close(torch.linalg.vector_norm(out, dim=1)[[0, 3]], torch.tensor([2.5, 2.5]))
    torch.testing.assert_close(out[1:3], logits[1:3])
    small = torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(clip_logits(small, 2.5, rule="norm"), small)
    torch.testing.assert_close(clip_logits(small, 2.5), small / math.sqrt(2) * 2.5)
    assert clip_logits(logits, None) is logits and clip_logits(logits, 0.0) is logits


# bytes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("families", [None, ["cnn", "mlp"]])
def test_payload_and_downlink_bytes_follow_the_formula(families):
    server, worker = _instance(families=families), _instance(families=families)
    message = server.server_message(1)
    n = len(message.common.arrays["indices"])
    received = _received(message)
    worker.client_begin_round(received)
    d = server.env.model.numel
    for client in (0, 1, 2):
        family = client % (2 if families else 1)
        d_f = server.family_numel[family]
        assert d_f == (d if not families else sum(p.numel() for p in server.nets[family].parameters()))
        worker.env.model.load_(server.env.model.vector)
        payload = worker.client_update(_ctx(client, 1, received)).payload
        assert payload.meta == {"algorithm": "singleimage", "round": 1, "client": client, "family": family}
        assert payload.arrays["update"].shape == (d_f,) and payload.arrays["logits"].shape == (n, 10)
        header = json.dumps({"meta": payload.meta, "arrays": [["update", "float32", [d_f], 0],
                                                              ["logits", "float32", [n, 10], _aligned(4 * d_f)]]},
                            separators=(",", ":")).encode()
        assert payload.packed_size() == _aligned(12 + len(header)) + _aligned(4 * d_f) + 4 * n * 10
        assert payload.packed_size() == server.packed_size(1, client, n) <= server.payload_size_hint()
        # downlink: the client's family (4 bytes per value) + the indices (int32) with a small header
        common = json.dumps({"meta": {"algorithm": "singleimage", "round": 1},
                             "arrays": [["indices", "int32", [n], 0]]}, separators=(",", ":")).encode()
        model_bytes = server.client_model_bytes(client, 4 * d)
        assert model_bytes == 4 * d_f
        assert message.downlink_bytes(client, model_bytes) == 4 * d_f + _aligned(12 + len(common)) + 4 * n
    assert message.diagnostics.meta == {"bank_sha256": server.bank_sha256}  # checked by clients, never counted


# heterogeneous families ----------------------------------------------------------------------------
def test_family_wrapper_slices_and_payloads_hold_only_the_clients_family():
    server, worker = _instance(families=["cnn", "mlp"]), _instance(families=["cnn", "mlp"])
    net = server.env.model.model
    assert isinstance(net, FamilyModels) and len(server.nets) == 2
    assert infer_input_shape(build_model("cnn", 1, 8, 10)) == (1, 8)
    assert infer_input_shape(build_model("mlp", 1, 28, 10)) == (1, 28)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(net(x), net.families[0](x))  # the runner evaluates family 0
    cnn = sum(p.numel() for p in net.families[0].parameters())
    mlp = sum(p.numel() for p in net.families[1].parameters())
    assert server.ranges == [[(0, cnn)], [(cnn, cnn + mlp)]] and server.env.model.numel == cnn + mlp
    vector = server.env.model.vector
    torch.testing.assert_close(server.family_values(vector, 1), torch.cat([p.detach().reshape(-1) for p in net.families[1].parameters()]))
    assert classifier_layer(net.families[0]) is net.families[0].classifier[3]
    assert classifier_layer(net.families[1]) is net.families[1].net[5]

    received = _received(server.server_message(1))
    worker.client_begin_round(received)
    start = server.env.model.vector.clone()
    worker.env.model.load_(start)
    payload = worker.client_update(_ctx(1, 1, received)).payload  # client 1 -> family 1 (mlp)
    after = worker.env.model.vector
    assert torch.equal(after[:cnn], start[:cnn])  # family 0 untouched by a family-1 client
    torch.testing.assert_close(torch.from_numpy(payload.arrays["update"]), after[cnn:] - start[cnn:])

    # the fold averages each family among its own clients
    payloads = {}
    for client in (0, 1, 2, 3):
        worker.env.model.load_(start)
        payloads[client] = Payload.unpack(worker.client_update(_ctx(client, 1, received)).payload.pack())
    server.server_begin(1)
    for client, p in payloads.items():
        server.server_accumulate(client, p, 32.0)
    new = server.server_finish()
    for family, clients in ((0, (0, 2)), (1, (1, 3))):
        mean = sum(torch.from_numpy(payloads[c].arrays["update"].copy()) for c in clients) / 2
        torch.testing.assert_close(server.family_values(new, family), server.family_values(start, family) + mean)


def test_families_must_start_with_the_runs_model_and_name_known_models():
    with pytest.raises(ValueError, match=r"algorithm\.families\[0\]"):
        SingleImage.adapt_model(build_model("mlp", 1, 8, 10), SingleImage.Options(families=["cnn", "mlp"]), 10, 0)
    with pytest.raises(ValueError, match=r"algorithm\.families"):
        SingleImage.Options(families=["cnn", "nope"]).validate()
    with pytest.raises(ValueError, match=r"algorithm\.families"):
        SingleImage.Options(families=[]).validate()


# the server phase and its resume ---------------------------------------------------------------------
@pytest.mark.parametrize("families", [None, ["cnn", "mlp"]])
def test_resume_between_phase_epochs_is_bit_exact(families):
    server, worker = _instance(families=families), _instance(families=families)
    _round(server, worker, [0, 1, 2])
    folded = server.env.model.vector.clone()
    before = {k: v.copy() for k, v in server.server_state().items()}  # a stop before epoch 1: teacher, no Adam yet
    assert set(before) == {"phase_round", "phase_indices", "phase_teacher"}
    assert server.server_phase_epochs(1) == 3
    assert [server.epoch_steps(e) for e in (1, 2, 3)] == [2, 2, 2]
    server.env.evaluate = lambda module: (0.25 if module is server.nets[-1] else -1.0, 0.0)  # the runner's test-split eval
    stats = [server.server_phase_epoch(1, e) for e in (1, 2, 3)]
    assert all(s["steps"] == 2 and math.isfinite(s["loss"]) for s in stats)
    if families:  # every extra family's loss each epoch, its test accuracy after the last
        assert "family1_loss" in stats[0] and "family1_accuracy" not in stats[1]
        assert stats[-1]["family1_accuracy"] == 0.25
    straight = server.env.model.vector.clone()
    assert not torch.equal(straight, folded)

    # the same phase in fresh instances (other processes): resumed before epoch 1, then again after epoch 1
    first = _instance(families=families)
    first.load_server_state(before)
    first.env.model.load_(folded)
    first.server_phase_epoch(1, 1)
    state = {k: v.copy() for k, v in first.server_state().items()}
    resumed = _instance(families=families)
    resumed.load_server_state(state)
    resumed.env.model.load_(first.env.model.vector)
    resumed.server_phase_epoch(1, 2)
    resumed.server_phase_epoch(1, 3)
    assert torch.equal(resumed.env.model.vector, straight)
    resumed.server_phase_end(1)
    assert resumed.server_state() == {}  # nothing is checkpointed outside a phase
    resumed.load_server_state({})


def test_server_state_is_checked_when_loaded():
    server, worker = _instance(), _instance()
    _round(server, worker, [0, 1])
    server.server_phase_epoch(1, 1)
    state = server.server_state()
    with pytest.raises(ValueError, match="phase_teacher"):
        _instance().load_server_state({**state, "phase_teacher": state["phase_teacher"][:-1]})
    with pytest.raises(ValueError, match="unexpected"):
        _instance().load_server_state({**state, "other": np.zeros(1)})
    with pytest.raises(ValueError, match="adam0_v"):
        _instance().load_server_state({k: v for k, v in state.items() if k != "adam0_v"})


def test_damaged_payloads_are_refused_and_leave_no_trace():
    server, worker = _instance(), _instance()
    received = _received(server.server_message(1))
    worker.client_begin_round(received)
    worker.env.model.load_(server.env.model.vector)
    good = worker.client_update(_ctx(1, 1, received)).payload
    logits, update = good.arrays["logits"], good.arrays["update"]
    bad = {
        "nan logits": Payload(good.meta, {"update": update, "logits": np.full_like(logits, np.nan)}),
        "unclipped logits": Payload(good.meta, {"update": update, "logits": logits * 100}),
        "wrong family": Payload({**good.meta, "family": 1}, good.arrays),
        "fewer logits": Payload(good.meta, {"update": update, "logits": logits[:-1]}),
        "nan update": Payload(good.meta, {"update": np.full_like(update, np.nan), "logits": logits}),
    }
    for label, payload in bad.items():
        server.server_begin(1)
        with pytest.raises(ValueError, match="client 1, round 1"):
            server.server_accumulate(1, Payload.unpack(payload.pack()), 10.0)
        assert server._logit_weight == 0.0, label
    server.server_begin(1)
    server.server_accumulate(1, Payload.unpack(good.pack()), 10.0)
    new = server.server_finish()
    torch.testing.assert_close(new, server.env.model.vector + torch.from_numpy(update))
    torch.testing.assert_close(server._teacher, torch.from_numpy(logits))


def test_a_client_refuses_a_bank_that_differs_from_the_servers():
    server, worker = _instance(), _instance()
    message = server.server_message(1)
    message.diagnostics = Payload(meta={"bank_sha256": "0" * 64})
    with pytest.raises(RuntimeError, match="patch bank"):
        worker.client_begin_round(_received(message))


# options and config ----------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    {"num_patches": 0}, {"num_select": 1.5}, {"kmeans": "yes"}, {"kmeans_clusters": 0}, {"heuristic": "medium"},
    {"balance": 1.5}, {"easy_fraction": -0.1}, {"confidence_threshold": 1.0}, {"confidence_strategy": "random"},
    {"clip_factor": -1.0}, {"clip_rule": "soft"}, {"client_optimizer": "lbfgs"}, {"client_lr": 0.0},
    {"server_steps": -1}, {"server_epochs": 0}, {"server_epochs": 7, "server_steps": 6}, {"server_lr": 0},
    {"server_batch_size": 0}, {"temperature": 0}, {"warm_start": 1}, {"weighting": "median"}, {"image": ""},
])
def test_invalid_options_name_the_key(options):
    key = next(iter(k for k in options if k != "server_steps") if len(options) > 1 else iter(options))
    with pytest.raises(ValueError, match=f"algorithm.{key}"):
        SingleImage.Options(**options).validate()


def test_shipped_config_resolves_and_families_override():
    config = load_config(ROOT / "configs" / "mnist5k_singleimage.yaml", [])
    assert get_algorithm("singleimage") is SingleImage
    options = config.algorithm_options()
    assert options.num_patches == 2000 and options.families is None
    hetero = load_config(ROOT / "configs" / "mnist5k_singleimage.yaml", ["algorithm.families=[cnn,mlp]"])
    assert hetero.algorithm_options().families == ["cnn", "mlp"]
