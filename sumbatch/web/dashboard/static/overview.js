/* The overview at /dashboard.
 *
 * From GET /events (SSE, starting a minute back so that groups submitted just before
 * show, or at ?from=<entry id or ms time>): which groups are in flight, and the live
 * event tail. Each group's figures are the API's (GET /grouptasks/{id}, views.js),
 * asked for again as its events come: never a fold of the events of the page's own.
 * From GET /system, polled every 1.5 s: the throughput chart (deltas of the task
 * counters over the last 5 minutes), the workers with their pending entries and idle
 * times, and the figures at the top. Where /system is missing (404) or its storage
 * is away (503), those parts say "unavailable" and the rest carries on.
 */
"use strict";

(() => {
  const S = Sumbatch;
  const BACK_MS = 60_000;          // how far back the event stream starts on load
  const POLL_MS = 1500;            // /system
  const WINDOW_MS = 5 * 60_000;    // the chart's width
  const TAIL_ROWS = 200;           // events kept in the tail
  const FINISHED_ROWS = 10;        // finished groups kept under those in flight
  const INFLIGHT_ROWS = 100;       // groups in flight shown at most

  // -- groups: which ones from the event stream, their figures from the API ------

  /** gid -> {gid, submittedMs, finishedMs, firstStarted, ended: Set, finishedSeen,
   *  view, ...}: ``view`` is the API's (GET /grouptasks/{id}); the rest is what the events
   *  said, used only to know when to ask again and whether a task has started. A group
   *  the API does not know (404: never submitted, or expired) is not shown. */
  const groups = new Map();
  const views = SumbatchViews.create((gid, status, body) => {
    const g = groups.get(gid);
    if (!g) return;
    if (status === 200 && body) {
      g.view = body;
      g.missing = false;
      if (body.grouptaskProcessed && g.finishedMs === null) g.finishedMs = Date.now();
    } else if (status === 404) {
      g.view = null;
      g.missing = true; // asked again only when another of its events comes
    }
    renderGroups();
  });

  function group(gid, ms) {
    let g = groups.get(gid);
    if (!g) {
      g = {
        gid, submittedMs: ms, finishedMs: null, firstStarted: Infinity, ended: new Set(), finishedSeen: false, view: null, missing: false, dirty: true,
        watched: false,
      };
      groups.set(gid, g);
    }
    return g;
  }

  /** The indices in ``set`` within a group of ``total`` tasks. */
  function within(set, total) {
    let n = 0;
    for (const i of set) if (i < total) n += 1;
    return n;
  }

  /** Whether the API's view of ``g`` lags what its events said. */
  function behind(g) {
    return (view) => view.tasksCompleted < within(g.ended, view.tasksTotal)
      || (g.finishedSeen && !view.grouptaskProcessed);
  }

  function apply(id, event) {
    const gid = event.groupTaskId;
    if (!gid) return;
    const ms = S.entryMs(id);
    const g = group(gid, ms);
    // Only events the projector would fold move the hints (its checks: the task id
    // its group and index name; an index within the group, checked against the
    // group's size once the API has said it).
    const index = event.index;
    const task = Number.isInteger(index) && index >= 0 && event.taskId === S.taskId(gid, index);
    switch (event.type) {
      case "GroupSubmitted":
        g.submittedMs = ms;
        break;
      case "TaskStarted":
        if (task) g.firstStarted = Math.min(g.firstStarted, index);
        break;
      case "TaskCompleted":
      case "TaskFailed":
      case "TaskRevoked":
        if (task) g.ended.add(index);
        break;
      case "GroupFinished":
        g.finishedSeen = true;
        if (g.finishedMs === null) g.finishedMs = ms;
        break;
      default:
        break;
    }
    g.dirty = true; // asked for again if shown (renderGroupsNow)
  }

  function stateOf(g) {
    const v = g.view;
    if (v.grouptaskProcessed) {
      if (v.grouptaskCancelled || v.tasksRevoked > 0) return "cancelled";
      return v.grouptaskSucceeded ? "succeeded" : "failed";
    }
    if (v.grouptaskCancelled) return "cancelling";
    return g.firstStarted < v.tasksTotal || v.tasksCompleted > 0 ? "running" : "queued";
  }

  const rows = new Map(); // gid -> tr

  function forget(gid) {
    groups.delete(gid);
    rows.delete(gid);
    views.drop(gid);
  }

  function groupRow(g) {
    let tr = rows.get(g.gid);
    if (tr) return tr;
    const link = S.el("a", { href: `/dashboard/groups/${g.gid}`, class: "gid", title: g.gid }, S.el("code", { text: S.shortId(g.gid) }));
    tr = S.el("tr", { "data-group": g.gid },
      S.el("td", null, link),
      S.el("td", { class: "progress-col" }, S.progressBar()),
      S.el("td", { class: "num tasks" }), S.el("td", { class: "num failed" }),
      S.el("td", { class: "num revoked" }), S.el("td", null, S.el("span", { class: "state" })),
      S.el("td", { class: "when" }));
    rows.set(g.gid, tr);
    return tr;
  }

  function renderGroupsNow() {
    // Groups the API said it does not know are left out, till another event comes.
    const all = [...groups.values()].filter((g) => !g.missing || g.dirty);
    // Finished: as the API says, or as the events said while it has not answered.
    const done = (g) => (g.view ? g.view.grouptaskProcessed : g.finishedSeen);
    const inFlight = all.filter((g) => !done(g)).sort((a, b) => b.submittedMs - a.submittedMs);
    const finished = all.filter(done).sort((a, b) => (b.finishedMs || 0) - (a.finishedMs || 0));
    // Forget groups long scrolled out, so that a long-running page stays small (not at
    // once: a late event of a group just forgotten would list it again).
    for (const g of finished.slice(FINISHED_ROWS * 5)) forget(g.gid);
    // Only the groups that may be shown are asked for: a page opened on a busy
    // service replays a minute of the log, thousands of groups.
    const candidates = [...inFlight.slice(0, INFLIGHT_ROWS), ...finished.slice(0, FINISHED_ROWS)];
    const chosen = new Set(candidates);
    for (const g of groups.values()) {
      if (chosen.has(g) && g.dirty) {
        g.dirty = false;
        g.watched = true;
        views.want(g.gid, behind(g));
      } else if (!chosen.has(g) && g.watched) {
        g.watched = false;
        g.dirty = true;
        views.drop(g.gid);
      }
    }
    const shown = candidates.filter((g) => g.view);
    const body = S.$("groups");
    const wanted = shown.map((g) => {
      const tr = groupRow(g);
      const v = g.view;
      const state = stateOf(g);
      S.setProgress(tr.querySelector(".progress"), v.tasksCompleted, v.tasksTotal, v.grouptaskProcessed ? "done" : state);
      tr.querySelector(".progress").dataset.outcome = state;
      S.text(tr.querySelector(".tasks"), `${Math.min(v.tasksCompleted, v.tasksTotal)} / ${v.tasksTotal}`);
      S.text(tr.querySelector(".failed"), v.tasksFailed);
      S.text(tr.querySelector(".revoked"), v.tasksRevoked);
      const cell = tr.querySelector(".state");
      S.text(cell, state);
      cell.dataset.state = state;
      S.text(tr.querySelector(".when"), S.clock(g.submittedMs));
      tr.dataset.state = state;
      return tr;
    });
    // Put the rows in order, touching the DOM only where it differs.
    wanted.forEach((tr, i) => { if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null); });
    while (body.children.length > wanted.length) body.lastChild.remove();
    S.$("groups-empty").hidden = wanted.length > 0;
    S.text("stat-inflight", S.count(inFlight.length));
  }

  const renderGroups = S.batched(renderGroupsNow);

  // -- the event tail -------------------------------------------------------------

  let queued = [];

  function renderTailNow() {
    const body = S.$("tail");
    const fresh = queued.slice(-TAIL_ROWS);
    queued = [];
    const frag = document.createDocumentFragment();
    for (let i = fresh.length - 1; i >= 0; i -= 1) {
      const [id, event] = fresh[i];
      const gid = event.groupTaskId || "";
      frag.append(S.el("tr", { "data-type": event.type, "data-group": gid, "data-id": id },
        S.el("td", { class: "when", text: S.clock(S.entryMs(id)), title: id }),
        S.el("td", null, S.el("span", { class: "event", "data-type": event.type, "data-succeeded": event.type === "GroupFinished" ? String(event.succeeded) : null, text: event.type })),
        S.el("td", null, gid ? S.el("a", { href: `/dashboard/groups/${gid}`, title: gid }, S.el("code", { text: S.shortId(gid) })) : ""),
        S.el("td", { class: "num", text: event.index === undefined ? "" : `#${event.index + 1}` }),
        S.el("td", { class: "details", text: S.details(event) })));
    }
    body.insertBefore(frag, body.firstChild);
    while (body.children.length > TAIL_ROWS) body.lastChild.remove();
  }

  const renderTail = S.batched(renderTailNow);

  // -- /system: figures, chart, workers -------------------------------------------

  const SYSTEM_STATS = ["stat-rate", "stat-lag", "stat-pending", "stat-projector", "stat-dead", "stat-log", "stat-memory"];
  const samples = []; // {t, completed, submitted}
  let serverOffset = 0; // server clock minus ours, ms
  let systemOk = null;

  function unavailable(reason) {
    systemOk = false;
    for (const id of SYSTEM_STATS) {
      S.text(id, "unavailable");
      S.$(id).dataset.state = "unavailable";
    }
    const note = S.$("chart-note");
    S.text(note, `Throughput unavailable: ${reason}.`);
    note.hidden = false;
    S.$("chart").dataset.state = "unavailable";
    S.$("workers").replaceChildren();
    const empty = S.$("workers-empty");
    S.text(empty, `Workers unavailable: ${reason}.`);
    empty.hidden = false;
    empty.dataset.state = "unavailable";
    samples.length = 0;
  }

  /** Tasks per second over each interval between two samples: {t0, t1, completed,
   *  submitted}. */
  function rates() {
    const points = [];
    for (let i = 1; i < samples.length; i += 1) {
      const a = samples[i - 1];
      const b = samples[i];
      const dt = (b.t - a.t) / 1000;
      if (dt <= 0) continue;
      // Counters only grow; a drop means they were reset: no point for that gap.
      if (b.completed < a.completed || b.submitted < a.submitted) continue;
      points.push({ t0: a.t, t1: b.t, completed: (b.completed - a.completed) / dt, submitted: (b.submitted - a.submitted) / dt });
    }
    return points;
  }

  function niceCeil(v) {
    if (v <= 1) return 1;
    const p = 10 ** Math.floor(Math.log10(v));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  const SVG = "http://www.w3.org/2000/svg"; // the namespace name, not fetched

  function svg(tag, attrs, textContent) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
    if (textContent !== undefined) node.textContent = textContent;
    return node;
  }

  /** The chart: a step line per series (each interval at its rate), the completed
   *  one filled. It spans the last 5 minutes, or less while the page has seen less
   *  (at least a minute, in whole minutes). */
  function drawChart(now) {
    const chart = S.$("chart");
    const W = 640;
    const H = 180;
    const left = 44;
    const right = 10;
    const top = 10;
    const bottom = 22;
    const seen = samples.length ? now - samples[0].t : 0;
    const span = Math.min(WINDOW_MS, Math.max(60_000, Math.ceil(seen / 60_000) * 60_000));
    const start = now - span;
    const points = rates().filter((p) => p.t1 > start);
    const max = niceCeil(Math.max(0, ...points.map((p) => Math.max(p.completed, p.submitted))));
    const x = (t) => left + ((Math.max(t, start) - start) / span) * (W - left - right);
    const y = (v) => top + (1 - v / max) * (H - top - bottom);
    const nodes = [];
    for (const f of [0, 0.5, 1]) {
      nodes.push(svg("line", { class: "grid", x1: left, x2: W - right, y1: y(max * f), y2: y(max * f) }));
      nodes.push(svg("text", { class: "axis", x: left - 6, y: y(max * f) + 4, "text-anchor": "end" }, String(+(max * f).toFixed(2))));
    }
    const step = span <= 60_000 ? 15_000 : 60_000;
    for (let back = span; back >= 0; back -= step) {
      const label = back === 0 ? "now" : step < 60_000 ? `-${back / 1000} s` : `-${back / 60_000} min`;
      const anchor = back === span ? "start" : back === 0 ? "end" : "middle";
      nodes.push(svg("text", { class: "axis", x: x(now - back), y: H - 6, "text-anchor": anchor }, label));
    }
    for (const series of ["completed", "submitted"]) {
      if (points.length === 0) continue;
      const steps = [];
      for (const p of points) steps.push(`${x(p.t0).toFixed(1)},${y(p[series]).toFixed(1)}`, `${x(p.t1).toFixed(1)},${y(p[series]).toFixed(1)}`);
      if (series === "completed") {
        const base = y(0).toFixed(1);
        const area = [`${x(points[0].t0).toFixed(1)},${base}`, ...steps, `${x(points[points.length - 1].t1).toFixed(1)},${base}`];
        nodes.push(svg("polygon", { class: "area completed", points: area.join(" ") }));
      }
      nodes.push(svg("polyline", { class: `line ${series}`, points: steps.join(" "), "data-series": series }));
    }
    chart.replaceChildren(...nodes);
    chart.dataset.points = String(points.length);
    chart.dataset.state = "ok";
    S.text("chart-span", span >= 120_000 ? `last ${span / 60_000} minutes` : "last minute");
    const last = points[points.length - 1];
    S.text("stat-rate", last ? last.completed.toFixed(last.completed < 10 ? 1 : 0) : "–");
  }

  function renderWorkers(workers) {
    const body = S.$("workers");
    const sorted = [...workers].sort((a, b) => (a.partition - b.partition) || String(a.name).localeCompare(String(b.name)));
    body.replaceChildren(...sorted.map((w) => S.el("tr", { "data-worker": w.name, class: w.pending > 0 ? "busy" : "" },
      S.el("td", null, S.el("code", { text: w.name })),
      S.el("td", { class: "num", text: w.partition }),
      S.el("td", { class: "num pending", text: S.count(w.pending) }),
      S.el("td", { class: "num idle", text: S.duration(w.idleMs) }))));
    const empty = S.$("workers-empty");
    S.text(empty, "No workers yet.");
    empty.hidden = sorted.length > 0;
    delete empty.dataset.state;
  }

  function renderSystem(sys) {
    systemOk = true;
    for (const id of SYSTEM_STATS) delete S.$(id).dataset.state;
    S.$("chart-note").hidden = true;
    const work = sys.work || {};
    S.text("stat-lag", work.lag === null || work.lag === undefined ? "–" : S.count(work.lag));
    S.text("stat-pending", S.count(work.pending));
    S.text("stat-projector", S.count(sys.projectorLag));
    S.text("stat-dead", S.count(sys.deadLetters));
    S.text("stat-log", S.count(sys.eventLogLength));
    S.text("stat-memory", S.bytes(sys.redisMemoryBytes));
    renderWorkers(sys.workers || []);
  }

  async function poll() {
    const answer = await S.api("/system");
    if (answer.status === 200 && answer.body && answer.body.counters) {
      const sys = answer.body;
      const t = Number(sys.time) || Date.now();
      serverOffset = t - Date.now();
      const c = sys.counters;
      samples.push({ t, completed: (c.tasksCompleted || 0) + (c.tasksFailed || 0), submitted: c.tasksSubmitted || 0 });
      while (samples.length > 2 && samples[1].t < t - WINDOW_MS) samples.shift();
      renderSystem(sys);
      drawChart(t);
    } else if (answer.status === 404) {
      unavailable("this server has no /system (404)");
    } else if (answer.status === 503) {
      unavailable("storage unavailable (503)");
    } else if (answer.status === 0) {
      unavailable("no answer from the API");
    } else {
      unavailable(`/system answered ${answer.status}`);
    }
    setTimeout(poll, systemOk === false && answer.status === 404 ? POLL_MS * 4 : POLL_MS);
  }

  // -- submitting a group ---------------------------------------------------------

  function setUpSubmit() {
    const form = S.$("submit-form");
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const n = Math.max(1, Math.min(1000, Number(S.$("submit-count").value) || 1));
      const tasks = Array.from({ length: n }, () => ({
        paramA: Math.floor(Math.random() * 100), paramB: Math.floor(Math.random() * 100),
      }));
      const result = S.$("submit-result");
      S.text(result, "submitting…");
      const answer = await S.authorised("/grouptasks", { method: "POST", json: { tasks } });
      result.replaceChildren();
      if (answer.status === 200 && answer.body) {
        const gid = answer.body.groupTaskId;
        result.append("submitted ", S.el("a", { href: `/dashboard/groups/${gid}`, "data-group": gid }, S.el("code", { text: S.shortId(gid) })));
      } else {
        const why = answer.body && answer.body.error ? answer.body.error : `HTTP ${answer.status}`;
        result.append(S.el("span", { class: "error", text: `not submitted: ${why}` }));
      }
    });
  }

  // -- start ----------------------------------------------------------------------

  async function start() {
    setUpSubmit();
    // The server's clock sets where the stream starts, when /system tells it.
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), 2000);
    const first = await S.api("/system", { signal: controller.signal });
    clearTimeout(timer);
    if (first.status === 200 && first.body && first.body.time) serverOffset = Number(first.body.time) - Date.now();
    // ?from=<entry id or ms time> on the page's URL starts elsewhere.
    const wanted = new URLSearchParams(location.search).get("from");
    const from = wanted && /^\d+(-\d+)?$/.test(wanted) ? wanted : String(Date.now() + serverOffset - BACK_MS);
    S.live(
      (lastId) => `/events?from=${encodeURIComponent(lastId || from)}`,
      (id, event) => {
        apply(id, event);
        queued.push([id, event]);
        if (queued.length > TAIL_ROWS * 4) queued = queued.slice(-TAIL_ROWS);
        renderGroups();
        renderTail();
      },
    );
    poll();
    // Ages and idle times move on even with no new event.
    setInterval(renderGroups, 5000);
  }

  start();
})();
