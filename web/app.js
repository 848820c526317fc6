// The browser side of the voice agent: WebRTC audio both ways, events on a data channel.
"use strict";

const TARGET_S = 0.92;
const $ = (id) => document.getElementById(id);

const ui = {
  talk: $("talk"), talkLabel: $("talk-label"), status: $("status"), toast: $("toast"),
  user: $("user-transcript"), answer: $("agent-answer"), thinking: $("agent-thinking"),
  thinkingPanel: $("thinking-panel"), thinkingCount: $("thinking-count"),
  history: $("history"), micLevel: $("mic-level"), agentLevel: $("agent-level"),
  agentAudio: $("agent-audio"), audioEl: $("agent-audio-el"), chart: $("latency-chart"),
  last: $("latency-last"), p50: $("latency-p50"), turns: $("latency-turns"),
};

const state = {
  pc: null, dc: null, stream: null, ctx: null, raf: 0, statsTimer: 0,
  micAnalyser: null, agentAnalyser: null,
  latencies: [], freshAnswer: true, thinkingChars: 0,
  speechMs: 0, lastTick: 0,
};

// What the tests and curious people can read: audio and events received so far.
window.voiceAgent = { events: [], audio: { packets: 0, bytes: 0, energy: 0, speechMs: 0 } };

function setStatus(text, kind) {
  ui.status.textContent = text;
  ui.status.className = `pill ${kind}`;
}

function toast(message) {
  ui.toast.textContent = message;
  ui.toast.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { ui.toast.hidden = true; }, 6000);
}

function setText(el, text, cls) {
  el.textContent = text;
  el.className = cls || "";
}

// ---- events from the server --------------------------------------------------------------
function onEvent(ev) {
  window.voiceAgent.events.push(ev);
  switch (ev.event) {
    case "speech_started":
      setText(ui.user, "…", "partial");
      setStatus("Listening", "listening");
      break;
    case "speech_stopped":
      state.freshAnswer = true;
      setStatus("Thinking", "thinking");
      break;
    case "transcript":
      setText(ui.user, ev.text || "…", ev.final ? "" : "partial");
      break;
    case "thinking":
      startAnswer();
      state.thinkingChars += ev.text.length;
      ui.thinking.className = "";
      ui.thinking.append(ev.text);
      ui.thinkingCount.textContent = `${state.thinkingChars} chars`;
      break;
    case "tool_call":
      startAnswer();
      addToolLine("tool-call", `→ ${ev.name}(${ev.arguments})`);
      setStatus("Calling a tool", "thinking");
      break;
    case "tool_result":
      // the answer from this result comes next: the call and its result stay above it
      state.freshAnswer = false;
      setText(ui.answer, "", "");
      addToolLine("tool-result", `← ${ev.name}: ${ev.output}`);
      break;
    case "answer":
      startAnswer();
      ui.answer.className = "";
      ui.answer.textContent += ev.text;
      setStatus("Speaking", "speaking");
      break;
    case "interrupted":
      ui.answer.textContent += " — (interrupted)";
      setStatus("Listening", "listening");
      break;
    case "turn":
      addTurn(ev);
      state.freshAnswer = true;
      setStatus("Your turn", "listening");
      break;
    case "error":
      toast(`${ev.code}: ${ev.message}`);
      if (SERVER_CLOSES.has(ev.code)) { stop(); setStatus("Session ended by the server", "error"); }
      break;
    default:
      break;
  }
}

// Tool calls and the results sent back, as lines of their own in the reasoning panel.
function addToolLine(cls, text) {
  if (ui.thinking.classList.contains("placeholder")) setText(ui.thinking, "", "");
  const line = document.createElement("span");
  line.className = `tool-line ${cls}`;
  line.textContent = text;
  ui.thinking.append(line);
  ui.thinkingPanel.open = true;
}

// the server ends the session after these (docs/server.md, Limits and Shutdown)
const SERVER_CLOSES = new Set(["session_expired", "idle_timeout", "server_shutting_down"]);

function startAnswer() {
  if (!state.freshAnswer) return;
  state.freshAnswer = false;
  setText(ui.answer, "", "");
  setText(ui.thinking, "", "");
  state.thinkingChars = 0;
  ui.thinkingCount.textContent = "";
}

function addTurn(ev) {
  const li = document.createElement("li");
  const fp = ev.first_packet_s;
  li.className = fp == null ? "" : fp <= TARGET_S ? "fast" : "slow";
  const q = document.createElement("div");
  q.className = "q";
  q.textContent = ev.transcript ? `“${ev.transcript}”` : "(no words)";
  const a = document.createElement("div");
  a.className = "a";
  a.textContent = (ev.interrupted ? ev.spoken + " …(interrupted)" : ev.answer) || "";
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = fp == null ? `turn ${ev.turn}` : `turn ${ev.turn} · first sound after ${fp.toFixed(2)} s`;
  li.append(q, a, meta);
  ui.history.prepend(li);
  if (fp != null) {
    state.latencies.push(fp);
    // For page scripts: declare tools, return a tool's output, ask for the answer from it.
window.voiceAgent.send = (command) => {
  if (!state.dc || state.dc.readyState !== "open") throw new Error("not connected");
  state.dc.send(JSON.stringify(command));
};

drawLatency();
  }
}

// ---- latency chart (SVG, no libraries) ---------------------------------------------------
function drawLatency() {
  const svg = ui.chart;
  const W = 320, H = 140, L = 30, R = 8, T = 10, B = 20;
  const data = state.latencies.slice(-24);
  const max = Math.max(1.5, ...data.map((v) => v * 1.1));
  const y = (v) => T + (H - T - B) * (1 - v / max);
  const ns = "http://www.w3.org/2000/svg";
  const el = (name, attrs, text) => {
    const e = document.createElementNS(ns, name);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text != null) e.textContent = text;
    svg.appendChild(e);
    return e;
  };
  svg.replaceChildren();
  for (const tick of [0, 0.5, 1.5, 2, 3, 4, 5].filter((t) => t <= max)) {
    el("line", { x1: L, x2: W - R, y1: y(tick), y2: y(tick), stroke: "#2a3150", "stroke-width": 1 });
    el("text", { x: L - 4, y: y(tick) + 3, "text-anchor": "end" }, `${tick}s`);
  }
  if (!data.length) {
    el("text", { x: (L + W) / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "no turns yet");
  }
  const slot = (W - L - R) / Math.max(data.length, 8);
  data.forEach((v, i) => {
    const x = L + i * slot + slot * 0.18;
    const bar = el("rect", {
      x, y: y(v), width: slot * 0.64, height: Math.max(1, y(0) - y(v)), rx: 2,
      class: `bar ${v <= TARGET_S ? "ok" : "slow"}`,
    });
    const title = document.createElementNS(ns, "title");
    title.textContent = `turn ${state.latencies.length - data.length + i + 1}: ${v.toFixed(3)} s`;
    bar.appendChild(title);
  });
  el("line", { x1: L, x2: W - R, y1: y(TARGET_S), y2: y(TARGET_S), class: "target" });
  el("text", { x: W - R - 2, y: y(TARGET_S) - 4, "text-anchor": "end" }, "0.92 s target");
  const sorted = [...state.latencies].sort((a, b) => a - b);
  const last = state.latencies[state.latencies.length - 1];
  ui.last.textContent = last == null ? "–" : `${last.toFixed(2)} s`;
  ui.p50.textContent = sorted.length ? `${sorted[Math.floor((sorted.length - 1) / 2)].toFixed(2)} s` : "–";
  ui.turns.textContent = String(state.latencies.length);
}

// ---- audio meters ------------------------------------------------------------------------
function level(analyser) {
  if (!analyser) return 0;
  const buf = new Float32Array(analyser.fftSize);
  analyser.getFloatTimeDomainData(buf);
  let sum = 0;
  for (const v of buf) sum += v * v;
  return Math.sqrt(sum / buf.length);
}

function tick(now) {
  const mic = level(state.micAnalyser);
  const agent = level(state.agentAnalyser);
  ui.micLevel.style.width = `${Math.min(100, mic * 400)}%`;
  ui.agentLevel.style.width = `${Math.min(100, agent * 400)}%`;
  if (state.lastTick && agent > 0.01) {
    state.speechMs += now - state.lastTick;
    window.voiceAgent.audio.speechMs = state.speechMs;
  }
  state.lastTick = now;
  state.raf = requestAnimationFrame(tick);
}

async function pollStats() {
  if (!state.pc) return;
  const stats = await state.pc.getStats();
  stats.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "audio") {
      const a = window.voiceAgent.audio;
      a.packets = s.packetsReceived || 0;
      a.bytes = s.bytesReceived || 0;
      a.energy = s.totalAudioEnergy || 0;
    }
  });
  const a = window.voiceAgent.audio;
  ui.agentAudio.textContent = a.packets
    ? `Agent audio: ${a.packets} packets received, ${(state.speechMs / 1000).toFixed(1)} s of speech heard`
    : "No agent audio yet";
}

// ---- connection --------------------------------------------------------------------------
function waitIceGathering(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState === "complete") {
        pc.removeEventListener("icegatheringstatechange", done);
        resolve();
      }
    };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, 3000); // host candidates are enough on a LAN
  });
}

// ---- access ------------------------------------------------------------------------------
// A server with API keys wants a key or a short-lived client secret on /offer. The page never
// holds more than this tab's key: from the address's fragment (`/#key=...`, which browsers do
// not send to the server, so it stays out of its logs) or a prompt. It trades the key for a
// client secret (POST /v1/realtime/client_secrets) at each start and offers with the secret.
// A server without keys hands out a secret to anyone, which it then does not check.
const KEY_ITEM = "voiceAgentKey";

function apiKey() {
  const m = location.hash.match(/(?:^#|&)key=([^&]+)/);
  if (m) {
    sessionStorage.setItem(KEY_ITEM, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem(KEY_ITEM);
}

async function clientSecret() {
  for (let attempt = 0; attempt < 3; attempt++) {
    const key = apiKey();
    const headers = { "Content-Type": "application/json" };
    if (key) headers.Authorization = `Bearer ${key}`;
    const r = await fetch("/v1/realtime/client_secrets", { method: "POST", headers, body: "{}" });
    if (r.ok) return (await r.json()).value;
    if (r.status !== 401) throw new Error(`client secret: HTTP ${r.status}`);
    sessionStorage.removeItem(KEY_ITEM);
    const typed = window.prompt(key ? "That API key was refused. API key:" : "This server needs an API key:");
    if (!typed || !typed.trim()) break;
    sessionStorage.setItem(KEY_ITEM, typed.trim());
  }
  throw new Error("This server needs a valid API key (open the page as /#key=YOUR_KEY).");
}

async function start() {
  setStatus("Connecting", "thinking");
  const secret = await clientSecret();
  state.stream = await navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
  });
  state.ctx = new AudioContext();
  await state.ctx.resume();
  state.micAnalyser = state.ctx.createAnalyser();
  state.micAnalyser.fftSize = 1024;
  state.ctx.createMediaStreamSource(state.stream).connect(state.micAnalyser);

  const pc = new RTCPeerConnection();
  state.pc = pc;
  state.stream.getAudioTracks().forEach((t) => pc.addTrack(t, state.stream));
  state.dc = pc.createDataChannel("events");
  state.dc.onmessage = (e) => onEvent(JSON.parse(e.data));
  pc.ontrack = (e) => {
    const remote = e.streams[0] || new MediaStream([e.track]);
    ui.audioEl.srcObject = remote;
    ui.audioEl.play().catch(() => {});
    state.agentAnalyser = state.ctx.createAnalyser();
    state.agentAnalyser.fftSize = 1024;
    state.ctx.createMediaStreamSource(remote).connect(state.agentAnalyser);
  };
  pc.onconnectionstatechange = () => {
    if (pc.connectionState === "connected") setStatus("Your turn", "listening");
    if (pc.connectionState === "failed") { setStatus("Connection failed", "error"); stop(); }
  };
  await pc.setLocalDescription(await pc.createOffer());
  await waitIceGathering(pc);
  const response = await fetch("/offer", {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${secret}` },
    body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type }),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
  await pc.setRemoteDescription(body);
  state.raf = requestAnimationFrame(tick);
  state.statsTimer = setInterval(pollStats, 500);
}

function stop() {
  cancelAnimationFrame(state.raf);
  clearInterval(state.statsTimer);
  if (state.pc) state.pc.close();
  if (state.stream) state.stream.getTracks().forEach((t) => t.stop());
  if (state.ctx) state.ctx.close();
  Object.assign(state, { pc: null, dc: null, stream: null, ctx: null, micAnalyser: null, agentAnalyser: null });
  ui.micLevel.style.width = "0%";
  ui.agentLevel.style.width = "0%";
  ui.talk.setAttribute("aria-pressed", "false");
  ui.talkLabel.textContent = "Start talking";
  setStatus("Not connected", "idle");
}

ui.talk.addEventListener("click", async () => {
  if (state.pc) { stop(); return; }
  ui.talk.setAttribute("aria-pressed", "true");
  ui.talkLabel.textContent = "Stop";
  try {
    await start();
  } catch (err) {
    stop();
    setStatus("Not connected", "error");
    toast(err.name === "NotAllowedError" ? "The microphone was not allowed." : String(err.message || err));
  }
});

$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = $("ask-text");
  const text = input.value.trim();
  if (!text) return;
  if (!state.dc || state.dc.readyState !== "open") {
    toast("Press “Start talking” first: typed questions are answered out loud too.");
    return;
  }
  state.dc.send(JSON.stringify({ type: "text", text }));
  setText(ui.user, text, "");
  state.freshAnswer = true;
  setStatus("Thinking", "thinking");
  input.value = "";
});

// For page scripts: declare tools, return a tool's output, ask for the answer from it.
window.voiceAgent.send = (command) => {
  if (!state.dc || state.dc.readyState !== "open") throw new Error("not connected");
  state.dc.send(JSON.stringify(command));
};

drawLatency();
