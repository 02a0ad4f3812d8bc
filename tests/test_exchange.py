"""The exchange (in-process, Gatherv, streamed) and the server-to-client channel."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from osfed_hpc.algorithms import register
from osfed_hpc.algorithms.base import ServerMessage
from osfed_hpc.exchange import GATHER, IN_PROCESS, STREAM, InProcessExchange, choose_mode, pack_frame, unpack_frame
from osfed_hpc.payload import Payload
from tests.test_run_e2e import osfed, summary

MIB = 2**20


def test_mode_follows_payload_size_not_method():
    limit = 256 * MIB
    # a 1 % top-k of a ViT-L (304M values, 8 B per kept value) from 60 clients is ~1.4 GB: stream
    assert choose_mode(3, int(304e6 * 0.01 * 8), 60, limit) == STREAM
    # a 3 KB MNIST snapshot, or a 0.6 MB 224 px snapshot, from 60 clients: one Gatherv
    assert choose_mode(3, 3_584, 60, limit) == GATHER
    assert choose_mode(3, 666_116, 60, limit) == GATHER
    # FedAvg of the small CNN (1.2 MB) from 10 clients fits, of a ResNet-18 (46.8 MB) from 60 does not
    assert choose_mode(3, 1_201_816, 10, limit) == GATHER
    assert choose_mode(3, 46_758_048 + 300, 60, limit) == STREAM
    assert choose_mode(1, 10**12, 60, limit) == IN_PROCESS
    assert choose_mode(3, 3_584, 60, 0) == STREAM  # gather_limit_mb=0 forces streaming
    assert choose_mode(3, 2**30, 3, 2**40) == STREAM  # never past MPI's int counts


def _payload(i: int) -> Payload:
    return Payload(meta={"client": i}, arrays={"x": np.arange(i, dtype=np.float32)})


def test_frame_round_trip_and_buffer_reuse():
    payloads = {k: _payload(k) for k in (3, -1, 0, 7)}
    frame, buffer = pack_frame(payloads)
    assert frame.size == 8 + 16 * 4 + sum(p.packed_size() for p in payloads.values())
    parts = unpack_frame(frame)
    assert list(parts) == [3, -1, 0, 7]
    for key, data in parts.items():
        assert bytes(data) == payloads[key].pack()
    smaller, again = pack_frame({1: _payload(1)}, buffer)
    assert again is buffer and unpack_frame(smaller)[1].tobytes() == _payload(1).pack()
    assert unpack_frame(pack_frame({})[0]) == {}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_damaged_frames_raise_value_error_only(data):
    try:
        unpack_frame(np.frombuffer(data, dtype=np.uint8))
    except ValueError:
        pass


def test_in_process_exchange_hands_over_wire_bytes_in_client_order():
    exchange = InProcessExchange()
    for client in (2, 0, 1):
        exchange.send(client, _payload(client))
    exchange.end_of_work()
    received = list(exchange.receive([0, 1, 2]))
    assert [c for c, _ in received] == [0, 1, 2]
    assert all(data == _payload(c).pack() for c, data in received)


def test_downlink_counts_what_each_client_receives():
    common = Payload(arrays={"a": np.zeros(10, np.float32)})
    mine = Payload(arrays={"b": np.zeros(3, np.uint8)})
    message = ServerMessage(model=True, common=common, per_client={1: mine},
                            diagnostics=Payload(arrays={"d": np.zeros(1000, np.float64)}))
    assert message.downlink_bytes(0, 400) == 400 + common.packed_size()
    assert message.downlink_bytes(1, 400) == 400 + common.packed_size() + mine.packed_size()
    assert ServerMessage(model=False).downlink_bytes(5, 400) == 0


@pytest.fixture(scope="module", autouse=True)
def _channel_algorithm():
    register("channel_echo", "tests.channel_algorithm:ChannelEcho")


@pytest.mark.parametrize("np_, every_other", [(1, False), (3, False), (3, True)])
def test_message_channel_through_the_runner(digits_dir, tmp_path, np_, every_other):
    """The runner delivers common, per-client and diagnostic data to the right clients on every
    rank layout, keeps the replica when no model is sent, and counts downlink per client."""
    out = tmp_path / "run"
    result = osfed("run", f"data.path={digits_dir}", "data.clients=6", "data.alpha=1.0", "model.name=mlp",
                   "rounds=3", f"out={out}", "runtime.threads=1", "algorithm=channel_echo",
                   f"algorithm.model_every_other_round={str(every_other).lower()}", np=np_,
                   env={"OSFED_EXTRA_ALGORITHMS": "channel_echo=tests.channel_algorithm:ChannelEcho"})
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["rejected"] for r in records] == [0, 0, 0], result.stderr
    model_bytes = 4 * summary(out)["model_params"]
    common = Payload(arrays={"round": np.array([1], np.int64)}).packed_size()
    mine = Payload(arrays={"value": np.array([1], np.int64)}).packed_size()
    for r in records:
        sent_model = not (every_other and r["round"] % 2 == 0)
        expected = 6 * (common + (model_bytes if sent_model else 0)) + 3 * mine  # clients 0, 2, 4 get theirs
        assert r["downlink_bytes"] == expected
    assert all(calls == r["round"] for r in records for calls in r["client_stats"]["begin_calls"])
