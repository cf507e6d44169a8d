"""The chat page served at ``/``: one HTML file, no build step, nothing fetched from a CDN.

It keeps the conversation in the page, sends it to ``/v1/chat/completions`` with
``stream=true``, reads the server-sent events with ``fetch`` + a stream reader, appends
each piece as it arrives and shows tokens per second (one event = one token).
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Chat with __MODEL__</title>
<style>
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0; color: #1f2328;
       display: flex; flex-direction: column; height: 100vh; }
header { padding: .6rem 1rem; border-bottom: 1px solid #d0d7de; display: flex; gap: 1rem; align-items: center; }
header h1 { font-size: 1.1rem; margin: 0; flex: 1; }
header label { font-size: .85rem; color: #59636e; }
header input { width: 4rem; }
#messages { flex: 1; overflow-y: auto; padding: 1rem; }
.msg { max-width: 48rem; margin: .4rem auto; padding: .5rem .8rem; border-radius: 8px; white-space: pre-wrap;
       word-break: break-word; }
.user { background: #ddf4ff; } .assistant { background: #f6f8fa; } .error { background: #ffebe9; }
form { display: flex; gap: .5rem; padding: .8rem 1rem; border-top: 1px solid #d0d7de; }
#input { flex: 1; font: inherit; padding: .5rem; resize: vertical; }
button { font: inherit; padding: .5rem 1rem; }
#stats { font-size: .85rem; color: #59636e; min-width: 12rem; text-align: right; }
</style>
</head>
<body>
<header>
  <h1>Chat with <code id="model">__MODEL__</code></h1>
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.7"></label>
  <label>max tokens <input id="max-tokens" type="number" min="1" step="1" value="128"></label>
  <button id="reset" type="button">New chat</button>
  <span id="stats"></span>
</header>
<div id="messages" aria-live="polite"></div>
<form id="form">
  <textarea id="input" rows="2" placeholder="Ask something (Enter to send, Shift+Enter for a new line)"></textarea>
  <button id="send" type="submit">Send</button>
</form>
<script>
"use strict";
const model = document.getElementById("model").textContent;
const box = document.getElementById("messages");
const input = document.getElementById("input");
const send = document.getElementById("send");
const stats = document.getElementById("stats");
let history = [];
let busy = false;

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  box.appendChild(div);
  box.scrollTop = box.scrollHeight;
  return div;
}

document.getElementById("reset").onclick = () => { history = []; box.textContent = ""; stats.textContent = ""; };
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); document.getElementById("form").requestSubmit(); }
});

document.getElementById("form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = input.value.trim();
  if (!text || busy) return;
  busy = true; send.disabled = true; input.value = "";
  history.push({role: "user", content: text});
  bubble("user", text);
  const out = bubble("assistant", "");
  out.dataset.done = "false";
  let tokens = 0, first = null, answer = "";
  const t0 = performance.now();
  try {
    const ask = () => fetch("/v1/chat/completions", {
      method: "POST",
      headers: Object.assign({"Content-Type": "application/json"},
                             localStorage.getItem("apiKey") ? {"Authorization": "Bearer " + localStorage.getItem("apiKey")} : {}),
      body: JSON.stringify({model, messages: history, stream: true,
                            temperature: parseFloat(document.getElementById("temperature").value),
                            max_tokens: parseInt(document.getElementById("max-tokens").value, 10)}),
    });
    let resp = await ask();
    if (resp.status === 401) {  // the server has an API key: ask for it once, keep it in this browser
      const key = window.prompt("This server needs an API key");
      if (key) { localStorage.setItem("apiKey", key); resp = await ask(); }
    }
    if (!resp.ok) {
      const err = await resp.json().catch(() => ({error: {message: resp.statusText}}));
      throw new Error(err.error ? err.error.message : resp.statusText);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\\n\\n")) >= 0) {
        const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const delta = JSON.parse(data).choices[0].delta;
        if (delta && delta.content) {
          if (first === null) first = performance.now();
          tokens += 1; answer += delta.content; out.textContent = answer;
          const secs = (performance.now() - (first || t0)) / 1000;
          stats.textContent = tokens + " tokens, " + (secs > 0 ? (tokens / secs).toFixed(1) : "-") + " tok/s";
          box.scrollTop = box.scrollHeight;
        }
      }
    }
    history.push({role: "assistant", content: answer});
    const total = (performance.now() - t0) / 1000;
    stats.textContent = tokens + " tokens in " + total.toFixed(2) + " s, " +
      (total > 0 ? (tokens / total).toFixed(1) : "-") + " tok/s";
  } catch (err) {
    out.className = "msg error"; out.textContent = "error: " + err.message;
    history.pop();
  } finally {
    out.dataset.done = "true"; busy = false; send.disabled = false; input.focus();
  }
});
</script>
</body>
</html>
"""
