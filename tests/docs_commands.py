"""The commands the documentation shows, extracted in reading order, for `tests/test_docs_commands.py`.

A command is a line of a fenced `bash`/`sh`/`shell`/`console` block (continuation lines joined, comment-only
lines dropped), a whole fenced `python` block, or an inline code span in the prose that starts with `dvc `,
`mlflow `, `python -m ` or `git `. Placeholders a reader fills in (`<name>`, `<variant>`) are replaced by the
values listed in `PLACEHOLDERS`; commands that cannot run in a test (the setup and CI commands themselves, GPU
and cluster runs) are listed in `NOT_RUN` with the reason and the test that covers them instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DOCS = ["README.md", "docs/results.md", "docs/cluster.md", "docs/interfaces.md"]
REPORT = "reports/comparison.md"
SHELL_LANGS = {"bash", "sh", "shell", "console"}
INLINE = re.compile(r"`((?:dvc|mlflow|python -m|git) [^`]+)`")
FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```", re.M | re.S)

# What a reader substitutes, and what the test substitutes for it.
PLACEHOLDERS = {
    "--model V --seed S": "--model ${item.model} --seed ${item.seed}",  # the stage table: dvc.yaml's own cmd
    "<name>": "$(dvc exp ls --name-only | tail -n 1)",
    "<variant>": "reformer",
    "<field>=...": "n_hashes=8",  # the report's example: the README's experiment, already run
}

# Commands the test does not run, with the reason and where they are covered instead.
NOT_RUN = {
    'python -m pip install --upgrade pip && python -m pip install "torch==2.13.0" && python -m pip install -e '
    '".[test]"': "the setup command: .ci/run runs it in a fresh virtual environment",
    'python -m pytest -m "not gpu" -n auto --dist loadfile': "the test command: it is what runs this test (.ci/run)",
    "python -m pipeline.<stage> --model <variant> --seed <seed>": (
        "the pattern of the matrix stages' command: the README's stage table shows (and dvc repro runs) each"
    ),
    "python -m tests.faults": "the fault suite (many stage runs): tests/test_faults_suite.py runs it",
    "python -m pipeline.preset long_range --temp": (
        "73 minutes on 2 cores: tests/test_presets_cpu.py runs it reduced, tests/test_preset.py a real dvc exp run"
    ),
    "python -m pipeline.preset table2 --temp": "35 minutes on 2 cores: tests/test_presets_cpu.py runs it reduced",
    "python -m pipeline.preset scaling --temp": "50 minutes on 2 cores: tests/test_presets_cpu.py runs it reduced",
    "python -m pipeline.preset lra_listops --queue": "GPU-sized: tests/test_presets_cpu.py runs it reduced on CPU",
}


@dataclass(frozen=True)
class Command:
    """One documented command: where it is shown, its text as shown, and how it runs (`shell` or `python`)."""

    source: str
    line: int
    text: str
    kind: str = "shell"

    @property
    def bare(self) -> str:
        """The command without a trailing `# comment`."""
        return re.sub(r"\s+#\s.*$", "", self.text).strip() if self.kind == "shell" else self.text

    @property
    def runnable(self) -> str:
        """The text with the placeholders filled in."""
        text = self.text
        for placeholder, value in PLACEHOLDERS.items():
            text = text.replace(placeholder, value)
        return text

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.text}"


def extract(text: str, source: str) -> list[Command]:
    """Every command shown in the Markdown `text`, in reading order."""
    found: list[tuple[int, Command]] = []
    fenced_spans = []
    for match in FENCE.finditer(text):
        lang, body = match.group(1).lower(), match.group(2)
        fenced_spans.append(match.span())
        first = text.count("\n", 0, match.start(2)) + 1
        if lang == "python":
            found.append((match.start(), Command(source, first, body.rstrip("\n"), "python")))
        elif lang in SHELL_LANGS:
            pending, start = "", first
            for offset, raw in enumerate(body.splitlines()):
                line = raw.rstrip()
                if not pending:
                    start = first + offset
                if line.endswith("\\"):
                    pending += line[:-1].rstrip() + " "
                    continue
                command = (pending + line.strip()).strip()
                pending = ""
                if command and not command.startswith("#"):
                    position = match.start(2) + sum(len(x) + 1 for x in body.splitlines()[:offset])
                    found.append((position, Command(source, start, command)))
    for match in INLINE.finditer(text):
        if any(a <= match.start() < b for a, b in fenced_spans):
            continue
        line = text.count("\n", 0, match.start()) + 1
        span = " ".join(match.group(1).split())  # a code span wrapped over lines renders (and runs) as one line
        found.append((match.start(), Command(source, line, span)))
    return [c for _, c in sorted(found, key=lambda pair: pair[0])]


def documented_commands(root: Path, files: list[str] | None = None) -> list[Command]:
    """The commands of every documentation file under `root` (README first, then docs/), in reading order."""
    commands: list[Command] = []
    for name in files or DOCS:
        path = root / name
        if path.is_file():
            commands += extract(path.read_text(encoding="utf-8"), name)
    return commands
