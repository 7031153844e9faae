// gpt2lab playground: one page over the server's OpenAI-style API. No build step, no dependencies.
//
// A completion streams in as Server-Sent Events from POST /v1/completions. Each chunk carries the
// text the server has just released and the tokens that text came from, each with its logprob and
// top-5 alternatives. The page draws one coloured span per token, taking the span's visible text
// from the released text (never from the token strings), so what is shown is exactly what the
// server generated, even where a token holds half of a UTF-8 character.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    prompt: $("prompt"),
    form: $("prompt-form"),
    generate: $("generate"),
    stop: $("stop"),
    more: $("continue"),
    settings: $("settings"),
    params: $("params"),
    stops: $("stop-strings"),
    key: $("api-key"),
    keyBox: $("key-box"),
    model: $("model"),
    error: $("error"),
    output: $("output"),
    stats: $("stats"),
    pop: $("popover"),
  };

  const BIN_EDGES = [0.01, 0.05, 0.2, 0.5, 0.8]; // the legend in index.html names these bins
  const KEY_STORE = "gpt2lab.apiKey";
  const TOP_N = 5;
  const tokenInfo = new WeakMap(); // span -> {tokens: [{token, logprob, top}], p}

  let model = null; // the first entry of GET /v1/models
  let contextSize = null; // its max_model_len: prompt + completion tokens
  let run = null; // the generation under way: {controller, done}
  let runs = 0; // generations started (the stats line says which one it describes)

  // -- API key and model ---------------------------------------------------------------------

  function storedKey() {
    try {
      return localStorage.getItem(KEY_STORE) || "";
    } catch {
      return ""; // storage disabled: the key lives in the field only
    }
  }

  function saveKey(value) {
    try {
      if (value) localStorage.setItem(KEY_STORE, value);
      else localStorage.removeItem(KEY_STORE);
    } catch {
      /* storage disabled */
    }
    ui.keyBox.classList.toggle("set", Boolean(value));
  }

  function headers(extra = {}) {
    const key = ui.key.value.trim();
    return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
  }

  async function loadModel() {
    ui.model.className = "model";
    ui.model.textContent = "connecting…";
    try {
      const res = await fetch("/v1/models", { headers: headers() });
      if (!res.ok) throw await apiError(res);
      const body = await res.json();
      const card = body && Array.isArray(body.data) && body.data.length ? body.data[0] : null;
      const id = card && card.id;
      if (!id) throw { message: "the server lists no model" };
      model = id;
      contextSize = Number.isInteger(card.max_model_len) ? card.max_model_len : null;
      if (contextSize) $("max-tokens").max = String(contextSize);
      ui.model.textContent = id;
      ui.model.title = `Model: ${id}`;
      ui.model.classList.add("ready");
    } catch (e) {
      model = null;
      const err = asError(e);
      ui.model.textContent = err.status === 401 ? "API key needed" : "no model";
      ui.model.title = err.message;
      ui.model.classList.add("failed");
      if (err.status === 401) ui.keyBox.open = true;
    }
  }

  // -- errors --------------------------------------------------------------------------------

  // The server's errors are {"error": {"message", "type", "param", "code"}} (OpenAI's shape);
  // anything else (a proxy's HTML page, FastAPI's {"detail"}) is turned into the same shape.
  async function apiError(res) {
    let body = null;
    try {
      body = await res.json();
    } catch {
      /* not JSON */
    }
    const e = body && body.error;
    if (e && typeof e === "object") return { ...e, message: e.message || res.statusText, status: res.status };
    if (typeof e === "string") return { message: e, status: res.status };
    if (body && body.detail) {
      const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      return { message: detail, status: res.status };
    }
    return { message: `${res.status} ${res.statusText || "error"}`, status: res.status };
  }

  function asError(e) {
    if (e instanceof Error) return { message: e.message };
    if (e && typeof e === "object") return e;
    return { message: String(e) };
  }

  function showError(e) {
    const err = asError(e);
    let message = err.message || "unknown error";
    if (err.status === 401) {
      message += " — set the API key (top right).";
      ui.keyBox.open = true;
    }
    const detail = [err.status, err.type, err.code, err.param && `param: ${err.param}`].filter(Boolean).join(" · ");
    ui.error.replaceChildren(document.createTextNode(message));
    if (detail) {
      const small = document.createElement("span");
      small.className = "code";
      small.textContent = detail;
      ui.error.append(small);
    }
    ui.error.hidden = false;
  }

  function hideError() {
    ui.error.hidden = true;
    ui.error.replaceChildren();
  }

  // -- the request -----------------------------------------------------------------------------

  // Stop strings: one per line; \n, \t, \r and \\ are escapes so that a newline can be one.
  function parseStops(text) {
    return text
      .split("\n")
      .filter((line) => line !== "")
      .map((line) => line.replace(/\\([ntr\\])/g, (_, c) => ({ n: "\n", t: "\t", r: "\r", "\\": "\\" })[c]));
  }

  function readNumber(id, { integer = false, optional = false } = {}) {
    const input = $(id);
    const name = input.labels[0].textContent.trim();
    const raw = input.value.trim();
    if (raw === "") {
      if (optional) return undefined;
      throw new Error(`${name} is empty.`);
    }
    const x = Number(raw);
    if (!Number.isFinite(x) || (integer && !Number.isInteger(x))) {
      throw new Error(`${name} must be ${integer ? "a whole number" : "a number"}, not "${raw}".`);
    }
    return x;
  }

  function readParams() {
    const params = {
      max_tokens: readNumber("max-tokens", { integer: true }),
      temperature: readNumber("temperature"),
      top_p: readNumber("top-p"),
      repetition_penalty: readNumber("repetition-penalty"),
    };
    const topK = readNumber("top-k", { integer: true, optional: true });
    if (topK) params.top_k = topK; // 0 or empty: off, the server's default
    const seed = readNumber("seed", { integer: true, optional: true });
    if (seed !== undefined) params.seed = seed;
    const stop = parseStops(ui.stops.value);
    if (stop.length) params.stop = stop;
    return params;
  }

  // Server-Sent Events: yields the data of each event ("data: ..." lines joined), ends with the stream.
  async function* events(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
        buffer = buffer.replace(/\r\n|\r(?=[^\n])/g, "\n"); // a lone \r at the end may still meet its \n
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const data = eventData(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (data !== null) yield data;
        }
        if (done) {
          const data = eventData(buffer);
          if (data !== null) yield data;
          return;
        }
      }
    } finally {
      reader.cancel().catch(() => {}); // closes the connection if we stopped reading early
    }
  }

  function eventData(block) {
    const lines = block.split("\n").filter((line) => line.startsWith("data:"));
    if (!lines.length) return null; // a comment or a keep-alive
    return lines.map((line) => line.slice(line.startsWith("data: ") ? 6 : 5)).join("\n");
  }

  // -- tokens and text ---------------------------------------------------------------------------

  // A token that is part of a multi-byte character comes as "bytes:\xe2\x80"; others as their text.
  function tokenBytes(token) {
    if (typeof token !== "string" || !token.startsWith("bytes:")) return null;
    const out = [];
    const s = token.slice(6);
    const encoder = new TextEncoder();
    for (let i = 0; i < s.length; ) {
      const hex = s[i] === "\\" && s[i + 1] === "x" ? s.slice(i + 2, i + 4) : "";
      if (/^[0-9a-fA-F]{2}$/.test(hex)) {
        out.push(parseInt(hex, 16));
        i += 4;
      } else {
        const ch = String.fromCodePoint(s.codePointAt(i));
        out.push(...encoder.encode(ch));
        i += ch.length;
      }
    }
    return Uint8Array.from(out);
  }

  function utf8(parts, fatal) {
    const all = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) {
      all.set(p, at);
      at += p.length;
    }
    try {
      return new TextDecoder("utf-8", { fatal }).decode(all);
    } catch {
      return null;
    }
  }

  function sortedTop(top) {
    if (!top) return null;
    // An object's integer-like keys ("1", "42") come first whatever their order: sort by logprob.
    const entries = Array.isArray(top) ? top.map((t) => [t.token, t.logprob]) : Object.entries(top);
    return entries.filter(([, lp]) => typeof lp === "number").sort((a, b) => b[1] - a[1]);
  }

  // Matches the stream's tokens to its released text. Text can lag behind its tokens (a possible
  // stop string is held back), a character can span tokens (sent as bytes:), and a stop string can
  // cut a token's text short: a token is drawn once the text it spells has arrived; when tokens
  // and text disagree, what text there is becomes one span carrying those tokens.
  class Aligner {
    constructor(emit) {
      this.emit = emit; // (text, tokens) -> void
      this.text = ""; // released, not yet drawn
      this.queue = []; // received, not yet drawn
    }

    push(text, logprobs) {
      this.text += text || "";
      const lp = logprobs || {};
      (lp.tokens || []).forEach((token, i) => {
        const logprob = lp.token_logprobs ? lp.token_logprobs[i] : null;
        const top = lp.top_logprobs ? lp.top_logprobs[i] : null;
        this.queue.push({ token: String(token), logprob: typeof logprob === "number" ? logprob : null, top: sortedTop(top) });
      });
      this.settle(false);
    }

    finish() {
      this.settle(true);
      if (this.text) this.emit(this.text, this.queue.splice(0));
      this.text = "";
      this.queue = []; // tokens whose text a stop string removed
    }

    settle(final) {
      while (this.queue.length) {
        const [piece, n] = this.next(final);
        if (piece === null) return; // a character is not whole yet
        if (piece === "") {
          this.queue.splice(0, n);
          continue;
        }
        if (this.text.startsWith(piece)) {
          this.emit(piece, this.queue.splice(0, n));
          this.text = this.text.slice(piece.length);
          continue;
        }
        if (!final && piece.startsWith(this.text)) return; // the rest of its text is held back
        if (this.text) this.emit(this.text, this.queue.splice(0));
        this.text = "";
        return;
      }
    }

    // The text the first queued token(s) spell, and how many tokens: a run of byte tokens is cut
    // after the first token that ends a character.
    next(final) {
      const first = tokenBytes(this.queue[0].token);
      if (!first) return [this.queue[0].token, 1];
      const parts = [first];
      for (let i = 1; i < this.queue.length; i++) {
        const b = tokenBytes(this.queue[i].token);
        if (!b) break;
        parts.push(b);
      }
      for (let n = 1; n <= parts.length; n++) {
        const text = utf8(parts.slice(0, n), true);
        if (text !== null) return [text, n];
      }
      if (parts.length === this.queue.length && !final) return [null, 0];
      return [utf8(parts, false), parts.length]; // broken bytes: the server shows U+FFFD too
    }
  }

  function bin(p) {
    let i = 0;
    while (i < BIN_EDGES.length && p >= BIN_EDGES[i]) i++;
    return i;
  }

  function percent(p) {
    const x = p * 100;
    if (x >= 99.95) return "100%";
    if (x >= 10) return `${x.toFixed(1)}%`;
    if (x >= 0.001) return `${x.toPrecision(2)}%`;
    return `${x.toExponential(1)}%`;
  }

  function makeSpan(text, tokens) {
    const span = document.createElement("span");
    span.textContent = text;
    const known = tokens.filter((t) => t.logprob !== null);
    if (!known.length) {
      span.className = "tok plain";
      return span;
    }
    // Several tokens in one span (a character split across tokens): their joint probability.
    const p = Math.exp(known.reduce((sum, t) => sum + t.logprob, 0));
    span.className = "tok";
    span.dataset.bin = String(bin(p));
    span.dataset.p = String(p);
    span.dataset.tokens = String(tokens.length);
    tokenInfo.set(span, { tokens, p });
    return span;
  }

  // -- generating ----------------------------------------------------------------------------------

  function setRunning(running) {
    ui.generate.disabled = running;
    ui.stop.disabled = !running;
    ui.more.disabled = running || !ui.output.querySelector(".tok");
    ui.output.classList.toggle("running", running);
    ui.output.setAttribute("aria-busy", String(running));
  }

  function documentText(upTo = null) {
    let text = "";
    for (const node of ui.output.children) {
      if (node === upTo) break;
      if (!node.classList.contains("placeholder")) text += node.textContent;
    }
    return text;
  }

  function nearBottom() {
    const o = ui.output;
    return o.scrollHeight - o.scrollTop - o.clientHeight < 32;
  }

  // Tokens can come faster than frames: the stats line and the scrolling follow once per frame.
  let live = null; // the stats of the generation under way
  let frame = 0;
  let stick = true; // keep the newest text in view, until the reader scrolls up to read
  ui.output.addEventListener("scroll", () => (stick = nearBottom()));

  function redraw() {
    if (frame) return;
    frame = requestAnimationFrame(() => {
      frame = 0;
      if (live) renderStats(live, true);
      if (stick) ui.output.scrollTop = ui.output.scrollHeight;
    });
  }

  // Starts a generation from `prompt`; the output keeps what it holds (the caller has set it up).
  async function start(prompt) {
    if (run) return;
    let params;
    try {
      params = readParams();
    } catch (e) {
      showError(e);
      return;
    }
    hideError();
    const controller = new AbortController();
    const current = { controller, done: null };
    run = current;
    setRunning(true);
    current.done = generate(prompt, params, controller.signal);
    await current.done;
    run = null;
    setRunning(false);
  }

  async function generate(prompt, params, signal) {
    const stats = { start: performance.now(), first: null, last: null, tokens: 0, later: 0, finish: null, usage: null };
    const aligner = new Aligner((text, tokens) => ui.output.append(makeSpan(text, tokens)));
    let done = false;
    ui.stats.dataset.run = String(++runs);
    live = stats;
    renderStats(stats, true);
    try {
      if (!model) await loadModel();
      const body = { prompt, ...params, stream: true, stream_options: { include_usage: true }, logprobs: TOP_N };
      if (model) body.model = model;
      const post = () =>
        fetch("/v1/completions", {
          method: "POST",
          headers: headers({ "Content-Type": "application/json" }),
          body: JSON.stringify(body),
          signal,
        });
      let res = await post();
      if (!res.ok) {
        const err = await apiError(res);
        // A text continued from a picked token can outgrow the context: ask for what still fits.
        const fits = err.code === "context_length_exceeded" ? await tokensLeft(prompt, signal) : 0;
        if (!(fits > 0 && fits < body.max_tokens)) throw err;
        body.max_tokens = fits;
        stats.clamped = fits;
        res = await post();
        if (!res.ok) throw await apiError(res);
      }
      for await (const data of events(res.body)) {
        if (data === "[DONE]") {
          done = true;
          break;
        }
        let chunk;
        try {
          chunk = JSON.parse(data);
        } catch {
          throw new Error(`the server sent an event that is not JSON: ${data.slice(0, 80)}`);
        }
        if (chunk.error) throw typeof chunk.error === "object" ? chunk.error : { message: String(chunk.error) };
        if (chunk.usage) stats.usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const n = choice.logprobs && choice.logprobs.tokens ? choice.logprobs.tokens.length : 0;
          const now = performance.now();
          if (n) {
            if (stats.first === null) stats.first = now;
            else stats.later += n;
            stats.last = now;
            stats.tokens += n;
          }
          aligner.push(choice.text, choice.logprobs);
          if (choice.finish_reason) stats.finish = choice.finish_reason;
        }
        redraw();
      }
      if (!done && !stats.finish) throw new Error("the connection closed before the text was finished");
    } catch (e) {
      if (e && e.name === "AbortError") {
        stats.finish = stats.finish || "stopped";
      } else {
        stats.finish = stats.finish || "error";
        showError(e instanceof TypeError ? { message: `cannot reach the server (${e.message})` } : e);
      }
    } finally {
      live = null;
      aligner.finish();
      renderStats(stats, false);
      redraw();
    }
  }

  // The tokens the context has left after `prompt` (0 when unknown), from the server's /tokenize.
  async function tokensLeft(prompt, signal) {
    if (!contextSize) return 0;
    try {
      const res = await fetch("/tokenize", {
        method: "POST",
        headers: headers({ "Content-Type": "application/json" }),
        body: JSON.stringify({ prompt }),
        signal,
      });
      const body = res.ok ? await res.json() : null;
      return body && Number.isInteger(body.count) ? contextSize - body.count : 0;
    } catch (e) {
      if (e && e.name === "AbortError") throw e;
      return 0;
    }
  }

  function renderStats(stats, running) {
    const parts = [];
    const add = (name, label, value) => {
      const span = document.createElement("span");
      span.dataset.stat = name;
      if (label) {
        const l = document.createElement("span");
        l.className = "label";
        l.textContent = `${label} `;
        span.append(l);
      }
      span.append(value);
      parts.push(span);
    };
    add("finish", running ? "" : "finish", running ? "generating…" : stats.finish || "—");
    add("tokens", "", `${stats.tokens} token${stats.tokens === 1 ? "" : "s"}`);
    if (stats.later > 0 && stats.last > stats.first) {
      // the decode rate: tokens after the first over the time since it came
      add("rate", "", `${(stats.later / ((stats.last - stats.first) / 1000)).toFixed(1)} tok/s`);
    }
    if (stats.first !== null) add("ttft", "first token", `${Math.round(stats.first - stats.start)} ms`);
    if (stats.clamped) add("clamped", "max tokens", `${stats.clamped} (what the context had left)`);
    const u = stats.usage;
    if (u) add("usage", "usage", `${u.prompt_tokens} prompt + ${u.completion_tokens} completion = ${u.total_tokens}`);
    ui.stats.replaceChildren();
    parts.forEach((part, i) => {
      if (i) {
        const sep = document.createElement("span");
        sep.className = "sep";
        sep.textContent = " · "; // the spaces are where a narrow screen may break the line
        ui.stats.append(sep);
      }
      ui.stats.append(part);
    });
    ui.stats.dataset.finish = running ? "" : stats.finish || "";
  }

  function generateFresh() {
    if (run) return;
    hidePopover();
    const prompt = ui.prompt.value;
    const head = document.createElement("span");
    head.className = "prompt-text";
    head.textContent = prompt;
    ui.output.replaceChildren(head);
    ui.output.scrollTop = 0;
    stick = true;
    start(prompt);
  }

  function continueText() {
    if (run) return;
    hidePopover();
    start(documentText());
  }

  // Cut the text at `span` (a token the model chose), put `alt` there instead and go on from it.
  async function pickAlternative(span, entry, alt) {
    hidePopover();
    if (run) {
      run.controller.abort();
      await run.done;
    }
    if (!span.isConnected) return;
    const before = documentText(span);
    while (span.nextSibling) span.nextSibling.remove();
    const chosen = makeSpan(alt.token, [{ token: alt.token, logprob: alt.logprob, top: entry.top }]);
    chosen.classList.add("alt");
    span.replaceWith(chosen);
    start(before + alt.token);
  }

  // -- the alternatives popover -----------------------------------------------------------------

  let active = null; // the span the popover is about
  let pinned = false; // opened by a click or tap: stays until dismissed
  let hideTimer = 0;

  function chip(token) {
    const el = document.createElement("span");
    el.className = "chip";
    const bytes = token.startsWith("bytes:");
    const text = bytes ? token.slice(6) : token;
    if (bytes) {
      const tag = document.createElement("span");
      tag.className = "ws";
      tag.textContent = "bytes ";
      el.append(tag);
    }
    // Whitespace made visible: a token is often " the" or "\n".
    for (const part of text.split(/([ \n\t\r]+)/)) {
      if (!part) continue;
      if (/^[ \n\t\r]+$/.test(part)) {
        const ws = document.createElement("span");
        ws.className = "ws";
        ws.textContent = part.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "␍");
        el.append(ws);
      } else {
        el.append(part);
      }
    }
    el.title = JSON.stringify(text);
    return el;
  }

  function whyNot(alt) {
    if (alt.token.startsWith("bytes:")) return "part of a character: cannot be written as text";
    if (/^<\|[^|]*\|>$/.test(alt.token)) return "a special token";
    return "";
  }

  function alternativeList(span, entry) {
    const list = document.createElement("ul");
    list.className = "alts";
    const top = entry.top ? entry.top.map(([token, logprob]) => ({ token, logprob })) : [];
    if (entry.logprob !== null && !top.some((a) => a.token === entry.token)) {
      top.push({ token: entry.token, logprob: entry.logprob }); // the sampled token was not in the top N
    }
    for (const alt of top) {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "alt";
      button.dataset.token = alt.token;
      if (alt.token === entry.token) button.classList.add("chosen");
      const p = Math.exp(alt.logprob);
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("i");
      fill.style.width = `${Math.max(2, p * 100)}%`;
      bar.append(fill);
      const pct = document.createElement("span");
      pct.className = "pct";
      pct.textContent = percent(p);
      button.append(chip(alt.token), bar, pct);
      const reason = whyNot(alt);
      if (reason) {
        button.disabled = true;
        button.title = reason;
      } else {
        button.title = alt.token === entry.token ? "Generate again from after this token" : "Continue from this token instead";
        button.addEventListener("click", (e) => {
          e.stopPropagation();
          pickAlternative(span, entry, alt);
        });
      }
      li.append(button);
      list.append(li);
    }
    return list;
  }

  function showPopover(span, pin) {
    const data = tokenInfo.get(span);
    if (!data) return;
    clearTimeout(hideTimer);
    if (active && active !== span) active.classList.remove("active");
    active = span;
    pinned = pin;
    span.classList.add("active");

    const head = document.createElement("div");
    head.className = "pop-head";
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = percent(data.p);
    head.append(chip(span.textContent), pct);
    const parts = [head];
    const [first, ...rest] = data.tokens;
    if (rest.length) {
      // A character split over tokens: only its first token can be swapped for whole text.
      const note = document.createElement("div");
      note.className = "pop-note";
      note.textContent = `${data.tokens.length} tokens make this text; the percentage is their joint probability:`;
      const list = document.createElement("div");
      list.className = "pop-parts";
      for (const entry of data.tokens) {
        const row = document.createElement("span");
        const pct = document.createElement("span");
        pct.className = "pct";
        pct.textContent = entry.logprob === null ? "?" : percent(Math.exp(entry.logprob));
        row.append(chip(entry.token), pct);
        list.append(row);
      }
      parts.push(note, list);
    }
    const sub = document.createElement("div");
    sub.className = "pop-sub";
    sub.textContent = rest.length ? `Instead of the first token (top ${TOP_N})` : `Top ${TOP_N} alternatives`;
    parts.push(sub, alternativeList(span, first));
    ui.pop.replaceChildren(...parts);
    ui.pop.hidden = false;
    placePopover();
  }

  function placePopover() {
    if (!active || ui.pop.hidden) return;
    const rects = active.getClientRects();
    if (!rects.length) return hidePopover();
    const r = rects[0];
    const box = ui.output.getBoundingClientRect();
    if (r.bottom < box.top || r.top > box.bottom) return hidePopover(); // scrolled out of sight
    const vw = document.documentElement.clientWidth;
    const vh = document.documentElement.clientHeight;
    const w = ui.pop.offsetWidth;
    const h = ui.pop.offsetHeight;
    const x = Math.max(8, Math.min(r.left, vw - w - 8));
    let y = r.bottom + 6;
    if (y + h > vh - 8 && r.top - h - 6 >= 8) y = r.top - h - 6;
    ui.pop.style.left = `${Math.round(x)}px`;
    ui.pop.style.top = `${Math.round(Math.max(8, y))}px`;
  }

  function hidePopover() {
    clearTimeout(hideTimer);
    ui.pop.hidden = true;
    pinned = false;
    if (active) active.classList.remove("active");
    active = null;
  }

  function laterHide() {
    clearTimeout(hideTimer);
    hideTimer = setTimeout(() => {
      if (!pinned) hidePopover();
    }, 250);
  }

  function tokenAt(target) {
    const span = target instanceof Element ? target.closest(".tok") : null;
    return span && tokenInfo.has(span) ? span : null;
  }

  ui.output.addEventListener("pointerover", (e) => {
    if (e.pointerType !== "mouse" || pinned) return;
    const span = tokenAt(e.target);
    if (span) showPopover(span, false);
  });
  ui.output.addEventListener("pointerout", (e) => {
    if (e.pointerType === "mouse" && !pinned && tokenAt(e.target)) laterHide();
  });
  ui.pop.addEventListener("pointerenter", () => clearTimeout(hideTimer));
  ui.pop.addEventListener("pointerleave", (e) => {
    if (e.pointerType === "mouse" && !pinned) laterHide();
  });
  ui.output.addEventListener("click", (e) => {
    const span = tokenAt(e.target);
    if (!span) return;
    e.stopPropagation();
    if (pinned && active === span) hidePopover();
    else showPopover(span, true); // a tap on a phone lands here too
  });
  document.addEventListener("click", (e) => {
    if (!ui.pop.hidden && !ui.pop.contains(e.target)) hidePopover();
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && !ui.pop.hidden) {
      const back = pinned && ui.pop.contains(document.activeElement);
      hidePopover();
      if (back) ui.output.focus();
    }
  });
  // Keyboard: arrows walk the tokens of the focused text, Enter opens the alternatives.
  ui.output.addEventListener("keydown", (e) => {
    if (e.key !== "ArrowLeft" && e.key !== "ArrowRight" && e.key !== "Enter") return;
    const spans = [...ui.output.querySelectorAll(".tok")].filter((s) => tokenInfo.has(s));
    if (!spans.length) return;
    e.preventDefault();
    if (e.key === "Enter") {
      if (!active) return;
      showPopover(active, true);
      const first = ui.pop.querySelector("button:not(:disabled)");
      if (first) first.focus();
      return;
    }
    const at = spans.indexOf(active);
    const next = e.key === "ArrowRight" ? Math.min(at + 1, spans.length - 1) : Math.max(at - 1, 0);
    spans[next].scrollIntoView({ block: "nearest" });
    showPopover(spans[next], false);
  });
  window.addEventListener("resize", placePopover);
  document.addEventListener("scroll", placePopover, true); // it hides itself once its token is out of sight

  // -- wiring -------------------------------------------------------------------------------------

  ui.form.addEventListener("submit", (e) => {
    e.preventDefault();
    generateFresh();
  });
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      generateFresh();
    }
  });
  ui.stop.addEventListener("click", () => {
    if (run) run.controller.abort(); // the server cancels the generation when the connection closes
  });
  ui.more.addEventListener("click", continueText);

  for (const out of ui.params.querySelectorAll("output[data-for]")) {
    const input = $(out.dataset.for);
    const show = () => (out.textContent = Number(input.value).toFixed(2));
    input.addEventListener("input", show);
    show();
  }

  ui.key.value = storedKey();
  ui.keyBox.classList.toggle("set", Boolean(ui.key.value));
  ui.key.addEventListener("input", () => saveKey(ui.key.value.trim()));
  ui.key.addEventListener("change", loadModel);
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault(); // Enter in the key field: done (its change event asks for the model again)
    ui.keyBox.open = false;
  });

  if (window.matchMedia("(max-width: 860px)").matches) ui.settings.open = false; // phones: the text first

  loadModel();
})();
