"""The systemd units, checked by systemd's own verifier.

`systemd-analyze verify` loads each unit as systemd would and reports bad
directives, missing dependencies and commands that do not exist. The
installed command is /usr/bin/toktra-agent, so the units are checked on a
copy that points at this checkout's.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness import AGENT, ROOT

UNITS = sorted((ROOT / "units").glob("*.service")) + sorted(
    (ROOT / "units").glob("*.target")
)


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    copies = []
    for unit in UNITS:
        text = unit.read_text().replace("/usr/bin/toktra-agent", AGENT[0])
        copy = tmp_path / unit.name
        copy.write_text(text)
        copies.append(str(copy))
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *copies],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_each_stage_has_a_unit_in_the_target() -> None:
    target = (ROOT / "units/toktra-stages.target").read_text()
    for stage in ("metrics", "shipper", "classifier", "collector"):
        unit = (ROOT / f"units/toktra-{stage}.service").read_text()
        assert f"toktra-{stage}.service" in target
        assert f"ExecStart=/usr/bin/toktra-agent stage {stage}" in unit
        assert "Type=notify" in unit and "WantedBy=toktra-stages.target" in unit
        if stage == "collector":
            assert "CapabilityBoundingSet=CAP_BPF CAP_PERFMON" in unit
        else:
            # The unprivileged stages: their own user and no capability.
            assert "User=toktra" in unit
            assert "\nCapabilityBoundingSet=\n" in unit
