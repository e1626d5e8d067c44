"""Every command the README, docs/ and the generated report show works as written, in a fresh clone.

The slow test clones this repository, commits tiny params (one seed, a few steps), then runs the documented
commands in reading order (README first): `dvc repro`, the baseline commit the README asks for, `dvc exp run -S`
on model keys, `dvc exp show`, `dvc metrics diff`, `dvc params diff`, `dvc plots show` (opened in headless
Chromium, offline), `mlflow ui`, the Python snippet, and finally the commands of `reports/comparison.md`.
Each distinct command runs once, at its first appearance; the few that cannot run in a test are listed with the
reason in `tests/docs_commands.py` (`NOT_RUN`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.docs_commands import NOT_RUN, REPORT, Command, documented_commands, extract
from tests.train_project import LENGTHS, MODELS

ROOT = Path(__file__).resolve().parents[1]

# Tiny params: the whole documented session (three `dvc repro`-sized runs) in a few minutes on 2 cores.
TINY = {
    "seeds": [0],
    "data.max_documents": 400,
    "tokenizer.vocab_size": 600,
    "tokenizer.num_sentinels": 20,
    "tokenizer.input_sentence_size": 20000,
    **{f"models.{name}": model for name, model in MODELS.items()},
    "pretrain": {
        "input_length": 32,
        "batch_size": 4,
        "max_steps": 4,
        "log_every_n_steps": 2,
        "val_every_n_steps": 2,
        "val_batches": 1,
        "checkpoint_every_n_steps": 2,
    },
    "pretrain.optimizer.warmup_steps": 1,
    "finetune": {
        "input_length": 64,
        "target_length": 16,
        "batch_size": 4,
        "max_steps": 4,
        "log_every_n_steps": 2,
        "val_every_n_steps": 2,
        "val_batches": 1,
        "checkpoint_every_n_steps": 2,
    },
    "finetune.optimizer.warmup_steps": 1,
    "evaluate": {"batch_size": 8, "max_loss_batches": 2, "max_examples_per_task": 8, "num_beams": [1, 2]},
    "lengths": LENGTHS,
    "evaluate.max_new_tokens": 8,
    "evaluate.num_samples": 2,
    "benchmark": {"seq_lengths": [64, 128], "depths": [1, 2], "depth_seq_length": 64, "repeats": 1},
    "benchmark.time_budget_s": 20.0,
    "trainer.progress_bar": False,
    "trainer.divergence.patience_steps": 0,  # 4-step runs: no room for the stuck-loss guard (pipeline/config/)
    "mlflow.system_metrics": False,
}


def tiny_params(params: dict) -> dict:
    """`params` with the TINY values merged in (dicts merge into the section, other values replace)."""
    for dotted, value in TINY.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        if isinstance(value, dict) and isinstance(node.get(leaf), dict):
            node[leaf].update(value)
        else:
            node[leaf] = value
    return params


# ------------------------------------------------------------------------------------------------ fast


def test_extraction_reads_blocks_continuations_python_and_inline_commands():
    text = (
        "Run `dvc repro` first.\n\n"
        "```bash\n"
        "dvc exp run -S models.reformer.n_hashes=8   # more rounds\n"
        "# a comment line\n"
        "dvc exp show --only-changed \\\n"
        "    --drop 'x'\n"
        "```\n\n"
        "```yaml\nseed: 1\n```\n\n"
        "```python\nprint('hi')\n```\n"
        "Then `dvc exp apply <name>`.\n"
    )
    commands = extract(text, "X.md")
    assert [(c.kind, c.bare, c.line) for c in commands] == [
        ("shell", "dvc repro", 1),
        ("shell", "dvc exp run -S models.reformer.n_hashes=8", 4),
        ("shell", "dvc exp show --only-changed --drop 'x'", 6),
        ("python", "print('hi')", 15),
        ("shell", "dvc exp apply <name>", 17),
    ]
    assert commands[-1].runnable.startswith("dvc exp apply $(dvc exp ls")


def test_docs_show_the_experiment_workflow_and_every_skip_is_still_documented():
    commands = documented_commands(ROOT)
    shown = {c.bare for c in commands}
    for needed in ("dvc repro", "dvc exp show", "dvc metrics diff", "dvc params diff", "dvc plots show"):
        assert any(s == needed or s.startswith(needed + " ") for s in shown), needed
    assert any(re.match(r"dvc exp run -S models\.\w+\.\w+=", s) for s in shown)  # a model key, as the issue asks
    assert any("git commit" in s and "dvc.lock" in s for s in shown)  # the baseline `dvc metrics diff` compares with
    stale = set(NOT_RUN) - shown
    assert not stale, f"NOT_RUN lists commands the docs no longer show: {stale}"


# ------------------------------------------------------------------------------------------------ slow


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        DVC_IGNORE_ISATTY="1",
        GIT_AUTHOR_NAME="docs test",
        GIT_AUTHOR_EMAIL="docs@test",
        GIT_COMMITTER_NAME="docs test",
        GIT_COMMITTER_EMAIL="docs@test",
        PYTHONWARNINGS="ignore",
        HOME=str(tmp / "home"),
    )
    (tmp / "home").mkdir(exist_ok=True)
    return env


def _git(clone: Path, *args: str, env: dict[str, str]) -> None:
    subprocess.run(["git", *args], cwd=clone, env=env, check=True, capture_output=True, text=True)


def _serve_briefly(command: str, clone: Path, env: dict[str, str], timeout_s: float = 120) -> str:
    """Start a documented `mlflow ui`/`mlflow server` command, wait until it answers, stop it."""
    port = re.search(r"--port\s+(\d+)", command)
    url = f"http://127.0.0.1:{port.group(1) if port else 5000}/health"
    proc = subprocess.Popen(
        ["bash", "-c", f"exec {command}"], cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    return answer.read().decode()
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(1)
        raise AssertionError(f"`{command}` did not answer on {url}: {proc.communicate(timeout=10)[0][-2000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _run(command: Command, clone: Path, env: dict[str, str]) -> str:
    if command.kind == "python":
        argv = [sys.executable, "-c", command.runnable]
    else:
        argv = ["bash", "-c", "set -o pipefail; " + command.runnable]
    result = subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True, timeout=1500)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{command} failed (exit {result.returncode}):\n{output[-4000:]}"
    assert "Traceback (most recent call last)" not in output, f"{command} printed a traceback:\n{output[-4000:]}"
    return output


@pytest.mark.slow
@pytest.mark.timeout(3000)  # about thirty stage runs and four servers: 25 minutes on one busy core (1500 s default)
def test_every_documented_command_works_in_a_fresh_clone(tmp_path: Path):
    env = _env(tmp_path)
    clone = tmp_path / "clone"
    source = os.environ.get("DOCS_TEST_REPO", str(ROOT))  # another checkout to clone (e.g. a snapshot)
    subprocess.run(["git", "clone", "--quiet", source, str(clone)], check=True, env=env)
    params = tiny_params(yaml.safe_load((clone / "params.yaml").read_text()))
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _git(clone, "commit", "-qam", "tiny params for the documentation test", env=env)

    outputs: dict[str, str] = {}
    skipped: dict[str, str] = {}
    stage_cmds = {body["cmd"] for body in yaml.safe_load((clone / "dvc.yaml").read_text())["stages"].values()}
    commands = documented_commands(clone)
    extracted = len(commands)
    queue = list(commands)
    report_added = False
    while queue:
        command = queue.pop(0)
        key = command.runnable if command.kind == "python" else re.sub(r"\s+#\s.*$", "", command.runnable)
        if key in outputs or key in skipped:
            continue
        print(f"[docs] {command.source}:{command.line}: {key[:100]}", flush=True)
        if command.bare in NOT_RUN:
            skipped[key] = NOT_RUN[command.bare]
        elif key in stage_cmds:  # a stage's own command (the README's stage table): `dvc repro` ran it
            assert any(k.startswith("dvc repro") for k in outputs), f"{command} shown before any dvc repro"
            outputs[key] = "run by dvc repro"
        elif re.match(r"mlflow (ui|server)\b", key):
            outputs[key] = _serve_briefly(command.runnable, clone, env)
        else:
            outputs[key] = _run(command, clone, env)
        if not report_added and (clone / REPORT).is_file():  # the report's own commands come last
            report = extract((clone / REPORT).read_text(encoding="utf-8"), REPORT)
            extracted += len(report)
            queue += report
            report_added = True
    assert report_added, "no command produced reports/comparison.md"

    # the experiment is compared against the committed baseline
    changed = [k for k in outputs if re.match(r"dvc exp run -S models\.\w+\.\w+=", k)]
    assert changed
    key, value = changed[0].split("-S ", 1)[1].split()[0].split("=")
    params_diff = next(v for k, v in outputs.items() if k.startswith("dvc params diff"))
    assert key in params_diff and value in params_diff
    metrics_diff = next(v for k, v in outputs.items() if k.startswith("dvc metrics diff"))
    assert re.search(r"metrics/\S+\.json", metrics_diff), metrics_diff
    exp_show = next(v for k, v in outputs.items() if k.startswith("dvc exp show"))
    assert value in exp_show and re.search(r"[a-z]+-[a-z]+", exp_show)

    # `dvc exp run --temp` logged into the clone's own store (not into the throw-away copy's)
    temp_runs = [k for k in outputs if k.startswith("dvc exp run --temp -S models.")]
    if temp_runs:
        from mlflow.tracking import MlflowClient

        _, temp_value = temp_runs[0].split("-S ", 1)[1].split()[0].split("=")
        client = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("t5-vs-reformer")
        found = client.search_runs([experiment.experiment_id], f"params.`model.n_hashes` = '{temp_value}'")
        assert found and all(r.data.tags["dvc_exp"] != "workspace" for r in found)

    # `dvc plots show` renders offline, both variants' train and validation loss on one chart
    from tests.browser import render, visible_text

    index = clone / "dvc_plots" / "index.html"
    assert index.is_file() and "cdn.jsdelivr" not in index.read_text(encoding="utf-8")
    text = visible_text(render(index.as_uri(), screenshot=tmp_path / "dvc_plots.png"))
    legend = text[text.index("loss") :]  # after the first axis title: the legends of the loss charts
    for label in ("t5-0", "reformer-0", "run (variant-seed)", "train", "val", "split"):  # colour = run, dash = split
        assert label in legend, label

    summary = {
        "extracted": extracted,
        "distinct": len(outputs) + len(skipped),
        "run": len(outputs),
        "not_run": skipped,
        "commands": list(outputs),
    }
    print(json.dumps(summary, indent=2))
    (Path(os.environ.get("DOCS_TEST_SUMMARY", tmp_path / "summary.json"))).write_text(json.dumps(summary, indent=2))


def test_an_inline_command_wrapped_over_two_lines_is_one_command():
    """Markdown renders a line break in a code span as a space (run as shown, the option lost its value)."""
    (command,) = extract("Open `mlflow ui --backend-store-uri\nsqlite:///$PWD/mlflow.db` to see the runs.\n", "R.md")
    assert command.runnable == "mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db" and command.line == 1
