"""The whole fault suite (`python -m tests.faults`): every injected fault ends with the right exit code, no
traceback for a problem the user can fix, and the previous outputs intact. Slow: about 55 stage processes."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_fault_suite(tmp_path, capsys):
    from tests import faults

    code = faults.main(["--keep", str(tmp_path / "faults"), "--jobs", "2"])
    out = capsys.readouterr().out
    print(out)
    assert code == 0, out[-6000:]
    assert " 0 wrong" in out
