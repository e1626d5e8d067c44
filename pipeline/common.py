"""What every stage shares: its entry point, how a run ends, user-facing errors, and publishing outputs.

How a stage ends is decided in one place, `outcome_of(exception)`:

    outcome      exit code          MLflow status   outputs
    finished     0                  FINISHED        published (all together)
    interrupted  130 (SIGINT),      KILLED          not published; checkpoints kept for a resume
                 143 (SIGTERM)
    diverged     1                  FAILED          not published; the last good checkpoint kept
    failed       1 (2: bad params)  FAILED          not published; previous outputs untouched

A problem the user can fix (a `StageError`, a missing input, a full disk, a read-only folder, a corrupt file) is
printed as one `error: ...` line naming the culprit and what to do; anything else is a bug and keeps its
traceback. `run_stage` installs SIGINT/SIGTERM handlers that remember the signal, so an interruption is reported
as such even where a library turns it into something else (Lightning exits 1 on Ctrl-C and raises a bare
`SystemExit` on SIGTERM).

Outputs are published by one transaction (`publish()`): every output is written into a temporary sibling, and
only when all of them are complete are they swapped into place, together; a failure before that leaves every
previous output exactly as it was. Left-overs of a killed process (temporary siblings, a half-swapped target)
are cleaned up, or rolled back, the next time the same output is written.

Files a stage reads go through one set of loaders (`read_json` and `read_numeric_csv` of `pipeline/files.py`,
`load_model_dir`, `check_checkpoint`) that
turn a missing, unreadable or corrupt file into a `StageError` naming the file and what to do.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import errno
import fcntl
import gc
import json
import logging
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import DEFAULT_PARAMS, Config, load_config_or_exit
from pipeline.files import CorruptFileError, StageError, read_json, read_numeric_csv  # noqa: F401 (shared names)

log = logging.getLogger("pipeline")


class DivergedError(StageError):
    """Training diverged (non-finite loss or gradients, or stuck at the uniform-prediction loss)."""


class StageInterrupted(KeyboardInterrupt):
    """Raised where our signal handler may raise: the stage was interrupted by `signum`."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


# ------------------------------------------------------------------------------------------------ outcomes


class Outcome(enum.Enum):
    FINISHED = "finished"
    INTERRUPTED = "interrupted"
    DIVERGED = "diverged"
    FAILED = "failed"


MLFLOW_STATUS = {
    Outcome.FINISHED: "FINISHED",
    Outcome.INTERRUPTED: "KILLED",
    Outcome.DIVERGED: "FAILED",
    Outcome.FAILED: "FAILED",
}


@dataclass(frozen=True)
class StageResult:
    """How a stage ended: outcome, exit code, MLflow status, the message for the user, and whether it is a bug."""

    outcome: Outcome
    exit_code: int
    message: str = ""
    bug: bool = False

    @property
    def mlflow_status(self) -> str:
        return MLFLOW_STATUS[self.outcome]


_received: list[int] = []  # signals received by this process since `install_signal_handlers`
_raising = [False]  # whether a signal still interrupts the stage (not once its outcome is decided)
STARTS_OVER = "re-run the stage to start it over (it keeps no checkpoints)"
RESUMES = "re-run the stage to resume from its last checkpoint"
_rerun = [STARTS_OVER]  # what re-running this process's stage does after an interruption (`run_stage(rerun=...)`)


def received_signal() -> int | None:
    """The first SIGINT/SIGTERM this process received since the handlers were installed, else None."""
    return _received[0] if _received else None


def note_signal(signum: int) -> None:
    """Record that the stage is ending because of `signum` (e.g. SIGUSR1 before a SLURM requeue)."""
    _received.append(signum)


def _on_signal(signum: int, frame: Any) -> None:
    _received.append(signum)
    if not _raising[0]:
        return  # the stage has ended already (e.g. SLURM's SIGTERM after a requeue): nothing to interrupt
    if signum == signal.SIGINT or signal.getsignal(signum) is _on_signal:
        # called directly, not composed into Lightning's handler (which stops at the next step by itself)
        raise StageInterrupted(signum)


def raise_if_signalled() -> None:
    """Raise `StageInterrupted` if a SIGINT/SIGTERM arrived. Called where a stage moves on to its next piece of work
    (after each `Trainer.fit`, before opening an MLflow run): Lightning only records a signal that arrives while
    its handler is installed, forgets it at the next `fit`, and ignores it once the last step ran; and our handler's
    exception is swallowed when the signal lands in a finalizer (`__del__`, a `weakref.finalize`)."""
    signum = received_signal()
    if signum is not None:
        raise StageInterrupted(signum)


def _unraisable(hook: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`sys.unraisablehook` that drops our own `StageInterrupted` raised inside a finalizer (the signal is recorded
    and acted on at the next `raise_if_signalled`) instead of printing its traceback; anything else goes to `hook`."""

    def quiet(unraisable: Any) -> Any:
        if isinstance(unraisable.exc_value, StageInterrupted):
            return None
        return hook(unraisable)

    quiet.wrapped = hook  # type: ignore[attr-defined]
    return quiet


def install_signal_handlers() -> None:
    """Remember SIGINT and SIGTERM (and raise `StageInterrupted` where no library handles them itself)."""
    _received.clear()
    _raising[0] = True
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signum, _on_signal)
    if not hasattr(sys.unraisablehook, "wrapped"):
        sys.unraisablehook = _unraisable(sys.unraisablehook)


def _signal_code(signum: int) -> int:
    return 128 + int(signum)


def outcome_of(exc: BaseException | None) -> StageResult:
    """The one place deciding how a stage ended, from the exception it ended with (None: it returned)."""
    signum = received_signal()
    if isinstance(exc, StageInterrupted):
        signum = signum or exc.signum
    if signum is None and isinstance(exc, KeyboardInterrupt):
        signum = signal.SIGINT
    if signum is None and type(exc).__name__ == "SIGTERMException":  # Lightning's bare SystemExit on SIGTERM
        signum = signal.SIGTERM
    if signum is not None:
        name = signal.Signals(signum).name
        return StageResult(
            Outcome.INTERRUPTED, _signal_code(signum), f"interrupted by {name}: no outputs were published; {_rerun[0]}"
        )
    if exc is None:
        return StageResult(Outcome.FINISHED, 0)
    if isinstance(exc, DivergedError):
        return StageResult(Outcome.DIVERGED, 1, str(exc))
    if isinstance(exc, SystemExit):
        if isinstance(exc.code, int) and exc.code:  # e.g. exit 2 after the config errors were printed
            return StageResult(Outcome.FAILED, exc.code)
        message = str(exc.code) if isinstance(exc.code, str) else "the stage stopped before it finished"
        return StageResult(Outcome.FAILED, 1, message)
    message = user_message(exc)
    if message is not None:
        return StageResult(Outcome.FAILED, 1, message)
    return StageResult(Outcome.FAILED, 1, f"{type(exc).__name__}: {exc}", bug=True)


def user_message(exc: BaseException) -> str | None:
    """The one-line message for a problem the user can fix, or None when `exc` is a bug."""
    from pipeline.config import ConfigError

    if isinstance(exc, StageError | ConfigError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return str(exc)
    if isinstance(exc, OSError):
        # a copy or a move (fsspec writes a temporary file in /tmp, then moves it) names its destination second
        written = exc.filename2 or exc.filename
        where = _output_name(written) if written else "an output"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return (
                f"no space left on the device writing {where}{_device_of(written)}: free some space there (or move "
                "the repository to a larger disk) and re-run; previous outputs were kept"
            )
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return (
                f"cannot write {where} ({os.strerror(exc.errno)}): make it writable (chmod u+w, or remount) and "
                "re-run; previous outputs were kept"
            )
    return None


_STAGED = re.compile(r"^\.(.+?)(?:\.\d+\.[0-9a-f]{8}\.tmp|\.saving)$")  # `Publication.stage`, `StepCheckpoint`


def _output_name(path: str | os.PathLike) -> str:
    """`path` as the output it is being written for: the staged siblings of a publication or a checkpoint
    (`.final.<pid>.<hex>.tmp/model.safetensors`, `.last.ckpt.saving`) named by their target, relative to the
    working directory when inside it."""
    parts = [(m.group(1) if (m := _STAGED.match(part)) else part) for part in Path(path).parts]
    shown = Path(*parts)
    with contextlib.suppress(ValueError):
        shown = shown.relative_to(Path.cwd())
    return str(shown)


def _device_of(path: str | os.PathLike | None) -> str:
    """`" (the filesystem mounted at /x, 12.3 MB free)"` for the one holding `path`, or "" if unknown."""
    if not path:
        return ""
    try:
        place = Path(path).absolute()
        while not place.exists() and place != place.parent:
            place = place.parent
        mount = place
        while not os.path.ismount(mount) and mount != mount.parent:
            mount = mount.parent
        free = shutil.disk_usage(place).free
    except OSError:
        return ""
    return f" (the filesystem mounted at {mount}, {free / 2**20:.1f} MB free)"


def repo_root(start: str | Path | None = None) -> Path:
    """The directory holding `params.yaml` (the DVC project root), searched upwards from `start` or the cwd."""
    here = Path(start or os.getcwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / DEFAULT_PARAMS).is_file() or (candidate / ".dvc").is_dir():
            return candidate
    return here


def stage_parser(description: str, per_run: bool = False) -> argparse.ArgumentParser:
    """Argument parser with the `--params` option every stage takes; `per_run`: also `--model` and `--seed`, the
    matrix stages' variant and seed (DVC's `${item.model}`/`${item.seed}`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=DEFAULT_PARAMS, help="params file (default: %(default)s)")
    if per_run:
        parser.add_argument("--model", required=True, help="model variant: a key of `models:` in the params")
        parser.add_argument("--seed", required=True, type=int, help="run seed (one of `seeds:` in the params)")
    return parser


def thread_count(threads: int | None, devices: int | str = 1) -> int:
    """Intra-op threads for this process: `threads` when set, else the cores this process may use divided by the
    processes on this node (`LOCAL_WORLD_SIZE` under torchrun/SLURM, else `trainer.devices`), at least one."""
    if threads:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = os.environ.get("LOCAL_WORLD_SIZE") or (devices if isinstance(devices, int) else 1)
    return max(1, cores // max(1, int(local)))


def apply_threads(threads: int | None, devices: int | str = 1) -> int:
    """Set the intra-op thread count of torch and OpenMP for this process and the processes it starts."""
    n = thread_count(threads, devices)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)  # read by torch when imported later, and inherited by child processes
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return n


def apply_kernels(kernels: Any) -> Any:
    """Set this process's CPU kernels from the params' `kernels` section (`models.set_cpu_kernels`); returns the
    resolved setting (`auto` becomes the machine's kernel)."""
    import models

    return models.set_cpu_kernels(kernels.matmul, kernels.decoding, kernels.paths)


def run_stage(
    body: Callable[[Config, argparse.Namespace], Any],
    parser: argparse.ArgumentParser,
    argv: list[str] | None = None,
    rerun: str = STARTS_OVER,
) -> int:
    """Parse arguments, load the validated config (exit 2 on config errors), run `body`; return the exit code.

    The exit code and the message come from `outcome_of`: 0 only when `body` returned without a signal arriving.
    `rerun` is what the message of an interruption says a re-run does (`RESUMES` for the stages with checkpoints).
    Run as a command (`argv` None), the stage freezes the garbage collector's heap when it is done: the
    interpreter's teardown then skips the cyclic collection over everything the run built, which took 4 to 5 s of
    every stage's exit on 2 busy cores (0.5 s frozen); called in-process (tests) the heap is left alone.
    """
    _rerun[0] = rerun
    try:
        return _run_stage(body, parser, argv)
    finally:
        if argv is None:
            gc.freeze()


def _run_stage(
    body: Callable[[Config, argparse.Namespace], Any],
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
) -> int:
    logging.basicConfig(level=os.environ.get("PIPELINE_LOG_LEVEL", "INFO"), format="%(message)s")
    args = parser.parse_args(argv)
    install_signal_handlers()
    try:
        # a signal while the params validate is only recorded: pydantic's Rust core calls our validators, which
        # import torch, and an exception unwinding through Rust aborts the process (exit 134, nothing said)
        _raising[0] = False
        cfg = load_config_or_exit(args.params)
        _raising[0] = True
        raise_if_signalled()
        apply_threads(cfg.trainer.threads, cfg.trainer.devices)
        apply_kernels(cfg.kernels)
        body(cfg, args)
    except BaseException as exc:  # noqa: BLE001 - every ending is classified, bugs keep their traceback
        _raising[0] = False
        result = outcome_of(exc)
        if result.bug:
            traceback.print_exception(exc)
        if result.message:
            prefix = {Outcome.INTERRUPTED: "", Outcome.DIVERGED: "error: "}.get(result.outcome, "error: ")
            print(f"{prefix}{result.message}", file=sys.stderr, flush=True)
        return result.exit_code
    _raising[0] = False
    result = outcome_of(None)
    if result.message:
        print(result.message, file=sys.stderr, flush=True)
    return result.exit_code


def require_writable(*targets: str | os.PathLike) -> None:
    """A `StageError` now, before any work, when a folder an output of the stage will be written into (the target's
    parent, or the nearest one that exists) does not take a file: a read-only mount or folder would otherwise fail
    the stage only when it publishes, after its training."""
    for target in targets:
        folder = Path(target).parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise StageError(
                f"cannot write {_output_name(target)} ({os.strerror(exc.errno)} in {_output_name(folder)}): make it "
                "writable (chmod u+w, or remount) and re-run; previous outputs were kept"
            ) from None
        os.close(fd)
        os.unlink(probe)


def require_variant(cfg: Any, variant: str, seed: int | None = None) -> None:
    """A `StageError` unless `variant` is one of the `models:` entries of the params and `seed` (if given) one of
    its `seeds:` (`--model` and `--seed` of a per-run stage): a run outside them would write outputs, metrics and
    an MLflow run that no DVC stage tracks."""
    if variant not in cfg.models:
        raise StageError(f"--model {variant}: not a variant of `models:` in {cfg.source} ({', '.join(cfg.models)})")
    if seed is not None and seed not in cfg.seeds:
        seeds = ", ".join(map(str, cfg.seeds))
        raise StageError(
            f"--seed {seed}: not one of `seeds:` in {cfg.source} ({seeds}); add it to `seeds:` (then "
            f"`dvc repro` runs it as its own stage), or pick one of those"
        )


# ---------------------------------------------------------------------------------------------- publishing


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _backup_of(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def recover_output(target: str | Path) -> None:
    """Undo what a killed writer of `target` left behind: roll back a half-done swap (the previous output comes
    back), and remove temporary siblings whose process is gone."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    backup = _backup_of(target)
    if backup.exists() or backup.is_symlink():
        if target.exists() or target.is_symlink():
            _remove(backup)
        else:
            os.replace(backup, target)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        parts = stale.name[len(target.name) + 2 :].split(".")
        pid = int(parts[0]) if parts and parts[0].isdigit() else None
        if pid is None or not _pid_alive(pid):
            _remove(stale)


class Publication:
    """A set of outputs written aside and swapped into place together (`commit`), or not at all (`abort`)."""

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []
        self.committed = False

    def stage(self, target: str | Path) -> Path:
        """A fresh temporary path next to `target` (the caller creates a file or a directory there)."""
        target = Path(target)
        if any(t == target for t, _ in self._staged):
            raise ValueError(f"{target} is already part of this publication")
        target.parent.mkdir(parents=True, exist_ok=True)
        recover_output(target)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        self._staged.append((target, tmp))
        return tmp

    def staged(self, target: str | Path) -> Path:
        """The temporary path already staged for `target` (to read back what will be published)."""
        target = Path(target)
        return next(tmp for t, tmp in self._staged if t == target)

    def write_text(self, target: str | Path, text: str) -> None:
        self.stage(target).write_text(text, encoding="utf-8")

    def write_json(self, target: str | Path, obj: Any) -> None:
        self.write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def commit(self) -> None:
        """Swap every staged output into place. Raises (and changes nothing) if any is missing, or if the
        process received SIGINT/SIGTERM: an interrupted stage publishes nothing."""
        raise_if_signalled()
        for target, tmp in self._staged:
            if not (tmp.exists() or tmp.is_symlink()):
                raise StageError(f"internal error: nothing was written for {target}")
        moved: list[tuple[Path, Path | None]] = []
        try:
            for target, tmp in self._staged:
                backup = None
                if target.exists() or target.is_symlink():
                    backup = _backup_of(target)
                    _remove(backup)
                    os.replace(target, backup)
                moved.append((target, backup))
                os.replace(tmp, target)
        except BaseException:
            for target, backup in reversed(moved):  # roll back: previous outputs return
                if backup is not None:
                    _remove(target)
                    os.replace(backup, target)
            raise
        for _, backup in moved:
            if backup is not None:
                _remove(backup)
        self.committed = True

    def abort(self) -> None:
        """Remove every temporary path; targets stay as they were."""
        for _, tmp in self._staged:
            _remove(tmp)


@contextlib.contextmanager
def publish() -> Iterator[Publication]:
    """`with publish() as pub: pub.write_json(a, ...); tmp = pub.stage(b); ...`: all outputs are swapped into
    place together when the block ends normally; on an exception none is, and the temporary paths go away."""
    pub = Publication()
    try:
        yield pub
        pub.commit()
    except OSError as exc:
        if exc.filename is None and pub._staged:  # a failed write() or close() names no file: the one staged last
            exc.filename = str(pub._staged[-1][1])  # is the one being written (its message names its target)
        raise
    finally:
        pub.abort()


@contextlib.contextmanager
def atomic_output(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path (file or directory, the caller decides) that replaces `target` on success.

    On an exception the temporary path is removed and `target` is left exactly as it was.
    """
    with publish() as pub:
        yield pub.stage(target)


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as pretty JSON, atomically."""
    with publish() as pub:
        pub.write_json(path, obj)


# ---------------------------------------------------------------------------------------------------- locks

_held_locks: dict[Path, int] = {}


def hold_lock(path: str | Path, what: str) -> None:
    """Take an exclusive lock on `path` for the rest of this process (the kernel drops it when the process ends,
    however it ends); `StageError` naming the holder when another process runs `what` already."""
    path = Path(path)
    if path in _held_locks:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StageError(
            f"{what} is already running in another process (pid {holder}; lock {path}): wait for it to finish, "
            "or stop it, before starting it again"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held_locks[path] = fd


# ------------------------------------------------------------------------------------------------- loaders


def load_model_dir(directory: str | Path, fix: str) -> tuple[str, Any]:
    """`models.load_pretrained(directory)`; a missing, truncated or corrupt weights/config file -> `StageError`
    naming the file and `fix` (e.g. which stage re-creates it)."""
    import models

    directory = Path(directory)
    weights, config = directory / models.WEIGHTS_NAME, directory / models.CONFIG_NAME
    for path in (config, weights):
        if not path.is_file():
            raise StageError(f"{path} not found: {fix}")
    read_json(config, fix)
    try:
        return models.load_pretrained(directory)
    except StageError:
        raise
    except Exception as exc:  # safetensors, torch and our own config checks raise many types for a bad file
        culprit = config if isinstance(exc, KeyError | TypeError) else weights
        raise CorruptFileError(culprit, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}", fix) from None


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    """A directory written by DeepSpeed's `save_checkpoint` (Lightning's DeepSpeed checkpoints are directories)."""
    path = Path(path)
    return path.is_dir() and ((path / "latest").is_file() or any(path.glob("*/*model_states.pt")))


def check_checkpoint(path: str | Path, shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """Raise `CorruptFileError` unless `path` is a readable training checkpoint: a Lightning file (loaded without
    pickle, `weights_only=True`, memory-mapped) with a `state_dict` (with `shapes`, the module's tensor names and
    shapes: exactly those), or a DeepSpeed directory with its shards."""
    import zipfile

    import torch

    path = Path(path)
    fix = "move it aside, or set trainer.on_corrupt_checkpoint to 'previous' or 'scratch'"
    if path.is_dir():
        if not is_deepspeed_checkpoint(path):
            raise CorruptFileError(path, "a directory without DeepSpeed shards or a 'latest' tag", fix)
        tag = (path / "latest").read_text().strip() if (path / "latest").is_file() else None
        shards = list((path / tag).glob("*.pt")) if tag else list(path.glob("*/*.pt"))
        if not shards:
            raise CorruptFileError(path, f"the tag {tag!r} has no shard files", fix)
        for shard in shards:
            if shard.stat().st_size == 0 or not zipfile.is_zipfile(shard):
                raise CorruptFileError(shard, "truncated or not a torch file", fix)
        return
    try:
        if not zipfile.is_zipfile(path):
            raise ValueError("truncated or not a torch checkpoint (no zip archive)")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ValueError("no 'state_dict' in it")
        if shapes is not None:  # names as the plain module has them (torch.compile's wrapper adds `_orig_mod.`)
            found = {k.replace("_orig_mod.", ""): tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
            shapes = {k.replace("_orig_mod.", ""): v for k, v in shapes.items()}
            wrong = sorted(k for k in found.keys() | shapes.keys() if found.get(k) != shapes.get(k))
            if wrong:
                k = wrong[0]
                raise ValueError(
                    f"its weights are not this model's: {len(wrong)} of {len(shapes)} tensors differ, e.g. {k}: "
                    f"{found.get(k, 'missing')} in the file, {shapes.get(k, 'none')} in the model"
                )
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:
        # torch's message advises loading with the unrestricted unpickler, which would run whatever was planted
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"a reference to {found.group(1)}" if found else "pickled objects that are not tensors or plain values"
        raise CorruptFileError(
            path,
            f"it holds {what}, which no checkpoint of this pipeline contains; it was not loaded, since unpickling it "
            "could run code planted in it",
            "delete it unless you know where it came from, or set trainer.on_corrupt_checkpoint to 'previous' or "
            "'scratch' (it is then moved aside)",
        ) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError... for a damaged file
        raise CorruptFileError(path, str(exc).splitlines()[0][:200], fix) from None
