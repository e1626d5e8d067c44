"""The whole fault suite (`python -m tests.faults`): every injected fault ends with the right exit code, its message
(no traceback for a problem the user can fix), the previous outputs intact and the MLflow runs it should leave,
none RUNNING. Slow: about 100 stage processes (about 12 minutes on 2 busy cores)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_fault_suite(tmp_path, capsys):
    from tests import faults

    code = faults.main(["--keep", str(tmp_path / "faults"), "--jobs", "2"])
    out = capsys.readouterr().out
    print(out)
    assert code == 0, out[-6000:]
    total = len(faults.cases(faults.can_mount()))  # 4 fewer without root (no tmpfs mounts)
    assert total >= 60 and f"{total} cases: {total} right, 0 wrong" in out
