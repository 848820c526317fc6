"""The stages of a session, in data-path order:

    TurnDetector -> ListenerStage -> (TurnController) -> Responder -> Speaker -> Output -> sink

Each stage transforms the frames it cares about and pushes frames downstream; none calls back
into another stage or the session. The turn controller (``realtime.controller``) decides what
to answer and when; it steers the stages below it with control frames. The output stage, the
last one, reports what really went out to an observer (the controller). Long work
(recognition, decoding, synthesis) runs in tasks that push frames when results arrive; its
blocking parts run on threads, never on the loop.
"""

from realtime.stages.base import CONTROL_FRAMES, Stage
from realtime.stages.detector import TurnDetector
from realtime.stages.listening import ListenerStage
from realtime.stages.output import Output, OutputObserver
from realtime.stages.responder import EngineLink, Responder
from realtime.stages.speaker import Speaker

__all__ = [
    "CONTROL_FRAMES",
    "EngineLink",
    "ListenerStage",
    "Output",
    "OutputObserver",
    "Responder",
    "Speaker",
    "Stage",
    "TurnDetector",
]
