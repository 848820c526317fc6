"""``engine.tensor_parallel: 2`` on the CPU (gloo): the Step-Audio engine over the tiny
checkpoint, its decoder split over rank 0 (this process) and one follower process, answers
with the tokens of the whole decoder in one process: a typed turn, one too long for the
context, a spoken turn pre-filled while listening (thinking and speaking lanes), two sessions
answering at once, a turn on top of the history, think-first with a forced answer. The
follower's lanes, tokens and pages stay rank 0's after every call, sampled tokens are rank
0's, bad world sizes are clear errors, and the follower is gone after ``close`` and when rank
0 dies; rank 0 hears at once of a follower that dies."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from step_audio_fixtures import (
    cpu_engine,
    heard,
    listen_in_pieces,
    speechlike,
    write_tiny_checkpoint,
)

from realtime.config import EngineConfig, SamplingConfig
from realtime.engine import build_engine
from realtime.engine.base import CancelToken, EngineBusy, TokenEvent, UserTurn
from realtime.engine.step_audio import StepAudioEngine, StepAudioOptions
from realtime.models.tp_runner import runner_state

# every rank's lanes, next tokens and pages are compared after each mirrored call: a call left
# out of the mirror fails there (RanksDiverged), not as mismatched collectives later
TP_OPTS = StepAudioOptions(tp_timeout_s=60.0, tp_check=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tp-engine"), seed=3)


def _engine(ckpt: Path, world: int) -> StepAudioEngine:
    kw = {"opts": TP_OPTS} if world > 1 else {}
    return cpu_engine(ckpt, max_batch=4, threads=1, tensor_parallel=world, **kw)


def _round_robin(*its: Iterator[TokenEvent | None]) -> None:
    """Advance the answers one item at a time in turn, as the engine worker does."""
    live = list(its)
    while live:
        for it in list(live):
            if next(it, StopIteration) is StopIteration:
                live.remove(it)


def _conversation(engine: StepAudioEngine) -> dict[str, list[tuple[str, int]]]:
    """Every token each answer was fed (lane role, id), through the paths that touch the
    runner and the pages: typed, one too long for the context, spoken (listened in pieces, a thinking and a speaking lane),
    a turn on the committed history, two answers sharing each step."""
    got: dict[str, list[tuple[str, int]]] = {}

    def session(name: str, budget: int, n: int):  # noqa: ANN202
        s = engine.new_session("sys", SamplingConfig(think_budget=budget, max_new_tokens=n))
        s.on_token = lambda role, tok, t: got.setdefault(name, []).append((role, tok))
        return s

    a = session("typed", 0, 8)
    list(a.respond(UserTurn(text="hello"), CancelToken()))
    a.commit(UserTurn(text="hello"), "Hi you", interrupted=False)
    long = session("too-long", 0, 8)  # fails on every rank alike; the others go on
    with pytest.raises(EngineBusy, match="context full"):
        list(long.respond(UserTurn(text="hello the you " * 200), CancelToken()))
    long.close()
    b = session("spoken", 4, 10)
    audio = speechlike(1.2, seed=1)
    listen_in_pieces(b, audio, piece=0.16)  # pre-filled while listening
    list(b.respond(heard(b, audio), CancelToken()))
    b.close()
    a.on_token = lambda role, tok, t: got.setdefault("history", []).append((role, tok))
    a.listen(speechlike(0.7, seed=2))
    list(a.respond(UserTurn(), CancelToken()))  # on top of the first turn
    a.close()
    c, d = session("both-c", 0, 9), session("both-d", 3, 6)
    for s, seed in ((c, 4), (d, 5)):
        listen_in_pieces(s, speechlike(1.0, seed=seed), piece=0.16)
    _round_robin(c.respond(UserTurn(), CancelToken()), d.respond(UserTurn(), CancelToken()))
    c.close()
    d.close()
    return got


def _state(engine: StepAudioEngine) -> dict[str, object]:
    return runner_state(engine.runner._runner, engine.cache._cache)  # type: ignore[union-attr]


def _follower_state(engine: StepAudioEngine) -> dict[str, object]:
    assert engine.followers is not None
    (stats,) = engine.followers.stats()
    return {k: stats[k] for k in _state(engine)}


def test_two_ranks_answer_with_the_tokens_of_one(ckpt: Path) -> None:
    expected = _conversation(_engine(ckpt, 1))
    assert set(expected) == {"typed", "spoken", "history", "both-c", "both-d"}
    assert {role for role, _ in expected["spoken"]} == {"formulation", "articulation"}
    assert len({tok for _, tok in expected["typed"]}) > 3  # not one token repeated

    engine = _engine(ckpt, 2)
    followers = engine.followers
    assert followers is not None and followers.world == 2
    try:
        assert engine.runner.leader is not None
        # rank 0 holds half the KV heads (2 -> 1): its pages, and the sizing, are per rank
        assert engine.model.decoder_cfg.num_key_value_heads == 1
        assert engine.cache.k[0].shape[-2] == 1 and followers.memory[1].weight_bytes > 0
        got = _conversation(engine)
        assert got == expected
        assert engine.runner.leader.commands > 50  # the calls went through the mirror
        # the follower holds what rank 0 holds: no lanes, the same pages
        assert _follower_state(engine) == _state(engine)

        # sampled tokens: rank 0's draw is every rank's (the follower's own draw would differ)
        s = engine.new_session("sys", SamplingConfig(temperature=1.5, top_k=50, max_new_tokens=30))
        it = s.respond(UserTurn(text="hello"), CancelToken())
        for _ in range(12):
            next(it)
        mid = _state(engine)
        assert len(mid["lanes"]) == 1 and mid["lanes"][0][2] == 1.5  # type: ignore[index]
        assert _follower_state(engine) == mid
        it.close()
        s.close()
    finally:
        engine.close()
    for proc in followers.procs:
        assert not proc.is_alive() and proc.exitcode == 0  # left its loop when told


def _think_first_forced(engine: StepAudioEngine) -> list[tuple[str, int]]:
    """Think first (one lane: ``</think>`` injected at the budget) with a forced answer (each
    next input forced): the runner's ``inject`` and ``force``, after a warm-up."""
    engine.warmup()
    got: list[tuple[str, int]] = []
    s = engine.new_session("sys", SamplingConfig(think_budget=3, max_new_tokens=6))
    s.on_token = lambda role, tok, t: got.append((role, tok))
    list(s.respond(UserTurn(text="hello"), CancelToken()))
    s.close()
    return got


def test_think_first_and_a_forced_answer_match_too(ckpt: Path) -> None:
    kw = {"forced_answer": "Hi hello the you", "max_batch": 2, "threads": 1}
    first = StepAudioOptions(speak_first=False)
    one = cpu_engine(ckpt, opts=first, **kw)
    expected = _think_first_forced(one)
    assert [role for role, _ in expected][:3] == ["formulation"] * 3
    assert "articulation" in {role for role, _ in expected}
    tp = dataclasses.replace(TP_OPTS, speak_first=False)
    engine = cpu_engine(ckpt, opts=tp, tensor_parallel=2, **kw)
    try:
        assert _think_first_forced(engine) == expected
    finally:
        engine.close()


def test_bad_world_sizes_are_clear_errors(ckpt: Path) -> None:
    with pytest.raises(ValueError, match="tensor_parallel 3.*divide"):
        _engine(ckpt, 3)  # 4 heads, 2 KV heads
    with pytest.raises(ValueError, match="tensor_parallel must be 1 or more"):
        _engine(ckpt, 0)
    with pytest.raises(ValueError, match="Step-Audio engine only"):
        build_engine(EngineConfig(backend="smollm2", tensor_parallel=2))
    with pytest.raises(ValueError, match="needs 2 GPUs from cuda:0"):
        _gpu_engine(ckpt)


def _gpu_engine(ckpt: Path) -> StepAudioEngine:
    from realtime.engine.step_audio import build_step_audio_engine

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has two GPUs")
    cfg = EngineConfig(backend="step-audio", model=str(ckpt), device="cuda:0", tensor_parallel=2)
    return build_step_audio_engine(cfg)


# Rank 0 starts its follower, then leaves it waiting inside a collective (a pre-fill whose
# embeddings are never broadcast), where only its parent watch can notice that rank 0 died.
RANK0 = """
import pickle, sys, time
import torch
sys.path.insert(0, {tests!r})
from step_audio_fixtures import cpu_engine
from realtime.engine.step_audio import StepAudioOptions
from realtime.models.tp_runner import TensorArg
engine = cpu_engine({ckpt!r}, threads=1, tensor_parallel=2, opts=StepAudioOptions(tp_timeout_s=60))
cmd = ("runner", "prefill", [TensorArg((4, 32), torch.float32), 0, 0], {{}})
engine.runner.leader.conns[0].send_bytes(pickle.dumps(cmd))
print(*engine.followers.pids, flush=True)
time.sleep(120)
"""


def test_followers_exit_when_rank_0_dies(ckpt: Path) -> None:
    tests = str(Path(__file__).parent)
    code = RANK0.format(tests=tests, ckpt=str(ckpt))
    rank0 = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        line = rank0.stdout.readline() if rank0.stdout else ""
        pids = [int(p) for p in line.split()]
        assert len(pids) == 1, line
        assert _alive(pids[0])
        time.sleep(0.5)  # the follower is in the broadcast
        assert _alive(pids[0])
        rank0.send_signal(signal.SIGKILL)  # no close, no atexit: the follower must notice
        rank0.wait(10)
        deadline = time.monotonic() + 15
        while _alive(pids[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pids[0])
    finally:
        if rank0.poll() is None:
            rank0.kill()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def test_rank_0_hears_of_a_dead_follower(ckpt: Path) -> None:
    """A follower that dies while the engine runs is reported at once (by default the process
    ends with a log line: rank 0 would otherwise wait for it in its next collective)."""
    engine = _engine(ckpt, 2)
    assert engine.followers is not None
    lost = threading.Event()
    seen: list[tuple[int, int | None]] = []
    engine.followers.on_lost = lambda rank, code: (seen.append((rank, code)), lost.set())
    try:
        os.kill(engine.followers.pids[0], signal.SIGKILL)
        assert lost.wait(15)
        assert seen == [(1, -signal.SIGKILL)]
    finally:
        engine.followers.close()


WATCHED = """
import sys, time
import multiprocessing as mp

def follower():
    from realtime.engine.step_audio.ranks import _exit_with_parent
    _exit_with_parent()
    time.sleep(120)  # deaf to its parent, as in a collective that NCCL never ends

if __name__ == "__main__":
    child = mp.get_context("spawn").Process(target=follower)
    child.start()
    print(child.pid, flush=True)
    time.sleep(120)
"""


def test_a_follower_busy_elsewhere_exits_with_its_parent(tmp_path: Path) -> None:
    """The parent watch alone ends a follower that is not reading its pipe (on NCCL a dead
    peer can leave it waiting in a collective for ever)."""
    script = tmp_path / "rank0.py"
    script.write_text(WATCHED)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline()) if parent.stdout else 0
        time.sleep(3)  # the child has imported the watch and started it
        assert _alive(pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid)
    finally:
        if parent.poll() is None:
            parent.kill()
