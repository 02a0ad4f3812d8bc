"""The README's worked example of a new method runs, as written, through the real runner."""
from __future__ import annotations

import json
import re

from tests.conftest import ROOT, small_run_overrides
from tests.test_run_e2e import osfed, summary


def test_readme_example_method_runs_on_one_and_three_ranks(digits_dir, tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## For developers: the method contract"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "signsgd.py").write_text(code)
    env = {"OSFED_EXTRA_ALGORITHMS": "signsgd=mypkg.signsgd:SignSGD",
           "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    shas = []
    for np_ in (1, 3):
        out = tmp_path / f"run{np_}"
        result = osfed("run", *small_run_overrides(digits_dir, out, "signsgd", rounds=2), np=np_, env=env)
        assert result.returncode == 0, result.stderr
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(r["rejected"] == 0 for r in records)
        shas.append(summary(out)["model_sha256"])
        n = summary(out)["model_params"]
        assert records[0]["uplink_bytes"] < 6 * (n // 8 + 512)  # ~1 bit per value, 6 clients
    assert shas[0] == shas[1]
