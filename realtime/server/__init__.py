"""The network front ends: WebRTC for browsers, the OpenAI-Realtime-compatible WebSocket
API, Twilio Media Streams, plus ``/healthz`` and ``/metrics``, all in one aiohttp app."""
