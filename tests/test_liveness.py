"""The heartbeat watchdog (pipeline/training/liveness.py) on a real TCP store, each rank's watchdog in this process.

A "frozen" rank is one whose watchdog threads stopped (no beats, nothing posted), a lost store node is a store
server process stopped with SIGSTOP; instead of exiting, a watchdog records the exit code it would end with. The
same watchdog in real training processes across two network namespaces: tests/test_multinode.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch

from pipeline.common import StageError
from pipeline.training.liveness import Watchdog, is_communication_error

INTERVAL, TIMEOUT = 0.1, 0.8


@pytest.fixture(autouse=True)
def _no_signal_received(monkeypatch):
    """How a process ends depends on the signals it received (`common.outcome_of`): none, whatever tests before this
    one did in this process."""
    from pipeline import common

    monkeypatch.setattr(common, "_received", [])


class Ranks:
    """`world` watchdogs on one store; `ended[rank]` is the exit code a watchdog ended its process with."""

    def __init__(self, host: str, port: int, world: int, **kwargs):
        self.ended: dict[int, int] = {}
        self.dogs = [
            Watchdog(host, port, r, world, INTERVAL, TIMEOUT, exit=self._exit(r), hostname=f"node-{r}", **kwargs)
            for r in range(world)
        ]

    def _exit(self, rank: int):
        return lambda code: self.ended.setdefault(rank, code)

    def start(self) -> Ranks:
        for dog in self.dogs:
            dog.start(catch_signals=False)
        return self

    def stop(self) -> None:
        for dog in self.dogs:
            dog.stop()
        for dog in self.dogs:  # within the test: a request failing on a store gone is this test's business
            for thread in dog._threads:
                thread.join(timeout=5)

    def wait_ended(self, ranks: set[int], limit_s: float = 20.0) -> None:
        deadline = time.monotonic() + limit_s
        while set(self.ended) < ranks and time.monotonic() < deadline:
            time.sleep(0.02)
        assert set(self.ended) >= ranks, f"only {self.ended} ended"


def test_a_frozen_rank_is_named_by_its_watcher_and_every_other_rank_stops(store, capsys):
    ranks = Ranks("127.0.0.1", store.port, 3).start()
    try:
        time.sleep(3 * INTERVAL)
        assert not ranks.ended  # alive and beating: nobody stops
        ranks.dogs[2].stop()  # rank 2 freezes: no more beats, nothing posted
        ranks.wait_ended({0, 1})
        assert ranks.ended == {0: 1, 1: 1}
        err = capsys.readouterr().err
        # the watcher (rank 1) and rank 0 (through the store) both name rank 2 and its node, and say what to do
        assert err.count("error: lost global rank 2 (node node-2)") == 2, err
        assert "no heartbeat for" in err and "re-run the stage on every node" in err
        assert store.get("pipeline-liveness/0/lost") == b"2 node-2"
    finally:
        ranks.stop()


def test_a_busy_rank_keeps_beating(store):
    """Liveness, not progress: a rank whose main thread holds on for longer than the timeout is not lost."""
    ranks = Ranks("127.0.0.1", store.port, 2).start()
    try:
        time.sleep(3 * TIMEOUT)
        assert not ranks.ended
    finally:
        ranks.stop()


def test_a_silent_store_node_is_lost(tmp_path, capsys):
    """The store's node freezes (its process stopped: requests hang, no reset): every rank stops, naming it."""
    server = subprocess.Popen(
        [sys.executable, "-c", "import datetime, sys, time, torch; "
         "s = torch.distributed.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False); "
         "print(s.port, flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        port = int(server.stdout.readline())
        ranks = Ranks("127.0.0.1", port, 2).start()
        time.sleep(3 * INTERVAL)
        assert not ranks.ended
        server.send_signal(signal.SIGSTOP)
        ranks.wait_ended({0, 1})
        assert ranks.ended == {0: 1, 1: 1}
        err = capsys.readouterr().err
        assert err.count(f"error: lost the job's rendezvous store at 127.0.0.1:{port}") == 2, err
    finally:
        server.kill()
        server.wait()
        ranks.stop()


def test_a_communication_error_is_explained_by_the_rank_that_stopped(store):
    ranks = Ranks("127.0.0.1", store.port, 3).start()
    try:
        time.sleep(3 * INTERVAL)
        gloo = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [10.0.0.2]:3346: Connection reset by peer")
        assert ranks.dogs[0].explain(gloo) is None  # every peer alive: a bug, kept as it is
        assert ranks.dogs[0].explain(ValueError("not a collective")) is None
        ranks.dogs[1].stop()  # rank 1 killed: its connections close, rank 0's collective fails at once
        error = ranks.dogs[0].explain(gloo)
        assert isinstance(error, StageError)
        assert str(error).startswith("lost global rank 1 (node node-1): it stopped answering")
        assert not ranks.ended  # explained well before the watcher's timeout
    finally:
        ranks.stop()


def test_a_rank_that_failed_is_named_as_failed_not_lost(store):
    ranks = Ranks("127.0.0.1", store.port, 2).start()
    try:
        time.sleep(3 * INTERVAL)
        ranks.dogs[1].close(ok=False)  # rank 1's stage raised (a full disk, say) and says so before it exits
        error = ranks.dogs[0].explain(RuntimeError("gloo: Connection closed by peer"))
        assert "global rank 1 (node node-1) stopped with an error" in str(error)
    finally:
        ranks.stop()


def new_store():
    return torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                      timeout=timedelta(seconds=30))  # fmt: skip


@pytest.fixture
def store():
    yield new_store()


@pytest.mark.parametrize("ok", [True, False])
def test_the_ranks_agree_on_rank_zeros_outcome(store, ok):
    """Every rank waits for rank zero's outcome; a failed rank zero fails the others (with a message where it is
    not shown already); rank zero waits until the others have read it."""
    ranks = Ranks("127.0.0.1", store.port, 3)
    for dog, host in zip(ranks.dogs, ("node-a", "node-a", "node-b"), strict=True):
        dog.hostname = dog._hosts[dog.rank] = host
    ranks.start()
    results: dict[int, str] = {}

    def close(rank: int) -> None:
        try:
            ranks.dogs[rank].close(ok=ok if rank == 0 else True)
            results[rank] = "returned"
        except StageError as exc:
            results[rank] = f"StageError: {exc}"

    try:
        threads = [threading.Thread(target=close, args=(r,)) for r in (1, 2)]
        for t in threads:
            t.start()
        time.sleep(5 * INTERVAL)
        assert not results  # waiting for rank zero
        close(0)
        for t in threads:
            t.join(timeout=10)
        assert store.add("pipeline-liveness/0/acks", 0) == 2
        assert not ranks.ended
        if ok:
            assert results == {0: "returned", 1: "returned", 2: "returned"}
        else:
            assert results[0] == "returned"
            assert results[1] == "StageError: "  # on rank zero's node its own message says it all
            assert results[2].startswith("StageError: global rank 0 (node node-a) failed, so this run failed")
    finally:
        ranks.stop()


def test_sigterm_ends_a_process_whose_stage_does_not_act_on_it(store, capsys):
    """The main thread blocked in a collective with a dead peer never runs the handler: the watchdog, told through
    the wakeup file descriptor, ends the process as interrupted after its grace."""
    ended: list[int] = []
    dog = Watchdog("127.0.0.1", store.port, 0, 2, INTERVAL, 100.0, exit=ended.append, hostname="node-0")
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a handler that returns: the stage goes on
    try:
        dog.start()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not ended and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ended == [143]
        assert "interrupted by SIGTERM" in capsys.readouterr().err
    finally:
        dog.stop()
        signal.signal(signal.SIGTERM, previous)


def test_communication_errors_are_recognised():
    assert is_communication_error(RuntimeError("[gloo/transport/tcp/pair.cc:598] Connection closed by peer"))
    assert is_communication_error(torch.distributed.DistBackendError("NCCL watchdog"))
    wrapped = RuntimeError("step failed")
    wrapped.__cause__ = ConnectionResetError("reset")
    assert is_communication_error(wrapped)
    assert not is_communication_error(RuntimeError("shape mismatch"))
    assert not is_communication_error(KeyError("x"))
