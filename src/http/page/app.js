// duet's chat page: talks to the server's own OpenAI API (/v1/models, streamed
// /v1/chat/completions) and /health, with nothing fetched from anywhere else.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = $("conversation");
const messages = [];
let running = null; // the AbortController of the answer being streamed
let conversationId = 0; // "New chat" starts another: a late answer must not join it

const keyField = $("api-key");
keyField.value = localStorage.getItem("duet.apiKey") || "";
keyField.addEventListener("change", () => {
  localStorage.setItem("duet.apiKey", keyField.value);
  loadModels();
});

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyField.value) h.Authorization = "Bearer " + keyField.value;
  return h;
}

function showError(text) {
  $("error").textContent = text || "";
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error?.message || response.statusText;
  } catch {
    return response.statusText;
  }
}

async function loadModels() {
  const select = $("model");
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    showError("Models: " + (await errorText(response)));
    return;
  }
  showError("");
  const { data } = await response.json();
  const chosen = select.value;
  select.replaceChildren(...data.map((m) => new Option(m.id, m.id)));
  if (chosen && data.some((m) => m.id === chosen)) select.value = chosen;
}

function mib(bytes) {
  return (bytes / 1048576).toFixed(0) + " MiB";
}

async function pollHealth() {
  try {
    const health = await (await fetch("/health")).json();
    const s = health.student;
    const memory = `memory ${mib(health.memory.rss_bytes)} of ${mib(health.memory.budget_bytes)}`;
    $("student").textContent = s
      ? `student: ${s.state}${s.reason ? " (" + s.reason + ")" : ""} · ${memory}`
      : `teacher only · ${memory}`;
  } catch {
    $("student").textContent = "server unreachable";
  }
}

// Markdown for answers: code blocks, inline code, bold, italics, headings, lists, links.
// Text is escaped first, so nothing a model writes becomes markup of its own.
function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function inline(text) {
  return text
    .replace(/`([^`]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>")
    .replace(/\[([^\]]+)\]\((https?:\/\/[^)\s]+)\)/g, '<a href="$2" rel="noopener noreferrer">$1</a>');
}

function markdown(source) {
  const out = [];
  const parts = source.split(/```/);
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const newline = part.indexOf("\n");
      const code = newline >= 0 ? part.slice(newline + 1) : part;
      out.push("<pre><code>" + escapeHtml(code) + "</code></pre>");
      return;
    }
    let list = null;
    for (const raw of escapeHtml(part).split("\n")) {
      const item = raw.match(/^\s*(?:[-*]|\d+\.)\s+(.*)$/);
      if (item) {
        if (!list) {
          list = /^\s*\d/.test(raw) ? "ol" : "ul";
          out.push(`<${list}>`);
        }
        out.push("<li>" + inline(item[1]) + "</li>");
        continue;
      }
      if (list) {
        out.push(`</${list}>`);
        list = null;
      }
      const heading = raw.match(/^(#{1,4})\s+(.*)$/);
      if (heading) out.push(`<h${heading[1].length + 2}>${inline(heading[2])}</h${heading[1].length + 2}>`);
      else if (raw.trim()) out.push("<p>" + inline(raw) + "</p>");
    }
    if (list) out.push(`</${list}>`);
  });
  return out.join("");
}

function addTurn(role, text) {
  const turn = document.createElement("div");
  turn.className = "turn " + role;
  if (role === "user") turn.textContent = text;
  else turn.innerHTML = markdown(text);
  conversation.append(turn);
  turn.scrollIntoView({ block: "end" });
  return turn;
}

function setRunning(controller) {
  running = controller;
  $("send").disabled = !!controller;
  $("stop").disabled = !controller;
}

async function send(text) {
  const conversationAtStart = conversationId;
  showError("");
  messages.push({ role: "user", content: text });
  addTurn("user", text);
  const turn = addTurn("assistant", "");
  const body = document.createElement("div");
  const meta = document.createElement("div");
  meta.className = "meta";
  turn.append(body, meta);
  const system = $("system").value.trim();
  const request = {
    model: $("model").value,
    stream: true,
    stream_options: { include_usage: true },
    messages: (system ? [{ role: "system", content: system }] : []).concat(messages),
  };
  const controller = new AbortController();
  setRunning(controller);
  const started = performance.now();
  let firstToken = null;
  let answer = "";
  let usage = null;
  let stopped = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(request),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    const backend = response.headers.get("x-duet-backend") || "?";
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (!event.startsWith("data: ")) continue; // keep-alive comments
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) {
          firstToken ??= performance.now();
          answer += delta;
          body.innerHTML = markdown(answer);
          turn.scrollIntoView({ block: "end" });
        }
      }
      meta.textContent = describe(backend, started, firstToken, usage);
    }
    meta.textContent = describe(backend, started, firstToken, usage);
  } catch (e) {
    if (e.name === "AbortError") {
      stopped = true;
      meta.textContent += " · stopped";
    } else {
      turn.classList.add("error");
      body.textContent = answer;
      showError(e.message);
    }
  } finally {
    setRunning(null);
    if (conversationId === conversationAtStart) {
      if (answer) messages.push({ role: "assistant", content: answer });
      else if (!stopped) messages.pop();
    }
    pollHealth();
  }
}

function describe(backend, started, firstToken, usage) {
  const parts = [backend];
  if (firstToken) parts.push(`first token ${Math.round(firstToken - started)} ms`);
  if (usage && firstToken) {
    const seconds = (performance.now() - firstToken) / 1000;
    if (usage.completion_tokens > 1 && seconds > 0) {
      parts.push(`${((usage.completion_tokens - 1) / seconds).toFixed(1)} tokens/s`);
    }
    parts.push(`${usage.completion_tokens} tokens`);
  }
  return parts.join(" · ");
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("message").value.trim();
  if (!text || running) return;
  $("message").value = "";
  send(text);
});

$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

// Stopping closes the connection: the server ends the generation at its next token.
$("stop").addEventListener("click", () => running?.abort());

$("clear").addEventListener("click", () => {
  running?.abort();
  conversationId += 1;
  messages.length = 0;
  conversation.replaceChildren();
  $("message").focus();
});

loadModels();
pollHealth();
setInterval(pollHealth, 5000);
$("message").focus();
