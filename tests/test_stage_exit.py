"""Stage processes start and end fast: a command stage freezes the heap when done; evaluation, comparison and the
benchmark import no Lightning."""

from __future__ import annotations

import ast
import gc
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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


def _pipeline_imports(name: str, seen: set[str]) -> set[str]:
    """`name` and every `pipeline`/`models` module it imports, at the top or inside a function (lazily), closed."""
    if name in seen:
        return seen
    seen.add(name)
    path = ROOT / (name.replace(".", "/") + ".py")
    if not path.exists():
        path = ROOT / name.replace(".", "/") / "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("pipeline", "models"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] in ("pipeline", "models")]
        else:
            continue
        for found in names:
            file = ROOT / (found.replace(".", "/") + ".py")
            if file.exists() or (ROOT / found.replace(".", "/") / "__init__.py").exists():
                _pipeline_imports(found, seen)
    return seen


def test_evaluation_comparison_and_benchmark_stages_start_without_lightning():
    """Evaluation, comparison and the benchmark need no Lightning: importing it (8-10 s of start-up on 2 cores) would
    cost every such stage. Every module these stages can load, also lazily inside a function, is imported."""
    modules: set[str] = set()
    for stage in ("pipeline.evaluate", "pipeline.compare", "pipeline.benchmark"):
        _pipeline_imports(stage, modules)
    assert {
        "pipeline.tracking.runs",
        "pipeline.data.datamodule",
        "pipeline.tracking.logged",
    } <= modules  # the scan follows
    code = (
        "import importlib, sys\n"
        f"for name in {sorted(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", sorted(modules)


def test_scoring_classification_and_exact_match_imports_no_torchmetrics():
    """Importing torchmetrics costs an evaluation stage about 6 s (it imports transformers and scipy.signal): the
    default tasks' metrics (accuracy, exact match, F1) and the confusion matrix are counted without it."""
    code = (
        "import sys\n"
        "from pipeline.evaluate import confusion_matrix, confusion_rows\n"
        "from pipeline.data.task_metrics import example_scores, score\n"
        "score('accuracy', ['1', '2'], ['1', '3']); score('exact_match', ['a b', 'c'], ['a b', 'd'])\n"
        "example_scores('exact_match', ['a'], ['a']); confusion_matrix(['1'], confusion_rows(['1'], ['1'], ['1']))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchmetrics'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--model", "t5", "--seed", "0", "--params", "nothere.yaml"], 2, "file not found"),
        (["--model", "nope", "--seed", "0"], 1, "--model nope: not a variant"),
    ],
)
def test_training_stages_report_bad_params_before_importing_the_training_code(stage, args, code, message):
    """A config error or an unknown variant is reported before Lightning and MLflow load (with torch, about 15 s)."""
    probe = (
        "import sys\n"
        f"sys.argv = ['{stage}', *{args!r}]\n"
        f"from pipeline.{stage} import main\n"
        "code = main()\n"
        "print('exit', code, sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'mlflow'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == f"exit {code} []", done.stdout + done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
