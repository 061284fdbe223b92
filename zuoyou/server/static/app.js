// zuoyou web page: chat with image upload and drawing with live previews, over the /v1 API.
"use strict";
const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
keyInput.value = localStorage.getItem("zuoyou-key") || "";
keyInput.addEventListener("change", () => localStorage.setItem("zuoyou-key", keyInput.value));
let info = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

async function errorText(resp) {
  try { const j = await resp.json(); return (j.error && j.error.message) || JSON.stringify(j); }
  catch (e) { return resp.status + " " + resp.statusText; }
}

// Server-sent events from a fetch() response: yields each parsed `data:` object until [answered].
async function* sseEvents(resp) {
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const obj = JSON.parse(data);
      if (obj.error) throw new Error(obj.error.message);
      yield obj;
    }
  }
}

async function refreshStatus() {
  try {
    const r = await fetch("/health");
    info = await r.json();
    const b = info.batcher;
    $("status").textContent = `${info.model} · draws ${info.image_size}×${info.image_size} · queue ${b.queued}` +
      ` · batches: ${b.image_batches} drawing, ${b.chat_batches} chat` + (info.auth ? " · key required" : "");
    document.body.dataset.model = info.model;
    document.body.dataset.ready = "1";
  } catch (e) {
    $("status").textContent = "server unreachable";
  }
}

// ------------------------------------------------------------------------------------ chat
let history = [];
let pending = []; // data URIs attached to the next message

function bubble(role, text, images) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  for (const src of images || []) {
    const img = document.createElement("img");
    img.src = src;
    div.appendChild(img);
  }
  const span = document.createElement("span");
  span.textContent = text;
  div.appendChild(span);
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return span;
}

function readAsDataURL(file) {
  return new Promise((ok, fail) => {
    const r = new FileReader();
    r.onload = () => ok(r.result);
    r.onerror = () => fail(r.error);
    r.readAsDataURL(file);
  });
}

$("chat-image").addEventListener("change", async (ev) => {
  for (const f of ev.target.files) pending.push(await readAsDataURL(f));
  ev.target.value = "";
  $("attachments").replaceChildren(...pending.map((src) => Object.assign(document.createElement("img"), { src })));
});

$("chat-clear").addEventListener("click", () => {
  history = [];
  pending = [];
  $("messages").replaceChildren();
  $("attachments").replaceChildren();
});

$("chat-input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("chat-form").requestSubmit(); }
});

$("chat-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text && !pending.length) return;
  const content = [...pending.map((url) => ({ type: "image_url", image_url: { url } })), { type: "text", text }];
  bubble("user", text, pending);
  history.push({ role: "user", content });
  pending = [];
  $("attachments").replaceChildren();
  $("chat-input").value = "";
  const out = bubble("assistant", "");
  $("chat-send").disabled = true;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(),
      body: JSON.stringify({ model: info ? info.model : "zuoyou", messages: history, stream: true,
        max_tokens: Number($("chat-max").value) || 256, temperature: Number($("chat-temp").value) || 0 }),
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    for await (const chunk of sseEvents(resp)) {
      const d = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (d && d.content) out.textContent += d.content;
    }
    history.push({ role: "assistant", content: out.textContent });
  } catch (e) {
    history.pop();
    out.parentElement.classList.add("error");
    out.textContent = "error: " + e.message;
  } finally {
    $("chat-send").disabled = false;
    document.body.dataset.answered = String(Number(document.body.dataset.answered || 0) + 1);
    refreshStatus();
  }
});

// ------------------------------------------------------------------------------------ drawing
$("draw-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const prompt = $("draw-prompt").value.trim();
  if (!prompt) return;
  const n = Number($("draw-n").value) || 1;
  const body = { model: info ? info.model : "zuoyou", prompt, n, stream: true, response_format: "b64_json",
    partial_images: Number($("draw-partial").value) || 0 };
  for (const [k, id] of [["cfg", "draw-cfg"], ["temperature", "draw-temp"], ["seed", "draw-seed"]]) {
    if ($(id).value !== "") body[k] = Number($(id).value);
  }
  const figs = [];
  for (let i = 0; i < n; i++) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    const cap = document.createElement("figcaption");
    cap.textContent = prompt + " · drawing…";
    fig.append(img, cap);
    $("gallery").prepend(fig);
    figs.push({ img, cap });
  }
  $("draw-go").disabled = true;
  $("draw-progress").value = 0;
  try {
    const resp = await fetch("/v1/images/generations", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!resp.ok) throw new Error(await errorText(resp));
    for await (const e of sseEvents(resp)) {
      const f = figs[e.index || 0];
      f.img.src = "data:image/png;base64," + e.b64_json;
      if (e.type === "image_generation.partial_image") {
        $("draw-progress").value = e.rows_done / e.rows_total;
        document.body.dataset.previews = String(Number(document.body.dataset.previews || 0) + 1);
        f.cap.textContent = `${prompt} · ${e.rows_done}/${e.rows_total} rows`;
      } else {
        $("draw-progress").value = 1;
        f.cap.textContent = prompt;
      }
    }
  } catch (e) {
    for (const f of figs) { f.cap.textContent = "error: " + e.message; f.cap.classList.add("error"); }
  } finally {
    $("draw-go").disabled = false;
    document.body.dataset.drawn = String(Number(document.body.dataset.drawn || 0) + 1);
    refreshStatus();
  }
});

// Links can start a task: /?draw=a+red+circle (with &n=2&seed=1) or /?ask=Describe+the+image
(async () => {
  await refreshStatus();
  const q = new URLSearchParams(location.search);
  for (const k of ["n", "seed", "cfg"]) if (q.has(k)) $("draw-" + k).value = q.get(k);
  if (q.get("draw")) { $("draw-prompt").value = q.get("draw"); $("draw-form").requestSubmit(); }
  if (q.get("ask")) { $("chat-input").value = q.get("ask"); $("chat-form").requestSubmit(); }
})();
