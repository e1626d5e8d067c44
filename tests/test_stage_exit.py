"""Stage processes start and end fast: a command stage freezes the heap when done; evaluation imports no Lightning."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from pathlib import Path

from pipeline.common import StageError, run_stage, stage_parser

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent(
    """
    import gc, sys
    from pipeline.common import StageError, run_stage, stage_parser

    mode = sys.argv[1]

    def body(cfg, args):
        print("during", gc.get_freeze_count())
        if mode == "fail":
            raise StageError("the probe fails on purpose")

    sys.argv = sys.argv[:1]
    code = run_stage(body, stage_parser("probe"))
    print("after", gc.get_freeze_count(), "exit", code)
    """
)


def _probe(mode: str) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    words = done.stdout.split()
    return {
        "during": int(words[words.index("during") + 1]),
        "after": int(words[words.index("after") + 1]),
        "exit": int(words[words.index("exit") + 1]),
    }


def test_a_command_stage_freezes_the_heap_after_its_body_whatever_the_outcome():
    ok, failed = _probe("ok"), _probe("fail")
    assert ok["during"] == 0 and ok["after"] > 0 and ok["exit"] == 0
    assert failed["during"] == 0 and failed["after"] > 0 and failed["exit"] != 0


def test_an_in_process_stage_leaves_the_heap_alone():
    before = gc.get_freeze_count()

    def body(cfg, args):
        raise StageError("in-process probe")

    assert run_stage(body, stage_parser("probe"), []) != 0
    assert gc.get_freeze_count() == before


def test_evaluation_and_the_data_code_start_without_lightning():
    """Evaluation needs no Lightning: importing it (8 s of start-up on 2 cores) would cost every evaluate stage."""
    code = (
        "import sys\n"
        "import pipeline.evaluate, pipeline.datamodule, pipeline.console\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
