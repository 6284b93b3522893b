"""Optional dependencies: a missing extra is one line naming what to install, before any work starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fastvpd.config import UserError
from fastvpd.extras import probe, require

ROOT = Path(__file__).resolve().parents[1]


def test_require_names_the_extra_and_probe_returns_none() -> None:
    assert probe("fastvpd_no_such_module") is None
    assert require("json").dumps([1]) == "[1]"
    with pytest.raises(UserError, match=r"for the chart: install it with pip install 'fastvpd\[demo\]'"):
        require("fastvpd_no_such_module", "demo", "the chart")
    with pytest.raises(UserError, match=r"fastvpd\[export\]"):  # the extra looked up by module name
        require("safetensors.fastvpd_no_such_submodule")


@pytest.mark.parametrize(
    ("blocked", "entry", "extra"),
    [
        ("sklearn", "from fastvpd.demo import main; main(['--out', OUT])", "demo"),
        ("matplotlib", "from fastvpd.demo import main; main(['--out', OUT])", "demo"),
        ("sklearn", "from fastvpd.datasets.digits import main; main([OUT])", "demo"),
    ],
)
def test_entry_point_without_its_extra_is_one_line_exit_2(
    blocked: str, entry: str, extra: str, tmp_path: Path
) -> None:
    code = f"import sys; sys.modules[{blocked!r}] = None; OUT = {str(tmp_path / 'o')!r}; {entry}"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr[-2000:]
    assert f"pip install 'fastvpd[{extra}]'" in err[0] and blocked in err[0]
    assert not (tmp_path / "o").exists()  # refused before any work
