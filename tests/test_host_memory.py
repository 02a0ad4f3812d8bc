"""runtime.host_memory: keep makes glibc reuse large freed blocks; results never change."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from osfed_hpc.host_memory import HOST_MEMORY_SETTINGS, _glibc, configure_host_memory

glibc = _glibc()
needs_glibc = pytest.mark.skipif(glibc is None or not hasattr(glibc, "mallinfo2"),
                                 reason="glibc >= 2.33 (mallinfo2) only")

#: in a fresh process (the setting cannot be undone): malloc 24 MiB, touch it, free it; report
#: how much of it glibc served with mmap and how much free heap top it keeps afterwards
ALLOCATOR_PROBE = """
import ctypes, json, sys
from osfed_hpc.host_memory import configure_host_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
applied = configure_host_memory(sys.argv[1])
size = 24 << 20
block = libc.malloc(size)
ctypes.memset(block, 1, size)
before = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(json.dumps({"applied": applied, "mmapped": before.hblkhd, "kept": after.keepcost, "size": size}))
"""

#: in a fresh process: one synthesis-objective evaluation (value and gradient) as bytes' hex
OBJECTIVE_PROBE = """
import hashlib, sys, torch
from osfed_hpc.flat import FlatModel
from osfed_hpc.host_memory import configure_host_memory
from osfed_hpc.models import build_model
from osfed_hpc.snapshot import MultiGrid, exact_numerics
from osfed_hpc.snapshot_search import Layout, SingleEvaluator, SynthesisConfig
configure_host_memory(sys.argv[1])
torch.set_num_threads(1)
generator = torch.Generator().manual_seed(0)
net = build_model("cnn", 1, 32, 10)
model = FlatModel(net)
layout = Layout((4, 1, 32, 32), (64, 10))
evaluate = SingleEvaluator(model, MultiGrid(4), layout, torch.randn(model.param_numel, generator=generator),
                           SynthesisConfig())
point = torch.randn(layout.snapshot_numel + layout.labels_numel, generator=generator)
with exact_numerics(net):
    loss, gradient = evaluate(point)
print(repr(loss), hashlib.sha256(gradient.numpy().tobytes()).hexdigest())
"""


def _probe(code: str, setting: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, setting], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


@needs_glibc
def test_keep_serves_large_blocks_from_the_heap_and_keeps_them_after_free():
    """The two mallopt settings take effect: under the process's defaults a 24 MiB block is mmapped
    (and munmapped on free, so the next one faults in again); kept, it comes from the heap and stays."""
    system = json.loads(_probe(ALLOCATOR_PROBE, "system"))
    keep = json.loads(_probe(ALLOCATOR_PROBE, "keep"))
    assert system["applied"] == "system allocator defaults"
    assert system["mmapped"] >= system["size"] and system["kept"] < system["size"]
    assert keep["applied"].startswith("freed blocks kept")
    assert keep["mmapped"] < keep["size"] and keep["kept"] >= keep["size"]


def test_host_memory_never_changes_a_result():
    """Where tensors live is not what they hold: the synthesis objective is bitwise the same."""
    assert _probe(OBJECTIVE_PROBE, "keep") == _probe(OBJECTIVE_PROBE, "system")


def test_unknown_setting_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"runtime.host_memory: 'always'.*keep, system"):
        configure_host_memory("always")
    assert HOST_MEMORY_SETTINGS == ("keep", "system")


def test_system_leaves_the_allocator_alone(monkeypatch):
    """system must not touch mallopt at all (it is the escape hatch if keeping memory hurts)."""
    calls = []
    if glibc is not None:
        monkeypatch.setattr("osfed_hpc.host_memory._glibc", lambda: calls.append(1) or glibc)
    assert configure_host_memory("system") == "system allocator defaults"
    assert calls == []


def test_mallopt_refusal_is_reported_not_raised(monkeypatch):
    class Refusing:
        @staticmethod
        def mallopt(param: int, value: int) -> int:
            return 0

    monkeypatch.setattr("osfed_hpc.host_memory._glibc", lambda: Refusing())
    assert configure_host_memory("keep") == "system allocator defaults (glibc refused mallopt)"
    monkeypatch.setattr("osfed_hpc.host_memory._glibc", lambda: None)
    assert configure_host_memory("keep") == "system allocator defaults (not glibc)"


def test_host_memory_may_change_on_resume_and_old_checkpoints_still_resume():
    """Not model-defining: the checkpoint digest ignores it, including its absence (checkpoints
    written before the key existed)."""
    from osfed_hpc.checkpoint import config_digest
    from osfed_hpc.config import load_config

    keep = load_config(None, ["runtime.host_memory=keep"]).to_dict()
    system = load_config(None, ["runtime.host_memory=system"]).to_dict()
    older = load_config(None, []).to_dict()
    del older["runtime"]["host_memory"]
    assert config_digest(keep) == config_digest(system) == config_digest(older)
