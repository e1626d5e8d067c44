"""A lost node ends the run: each rank's heartbeat goes through the job's rendezvous store, and a peer watches it.

Every process of a multi-process training run (torchrun, SLURM or Lightning's own processes) starts a `Watchdog`
once the process group is up (`Heartbeat`, a Lightning callback). Twice every `launcher.heartbeat_interval_s` the
watchdog's store thread adds one to its rank's counter in the store the process group was built on (through its
own connection) and reads the counter of the next rank (rank + 1 modulo the world size): each rank is watched by
exactly one peer, so the store serves O(world) requests per interval. Then:

- a peer whose counter has not moved for `launcher.heartbeat_timeout_s` is lost: the rank watching it posts that
  in the store, where every other rank reads it at its next beat;
- a store that has not answered for `heartbeat_timeout_s` is lost with its node (global rank zero's under SLURM
  and Lightning, the rendezvous endpoint's under torchrun);
- a communication error in the training itself (a killed peer closes its connections: gloo fails at once) is
  explained by `watched()`: the rank whose counter stopped, or that reported an error of its own, is named;
- SIGTERM or SIGINT that the stage has not acted on within two intervals (its main thread blocked in a collective
  with a dead peer runs no Python signal handler) ends the process as interrupted (exit 143 or 130, MLflow KILLED).

Each survivor then prints one message naming the lost rank and its node and what to do, its watchdog runs the
stage's `on_end` callbacks (global rank zero marks its MLflow run FAILED), and the process exits 1 at once: its main
thread waits in a collective that can no longer complete, and nothing else would end it. The last checkpoint is
on the shared filesystem; re-running the stage on every node resumes from it.

Why a heartbeat, and not the two other mechanisms that could end such a run:
- torchrun's agent watches the workers of its own node only: a peer node that goes silent (crashed, frozen, cut
  off: no TCP reset) leaves the survivors blocked in a collective, and under SLURM there is no agent at all;
- the collective timeout (`init_process_group(timeout=...)`) measures progress, not liveness: it must outlast the
  longest legitimate wait in a collective (the other ranks waiting while rank zero saves a large checkpoint or
  talks to a slow MLflow server), so it is long (torch's default is 30 minutes), its error does not say which
  peer is gone, and a rank blocked in a collective does not run SIGTERM's handler until it fires.
A heartbeat only needs a thread that can run: a busy peer keeps beating, a dead one stops, and the time to notice is
`heartbeat_timeout_s` plus one interval, whatever the training is doing.

At the end of the stage the ranks agree on its outcome (`Watchdog.close`): global rank zero posts whether it
published its outputs, the other ranks wait for that (still watched) and exit non-zero if it failed, so no node
reports success for a run whose outputs were not written, and rank zero waits until the others have read it
(under SLURM and Lightning the store lives in rank zero's process).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import lightning as L
import torch

from pipeline.common import StageError, StageInterrupted, StageResult, outcome_of

KEYS = "pipeline-liveness"  # the prefix of every key this module writes into the job's store
OK, FAILED = "ok", "failed"  # global rank zero's outcome, posted for the other ranks
DONE, EXITED = "done", "exited"  # a rank's own end: finished with the run, or stopped by an error

# Set by the stage running torchrun's agent (`pipeline/training/launch.py`): a file its workers write their exit code
# into when their watchdog ends them. The agent itself waits forever on a rendezvous store whose node went silent.
AGENT_NOTICE = "PIPELINE_AGENT_NOTICE"

_current: Watchdog | None = None  # this process's watchdog, once started


def _key(*parts: object) -> str:
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun's store outlives a restart
    return "/".join([KEYS, restart, *map(str, parts)])


class Watchdog:
    """The heartbeat of rank `rank` of `world`, through the TCP store at `host:port`, watching rank + 1.

    `on_end` callbacks get the `StageResult` the process ends with when the watchdog ends it; `exit` is `os._exit`
    (tests pass their own). Two daemon threads: one talks to the store (and may block there, when the store's node
    goes silent), the other judges and never touches the network.
    """

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        world: int,
        interval_s: float,
        timeout_s: float,
        on_end: list[Callable[[StageResult], None]] | None = None,
        exit: Callable[[int], Any] = os._exit,
        hostname: str | None = None,
    ):
        self.host, self.port, self.rank, self.world = host, port, rank, world
        self.interval, self.timeout = interval_s, timeout_s
        self.grace = 2 * interval_s  # how long SIGTERM/SIGINT waits for the stage to act on it
        self.on_end = list(on_end or [])
        self._exit = exit
        self.hostname = hostname or socket.gethostname()
        self.successor = (rank + 1) % world
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # the store thread: do the pending posts now
        now = time.monotonic()
        self._last_ok = now  # the last completed round of store requests
        self._store_error = ""  # why the store did not answer, when it did not
        self._beats = -1  # the successor's counter as last read, and when it last moved
        self._moved = now
        self._hosts: dict[int, str] = {rank: self.hostname}
        self._states: dict[int, str] = {}  # ranks that posted their end (DONE / EXITED)
        self._lost = ""  # a loss posted in the store: "<rank> <host>"
        self._outcome = ""  # rank zero's posted outcome
        self._acks = 0
        self._posts: list[tuple[str, str]] = []  # (key, value) for the store thread to write
        self._census_wanted = False
        self._census: list[tuple[float, dict[int, int]]] = []  # (time, every rank's counter)
        self._signal: tuple[int, float] | None = None
        self._ending = threading.Lock()
        self._ended = False
        self._closing = False  # the stage is agreeing on the outcome (`close`): it reports rank zero's itself
        self._wakeup: tuple[int, int] | None = None
        self._previous_wakeup = -1
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------------------------------- life

    def start(self, catch_signals: bool = True) -> Watchdog:
        """Start both threads; with `catch_signals` (main thread only) learn of SIGTERM/SIGINT through the
        interpreter's wakeup file descriptor, which is written even while the main thread is blocked."""
        if catch_signals and threading.current_thread() is threading.main_thread():
            read, write = os.pipe()
            os.set_blocking(read, False)
            os.set_blocking(write, False)
            self._previous_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            self._wakeup = (read, write)
        for target, name in ((self._store_loop, "store"), (self._judge_loop, "judge")):
            thread = threading.Thread(target=target, name=f"liveness-{name}-rank{self.rank}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop watching (the threads end at their next tick) and give back the wakeup file descriptor."""
        self._stop.set()
        self._wake.set()
        if self._wakeup is not None:
            with contextlib.suppress(ValueError):  # not the main thread
                signal.set_wakeup_fd(self._previous_wakeup)
            self._wakeup = None  # the judge's select returns on its own; the pipe goes with the process

    # ------------------------------------------------------------------------------------- the store

    def _connect(self) -> Any:
        return torch.distributed.TCPStore(
            self.host, self.port, is_master=False, timeout=timedelta(seconds=self.timeout), wait_for_workers=False
        )

    def _store_loop(self) -> None:
        store = None
        while not self._stop.is_set():
            try:
                if store is None:
                    store = self._connect()
                    store.set(_key("host", self.rank), self.hostname)
                self._round(store)
                with self._lock:
                    self._last_ok, self._store_error = time.monotonic(), ""
            except Exception as exc:  # refused, reset, timed out: the judge decides when that means lost
                with self._lock:
                    self._store_error = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                store = None
            self._wake.wait(self.interval / 2)
            self._wake.clear()

    def _read(self, store: Any, key: str) -> str | None:
        return store.get(key).decode() if store.check([key]) else None

    def _round(self, store: Any) -> None:
        """One round: write what is pending, beat, read the successor, the posts, and the census when wanted."""
        with self._lock:
            posts = list(self._posts)
        for key, value in posts:
            if key.endswith("/lost"):
                store.compare_set(key, "", value)  # the first loss posted is the one everybody reports
            elif key.endswith("/acks"):
                store.add(key, 1)
            else:
                store.set(key, value)
            with self._lock:
                self._posts.remove((key, value))  # written (a failed request leaves the rest for the next round)
        store.add(_key("beat", self.rank), 1)
        beats = store.add(_key("beat", self.successor), 0)
        state = self._read(store, _key("state", self.successor))
        hosts = {r: self._read(store, _key("host", r)) for r in {self.successor, 0} - set(self._hosts)}
        lost, outcome = self._read(store, _key("lost")), self._read(store, _key("outcome"))
        acks = store.add(_key("acks"), 0) if self.rank == 0 else 0
        census = None
        if self._census_wanted:
            census = {r: store.add(_key("beat", r), 0) for r in range(self.world)}
            for r in range(self.world):
                if r not in self._states and (s := self._read(store, _key("state", r))):
                    self._states[r] = s
                if r not in self._hosts and (h := self._read(store, _key("host", r))):
                    self._hosts[r] = h
        now = time.monotonic()
        with self._lock:
            if beats != self._beats:
                self._beats, self._moved = beats, now
            if state:
                self._states[self.successor] = state
            self._hosts.update({r: h for r, h in hosts.items() if h})
            self._lost, self._outcome, self._acks = lost or "", outcome or "", acks
            if census is not None:
                self._census.append((now, census))

    def _post(self, key: str, value: str = "", wait_s: float = 0.0) -> bool:
        """Have the store thread write `key`; wait up to `wait_s` for it to be written. True once written."""
        with self._lock:
            self._posts.append((key, value))
        self._wake.set()
        deadline = time.monotonic() + wait_s
        while True:
            with self._lock:
                if (key, value) not in self._posts:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    # ------------------------------------------------------------------------------------------ verdicts

    def _node(self, rank: int) -> str:
        host = self._hosts.get(rank)
        return f"global rank {rank} (node {host})" if host else f"global rank {rank}"

    def lost_message(self, who: str, why: str) -> str:
        return (
            f"lost {who}: {why}; every other rank stops too. Check that node (or leave it out), then re-run the "
            "stage on every node (`dvc repro` where you started it): it resumes from the last checkpoint"
        )

    def store_message(self) -> str:
        return self.lost_message(
            f"the job's rendezvous store at {self.host}:{self.port}",
            f"it has not answered for {self.timeout:g} s (launcher.heartbeat_timeout_s"
            + (f"; {self._store_error}" if self._store_error else "")
            + "): its node crashed, froze or lost its network",
        )

    def _verdict(self, now: float) -> tuple[StageResult, str] | None:
        """How the process must end now, and the message; None while all is well."""
        with self._lock:
            if self._signal is not None and now - self._signal[1] > self.grace:
                result = outcome_of(StageInterrupted(self._signal[0]))
                return result, result.message
            if self._lost:
                rank, _, host = self._lost.partition(" ")
                who = f"global rank {rank}" + (f" (node {host})" if host else "")
                why = "its heartbeat stopped (reported by the rank watching it)"
                return outcome_of(StageError("")), self.lost_message(who, why)
            if self.rank != 0 and self._outcome == FAILED and not self._closing:
                return outcome_of(StageError("")), self.rank_zero_failed()
            if now - self._last_ok > self.timeout:
                return outcome_of(StageError("")), self.store_message()
            if self.successor not in self._states and self._last_ok - self._moved > self.timeout:
                who = self._node(self.successor)
                self._posts.append((_key("lost"), f"{self.successor} {self._hosts.get(self.successor, '')}"))
                why = (
                    f"no heartbeat for {self._last_ok - self._moved:.0f} s (launcher.heartbeat_timeout_s "
                    f"{self.timeout:g}): that node crashed, froze or lost its network"
                )
                return outcome_of(StageError("")), self.lost_message(who, why)
        return None

    def rank_zero_failed(self) -> str:
        """What a rank other than zero says when rank zero failed: nothing on rank zero's own node, where rank
        zero's message is already shown."""
        if self._hosts.get(0) == self.hostname:
            return ""
        return (
            f"{self._node(0)} failed, so this run failed: its own message says why (in that node's output); "
            "fix that, then re-run the stage on every node"
        )

    def _judge_loop(self) -> None:
        tick = min(1.0, self.interval / 2)
        while not self._stop.is_set():
            wakeup = self._wakeup
            if wakeup is not None:
                with contextlib.suppress(OSError, ValueError):
                    ready, _, _ = select.select([wakeup[0]], [], [], tick)
                    if ready:
                        self._note_signals(os.read(wakeup[0], 512))
            else:
                self._stop.wait(tick)
            if self._stop.is_set():
                return
            verdict = self._verdict(time.monotonic())
            if verdict is not None:
                self._end(*verdict)
                return

    def _note_signals(self, data: bytes) -> None:
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT) and self._signal is None:
                with self._lock:
                    self._signal = (signum, time.monotonic())

    def _end(self, result: StageResult, message: str) -> None:
        """Print `message`, tell the others (best effort), run the callbacks (bounded), exit with the result's code."""
        with self._ending:
            if self._ended:
                return
            self._ended = True
        if message:
            prefix = "" if result.exit_code > 128 else "error: "  # an interruption is not an error (as run_stage)
            print(f"{prefix}{message}", file=sys.stderr, flush=True)
        # tell the others (they stop sooner, and rank zero need not wait for this one); not worth waiting for where
        # the store has stopped answering
        wait_s = min(self.interval, 5.0) if time.monotonic() - self._last_ok < 2 * self.interval else 0.0
        self._post(_key("state", self.rank), EXITED, wait_s=wait_s)
        if self.rank != 0:
            self._post(_key("acks"), wait_s=wait_s)
        for callback in self.on_end:
            worker = threading.Thread(target=_quietly, args=(callback, result), daemon=True)
            worker.start()
            worker.join(timeout=max(5.0, 2 * self.interval))  # an MLflow server on the lost node must not hang us
        if os.environ.get(AGENT_NOTICE):
            with contextlib.suppress(OSError):
                with open(os.environ[AGENT_NOTICE], "w") as notice:
                    notice.write(str(result.exit_code))
        sys.stdout.flush()
        sys.stderr.flush()
        self.stop()
        self._exit(result.exit_code)

    # ------------------------------------------------------------------------------- the stage's side

    def explain(self, exc: BaseException) -> StageError | None:
        """A `StageError` naming the lost or failed peer behind `exc`, a communication error of the training; None
        when `exc` is not one, or when every peer is alive (then it is a bug, reported as such)."""
        if not is_communication_error(exc):
            return None
        with self._lock:
            self._census_wanted, self._census = True, []
        deadline = time.monotonic() + 2 * self.interval + self.timeout
        while time.monotonic() < deadline:
            now = time.monotonic()
            with self._lock:
                census, states, lost, outcome = list(self._census), dict(self._states), self._lost, self._outcome
                store_silent = now - self._last_ok > 2 * self.interval and bool(self._store_error)
            if lost:
                rank, _, host = lost.partition(" ")
                who = f"global rank {rank}" + (f" (node {host})" if host else "")
                return StageError(self.lost_message(who, "its heartbeat stopped (reported by the rank watching it)"))
            if self.rank != 0 and outcome == FAILED:
                return StageError(self.rank_zero_failed())
            failed = sorted(r for r, s in states.items() if s == EXITED and r != self.rank)
            if failed:
                return StageError(
                    f"{self._node(failed[0])} stopped with an error (its own message, in that node's output, says "
                    "why), so every rank stops; fix that, then re-run the stage on every node"
                )
            if store_silent:
                return StageError(self.store_message())
            if len(census) >= 2 and census[-1][0] - census[0][0] >= 1.5 * self.interval:
                first, last = census[0][1], census[-1][1]
                silent = [r for r in range(self.world) if r != self.rank and last[r] == first[r] and r not in states]
                if not silent:
                    return None
                why = "it stopped answering (its process was killed, or its node went down)"
                return StageError(self.lost_message(self._node(silent[0]), why))
            time.sleep(min(0.2, self.interval / 4))
        return None

    def close(self, ok: bool) -> None:
        """The stage's end on this rank: agree on the outcome with the others (see the module doc), then stop.
        Raises `StageError` on a rank other than zero when rank zero failed."""
        self._closing = True
        try:
            if self.rank == 0:
                self._post(_key("outcome"), OK if ok else FAILED, wait_s=self.timeout)
                # the others read the outcome at their next beat; a failed run waits less (they stop by themselves)
                deadline = time.monotonic() + (self.timeout if ok else 2 * self.interval)
                while time.monotonic() < deadline and self._acks < self.world - 1:
                    time.sleep(min(0.1, self.interval / 4))
                self._post(_key("state", 0), DONE if ok else EXITED, wait_s=self.interval)
                return
            if not ok:
                self._post(_key("state", self.rank), EXITED, wait_s=self.interval)
                self._post(_key("acks"), wait_s=self.interval)
                return
            while not self._outcome:  # still watched: a lost rank zero, or a signal, ends this process meanwhile
                time.sleep(min(0.1, self.interval / 4))
            self._post(_key("state", self.rank), DONE, wait_s=self.interval)
            self._post(_key("acks"), wait_s=self.interval)
            if self._outcome == FAILED:
                raise StageError(self.rank_zero_failed())
        finally:
            self.stop()


def _quietly(callback: Callable[[StageResult], None], result: StageResult) -> None:
    try:
        callback(result)
    except Exception as exc:  # the process is ending for another reason: that one is what the user must see
        print(f"warning: {exc}", file=sys.stderr, flush=True)


def is_communication_error(exc: BaseException) -> bool:
    """Whether `exc` (or what it was raised from) is a failed collective or store request."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, torch.distributed.DistError | ConnectionError):
            return True
        text = str(exc)
        if isinstance(exc, RuntimeError) and any(s in text for s in ("gloo", "NCCL", "Connection", "c10d")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _store_address() -> tuple[str, int]:
    """Host and port of the TCP store the default process group was built on."""
    store = torch.distributed.distributed_c10d._get_default_store()
    while hasattr(store, "underlying_store"):  # PrefixStore
        store = store.underlying_store
    return store.host, store.port


def start(interval_s: float, timeout_s: float, on_end: list[Callable[[StageResult], None]]) -> Watchdog | None:
    """This process's watchdog (started once); None for a single process."""
    global _current
    if _current is not None:
        return _current
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    world = torch.distributed.get_world_size()
    if world < 2:
        return None
    host, port = _store_address()
    rank = torch.distributed.get_rank()
    _current = Watchdog(host, port, rank, world, interval_s, timeout_s, on_end).start()
    return _current


@contextlib.contextmanager
def watched() -> Iterator[None]:
    """Around a training stage's body: a communication error becomes a `StageError` naming the peer behind it,
    and the ranks agree on the outcome at the end (`Watchdog.close`). Does nothing in a single process."""
    global _current
    try:
        yield
    except BaseException as exc:
        watchdog, _current = _current, None
        if watchdog is None:
            raise
        error = watchdog.explain(exc) if isinstance(exc, Exception) else None
        watchdog.close(ok=False)
        if error is not None:
            raise error from None
        raise
    watchdog, _current = _current, None
    if watchdog is not None:
        watchdog.close(ok=True)


class Heartbeat(L.Callback):
    """Starts the process's watchdog once Lightning has built the process group (several processes only);
    `on_end` callbacks run when the watchdog ends the process (global rank zero: mark the MLflow run)."""

    def __init__(self, interval_s: float, timeout_s: float, on_end: list[Callable[[StageResult], None]]):
        self.interval_s, self.timeout_s, self.on_end = interval_s, timeout_s, on_end

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            start(self.interval_s, self.timeout_s, self.on_end)
