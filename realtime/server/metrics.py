"""Prometheus metrics of one server (a registry per app, so test servers don't collide)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from realtime.frames import TurnMetrics

LATENCY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.92, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0)


@dataclass
class ServerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.sessions_active = Gauge(
            "agent_sessions_active", "Sessions open now", ["transport"], registry=r
        )
        self.sessions_total = Counter(
            "agent_sessions", "Sessions opened", ["transport"], registry=r
        )
        self.sessions_rejected = Counter(
            "agent_sessions_rejected",
            "Sessions refused, by reason: max_sessions, key_limit (max_sessions_per_key), "
            "engine_busy (no free engine cache slot), shutting_down (draining after SIGTERM)",
            ["reason"],
            registry=r,
        )
        self.sessions_ended = Counter(
            "agent_sessions_ended_by_server",
            "Sessions the server ended, by reason: session_expired (max_session_s), "
            "idle_timeout (idle_timeout_s), server_shutting_down (SIGTERM)",
            ["reason"],
            registry=r,
        )
        self.engine_stats = Gauge(
            "agent_engine",
            "What the engine holds now: sessions, lanes_in_use (decode lanes answering), "
            "kv_slots_total / kv_slots_used (cache sequences: a session, its speaking fork), "
            "kv_pages_total / kv_pages_used (the KV pool's pages), kv_positions_used "
            "(cache positions written, all sequences together)",
            ["stat"],
            registry=r,
        )
        self.engine_events = Gauge(
            "agent_engine_events",
            "Engine events since start: sessions_refused (no free cache slot), "
            "think_first_fallbacks (no slot or pages for the speaking fork: the answer thought "
            "first), kv_pool_full (a pre-fill found no free KV page: that session was busy)",
            ["event"],
            registry=r,
        )
        self.turns = Counter("agent_turns", "Finished turns", ["transport"], registry=r)
        self.interrupted = Counter(
            "agent_turns_interrupted", "Turns cut by a barge-in", ["transport"], registry=r
        )
        self.first_packet = Histogram(
            "agent_first_packet_seconds",
            "First audio packet minus the end of the user's speech (target 0.92 s)",
            ["transport"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.client_errors = Counter(
            "agent_client_errors",
            "Bad client input answered with an error",
            ["transport", "code"],
            registry=r,
        )

    def observe_turn(self, transport: str, frame: TurnMetrics) -> None:
        self.turns.labels(transport).inc()
        if frame.interrupted:
            self.interrupted.labels(transport).inc()
        if frame.first_packet_s is not None:
            self.first_packet.labels(transport).observe(frame.first_packet_s)

    def render(
        self,
        engine_counters: dict[str, int] | None = None,
        engine_stats: dict[str, int] | None = None,
    ) -> bytes:
        for event, n in (engine_counters or {}).items():
            self.engine_events.labels(event).set(n)
        for stat, n in (engine_stats or {}).items():
            self.engine_stats.labels(stat).set(n)
        return generate_latest(self.registry)
