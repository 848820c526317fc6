"""The stage every step of the pipeline is, and the control frames no transport sees."""

from __future__ import annotations

from realtime.frames import (
    CancelResponse,
    CommitTurn,
    DiscardTurn,
    Frame,
    ReleaseResponse,
    ReviseTurn,
    StartResponse,
)

CONTROL_FRAMES = (
    StartResponse,
    ReleaseResponse,
    CancelResponse,
    CommitTurn,
    DiscardTurn,
    ReviseTurn,
)


class Stage:
    def __init__(self) -> None:
        self.next: Stage | None = None

    async def process(self, frame: Frame) -> None:
        await self.push(frame)

    async def push(self, frame: Frame) -> None:
        if self.next is not None:
            await self.next.process(frame)
