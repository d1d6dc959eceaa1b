/* sumbatch dashboard: what both pages share. Plain browser JavaScript, no build step.
 *
 * - api(): fetch against this origin with the stored bearer token, if any; a 401
 *   asks for the token (kept in localStorage) and retries once it is given.
 * - live(): an EventSource on one of the API's event streams, with every event type
 *   listened to, duplicates dropped (by entry id, after a reconnect) and the
 *   connection's state shown; it opens a new one when the browser gives up.
 * - small formatting helpers; all text goes into the page as textContent.
 */
"use strict";

const Sumbatch = (() => {
  const TOKEN_KEY = "sumbatch.token";
  const EVENT_TYPES = [
    "GroupSubmitted", "TaskStarted", "TaskRetried", "TaskCompleted", "TaskFailed",
    "TaskDeadLettered", "GroupCancelled", "TaskRevoked", "GroupFinished", "Unreadable",
  ];
  const TASK_ENDS = new Set(["TaskCompleted", "TaskFailed", "TaskRevoked"]);
  const INDEX_DIGITS = 8;

  // -- elements and text ----------------------------------------------------------

  function $(id) { return document.getElementById(id); }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function text(id, value) {
    const node = typeof id === "string" ? $(id) : id;
    const s = String(value);
    if (node && node.textContent !== s) node.textContent = s;
  }

  // -- ids and times --------------------------------------------------------------

  /** A stream entry id as [ms, seq], for ordering. */
  function entryOrder(entryId) {
    const [ms, seq] = String(entryId).split("-");
    return [Number(ms) || 0, Number(seq) || 0];
  }

  function entryAfter(a, b) {
    const [am, as] = entryOrder(a);
    const [bm, bs] = entryOrder(b);
    return am > bm || (am === bm && as > bs);
  }

  function entryMs(entryId) { return entryOrder(entryId)[0]; }

  function taskId(groupId, index) {
    const prefix = groupId.slice(0, groupId.length - INDEX_DIGITS);
    return prefix + (index + 1).toString(16).padStart(INDEX_DIGITS, "0");
  }

  function shortId(id) { return String(id).slice(0, 8); }

  function pad(n, width) { return String(n).padStart(width || 2, "0"); }

  function clock(ms) {
    const d = new Date(ms);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
  }

  function duration(ms) {
    if (ms === null || ms === undefined || !Number.isFinite(ms)) return "–";
    if (ms < 1000) return `${Math.round(ms)} ms`;
    if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
    if (ms < 3_600_000) return `${Math.floor(ms / 60_000)} min ${Math.round((ms % 60_000) / 1000)} s`;
    return `${Math.floor(ms / 3_600_000)} h ${Math.round((ms % 3_600_000) / 60_000)} min`;
  }

  function bytes(n) {
    if (n === null || n === undefined || !Number.isFinite(n)) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
  }

  function count(n) {
    if (n === null || n === undefined || !Number.isFinite(n)) return "–";
    return Number(n).toLocaleString("en-US");
  }

  /** What an event says beyond its type, group and task, in one short line. */
  function details(event) {
    const parts = [];
    switch (event.type) {
      case "GroupSubmitted":
        parts.push(`${event.tasksTotal} tasks`);
        break;
      case "TaskStarted":
        parts.push(`attempt ${event.attempt}`, `on ${event.worker}`);
        break;
      case "TaskRetried":
        parts.push(`attempt ${event.attempt} failed: ${event.error}`, `retry in ${event.retryIn} s`);
        break;
      case "TaskCompleted":
        parts.push(`result ${event.result}`);
        if (event.fromCache) parts.push("from cache");
        else parts.push(`attempt ${event.attempt}`, `on ${event.worker}`);
        break;
      case "TaskFailed":
        parts.push(`after ${event.attempts} attempts: ${event.error}`);
        break;
      case "TaskDeadLettered":
        parts.push(`dead-lettered: ${event.error}`);
        break;
      case "GroupFinished":
        parts.push(event.succeeded ? "succeeded" : "did not succeed",
          `${event.tasksTotal} tasks`, `${event.tasksFailed} failed`, `${event.tasksRevoked} revoked`);
        break;
      default:
        break;
    }
    return parts.join(", ");
  }

  // -- the API, with the bearer token ---------------------------------------------

  function token() {
    try { return localStorage.getItem(TOKEN_KEY) || ""; } catch (e) { return ""; }
  }

  function setToken(value) {
    try {
      if (value) localStorage.setItem(TOKEN_KEY, value); else localStorage.removeItem(TOKEN_KEY);
    } catch (e) { /* storage refused: the token lasts as long as the page */ }
  }

  /** fetch(path) on this origin, JSON by default; the token goes along when stored.
   *  Resolves to {status, body, ok}; body is the parsed JSON (or null). A network
   *  failure resolves to status 0. */
  async function api(path, options) {
    const opts = Object.assign({ method: "GET", headers: {} }, options || {});
    const headers = Object.assign({ Accept: "application/json" }, opts.headers);
    const stored = token();
    if (stored) headers.Authorization = `Bearer ${stored}`;
    let body;
    if (opts.json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(opts.json);
    }
    let response;
    try {
      response = await fetch(path, { method: opts.method, headers, body, signal: opts.signal, cache: "no-store" });
    } catch (e) {
      return { status: 0, ok: false, body: null, error: String(e) };
    }
    let parsed = null;
    try { parsed = await response.json(); } catch (e) { parsed = null; }
    return { status: response.status, ok: response.ok, body: parsed };
  }

  /** api(), for a request that changes something: on a 401 it shows the token form,
   *  and once a token is saved, tries again. Resolves to the final answer (a 401
   *  when the user cancels the form). */
  async function authorised(path, options) {
    for (;;) {
      const answer = await api(path, options);
      if (answer.status !== 401) return answer;
      const given = await askToken(token() ? "That token was refused." : "");
      if (!given) return answer;
    }
  }

  let pendingAsk = null;

  function askToken(message) {
    if (pendingAsk) return pendingAsk;
    const form = $("token-form");
    const input = $("token-input");
    const cancel = $("token-cancel");
    pendingAsk = new Promise((resolve) => {
      const note = form.querySelector(".token-message") || form.insertBefore(el("p", { class: "token-message error" }), form.firstChild);
      note.textContent = message || "";
      note.hidden = !message;
      form.hidden = false;
      input.value = "";
      input.focus();
      const done = (value) => {
        form.hidden = true;
        form.removeEventListener("submit", onSubmit);
        cancel.removeEventListener("click", onCancel);
        pendingAsk = null;
        resolve(value);
      };
      const onSubmit = (e) => {
        e.preventDefault();
        const value = input.value.trim();
        if (!value) return;
        setToken(value);
        done(true);
      };
      const onCancel = () => done(false);
      form.addEventListener("submit", onSubmit);
      cancel.addEventListener("click", onCancel);
    });
    return pendingAsk;
  }

  // -- the live streams -----------------------------------------------------------

  function showLive(state, detail) {
    const node = $("live");
    if (!node) return;
    const words = {
      connecting: "connecting…", live: "live", reconnecting: "reconnecting…",
      unavailable: "live stream unavailable", ended: "finished",
    };
    node.dataset.state = state;
    node.textContent = words[state] || state;
    node.title = detail || "";
  }

  /** Follow the event stream at ``url()`` (a function: a reconnect may start from
   *  elsewhere). ``onEvent(id, event)`` gets each event once, in order. The browser
   *  reconnects by itself (sending Last-Event-ID); when it gives up (a non-200
   *  answer: a 404, the 503 beyond the streams' cap), a new stream is opened after a
   *  pause, and ``onClosed(opened)`` is called first (``opened``: whether this one had
   *  delivered anything) so the page can decide whether to stop. ``stop()`` ends it. */
  function live(url, onEvent, onClosed) {
    let source = null;
    let lastId = null;
    let stopped = false;
    let retry = 1000;
    let timer = null;

    function handle(message) {
      const id = message.lastEventId;
      if (id && lastId && !entryAfter(id, lastId)) return; // seen already
      let event;
      try { event = JSON.parse(message.data); } catch (e) { return; }
      if (id) lastId = id;
      retry = 1000;
      onEvent(id, event);
    }

    function open() {
      if (stopped) return;
      showLive(lastId ? "reconnecting" : "connecting");
      const es = new EventSource(url(lastId));
      source = es;
      let opened = false;
      es.onopen = () => { opened = true; showLive("live"); };
      for (const type of EVENT_TYPES) es.addEventListener(type, handle);
      es.onmessage = handle; // an event with no `event:` line
      es.onerror = () => {
        if (stopped || source !== es) return;
        if (es.readyState === EventSource.CLOSED) {
          es.close();
          const keepGoing = onClosed ? onClosed(opened) : true;
          if (keepGoing === false || stopped) return;
          showLive("unavailable", `retrying in ${Math.round(retry / 1000)} s`);
          timer = setTimeout(open, retry);
          retry = Math.min(retry * 2, 30_000);
        } else {
          showLive("reconnecting");
        }
      };
    }

    open();
    return {
      stop(state) {
        stopped = true;
        clearTimeout(timer);
        if (source) source.close();
        showLive(state || "ended");
      },
      get lastId() { return lastId; },
    };
  }

  // -- progress bars --------------------------------------------------------------

  function progressBar() {
    return el("div", { class: "progress", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": "0", "data-progress": "0" },
      el("div", { class: "fill" }), el("span", { class: "pct", text: "0 %" }));
  }

  /** Set a bar to ``ended`` of ``total`` (a whole percentage, 100 only when all ended);
   *  ``state`` colours it. */
  function setProgress(bar, ended, total, state) {
    let pct = total > 0 ? Math.floor((100 * Math.min(ended, total)) / total) : 0;
    if (state === "done") pct = 100;
    const value = String(pct);
    if (bar.dataset.progress !== value) {
      bar.dataset.progress = value;
      bar.setAttribute("aria-valuenow", value);
      bar.querySelector(".fill").style.width = `${pct}%`;
      bar.querySelector(".pct").textContent = `${pct} %`;
    }
    if (state && bar.dataset.state !== state) bar.dataset.state = state;
  }

  /** A callback run at most once per animation frame, however often it is asked for. */
  function batched(fn) {
    let asked = false;
    return () => {
      if (asked) return;
      asked = true;
      requestAnimationFrame(() => { asked = false; fn(); });
    };
  }

  return {
    $, el, text, entryOrder, entryAfter, entryMs, taskId, shortId, clock, duration,
    bytes, count, details, api, authorised, token, setToken, live, showLive,
    progressBar, setProgress, batched, EVENT_TYPES, TASK_ENDS,
  };
})();
