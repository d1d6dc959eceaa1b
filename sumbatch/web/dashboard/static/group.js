/* A group's page at /dashboard/groups/{id}.
 *
 * GET /grouptasks/{id} says whether the group exists and gives its summary: every
 * figure at the top (tasks ended, failed, revoked, its state, results) is the API's,
 * asked for again as events come (views.js), never a fold of the page's own.
 * GET /grouptasks/{id}/events (SSE: its history, then its new events, ending with
 * GroupFinished) fills the task table (with the projector's rules: a task's first
 * outcome stands; an event naming no task of the group changes none) and the audit
 * trail (every event, as the log holds it), live. The Cancel
 * button is DELETE /grouptasks/{id} (asking for the bearer token on a 401). Where the
 * group's event stream cannot be had, the tasks come from GET /tasks/{id} instead,
 * polled, and the audit trail says it is unavailable.
 */
"use strict";

(() => {
  const S = Sumbatch;
  const TERMINAL = new Set(["SUCCESS", "FAILURE", "REVOKED"]);
  const TASK_ROWS = 500;      // task rows drawn at most
  const AUDIT_ROWS = 1000;    // audit rows drawn at most
  const RESULTS_SHOWN = 100;  // results listed at most
  const POLL_TASKS_MAX = 500; // the fallback asks for each task only up to this many

  const gid = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop() || "").toLowerCase();
  const state = {
    total: null, tasks: [], cancelled: false, finished: false, succeeded: null,
    summary: null, auditCount: 0, stream: null, submitted: false,
  };

  S.text("group-id", gid);
  document.title = `group ${S.shortId(gid)} – sumbatch`;

  // -- the task table -------------------------------------------------------------

  const dirty = new Set(); // indices of the tasks whose row must be redrawn

  /** The task at ``index`` (every one before it made too), marked to be redrawn. */
  function task(index) {
    while (state.tasks.length <= index) {
      const i = state.tasks.length;
      state.tasks.push({ index: i, taskId: S.taskId(gid, i), a: null, b: null, state: "PENDING", result: null, attempts: 0, worker: "", note: "" });
      dirty.add(i);
    }
    dirty.add(index);
    return state.tasks[index];
  }

  function setTotal(total) {
    state.total = total;
    if (total > 0) task(total - 1);
  }

  const rows = []; // per task shown: its row and the cells that change

  function taskRow(t) {
    const cells = {
      a: S.el("td", { class: "num a" }), b: S.el("td", { class: "num b" }),
      state: S.el("span", { class: "state" }), result: S.el("td", { class: "num result" }),
      attempts: S.el("td", { class: "num attempts" }), worker: S.el("td", { class: "worker" }),
      note: S.el("td", { class: "note" }),
    };
    cells.tr = S.el("tr", { "data-task": t.taskId, "data-index": t.index },
      S.el("td", { class: "num", text: t.index + 1 }),
      S.el("td", null, S.el("code", { text: t.taskId, class: "tid" })),
      cells.a, cells.b, S.el("td", null, cells.state), cells.result, cells.attempts,
      cells.worker, cells.note);
    return cells;
  }

  function drawTask(t) {
    const cells = rows[t.index];
    S.text(cells.a, t.a === null ? "" : t.a);
    S.text(cells.b, t.b === null ? "" : t.b);
    S.text(cells.state, t.state);
    cells.state.dataset.state = t.state;
    cells.tr.dataset.state = t.state;
    S.text(cells.result, t.result === null || t.result === undefined ? "" : t.result);
    S.text(cells.attempts, t.attempts);
    S.text(cells.worker, t.worker || "");
    S.text(cells.note, t.note || "");
  }

  function endedCount() {
    return state.tasks.filter((t) => TERMINAL.has(t.state)).length;
  }

  /** Whether an event names a task of this group as the projector requires: an index
   *  within the group, and the task id that group and index make. */
  function namesATask(event) {
    const i = event.index;
    return Number.isInteger(i) && state.total !== null && i >= 0 && i < state.total
      && event.taskId === S.taskId(gid, i);
  }

  // The API's view, asked for again as events come; a view that lags the events
  // (the projector a little behind the log) is asked again until it catches up.
  const views = SumbatchViews.create((_, status, body) => {
    if (status !== 200 || !body) return;
    state.summary = body;
    if (body.grouptaskCancelled) state.cancelled = true;
    render();
  });
  const lagging = (view) => view.tasksCompleted < endedCount() || (state.finished && !view.grouptaskProcessed);

  /** The group's state, as the API's view says. */
  function groupState() {
    const v = state.summary;
    if (v && v.grouptaskProcessed) {
      if (v.grouptaskCancelled || v.tasksRevoked > 0) return "CANCELLED";
      return v.grouptaskSucceeded ? "SUCCEEDED" : "FAILED";
    }
    if (state.cancelled || (v && v.grouptaskCancelled)) return "CANCELLING";
    const moving = (v && v.tasksCompleted > 0) || state.tasks.some((t) => t.state !== "PENDING");
    return moving ? "RUNNING" : "PENDING";
  }

  function renderNow() {
    const shown = Math.min(state.tasks.length, TASK_ROWS);
    if (rows.length < shown) {
      const frag = document.createDocumentFragment();
      while (rows.length < shown) {
        const cells = taskRow(state.tasks[rows.length]);
        rows.push(cells);
        frag.append(cells.tr);
      }
      S.$("tasks").append(frag);
    }
    for (const index of dirty) if (index < shown) drawTask(state.tasks[index]);
    dirty.clear();
    if (auditQueue.length) {
      const frag = document.createDocumentFragment();
      frag.append(...auditQueue);
      auditQueue.length = 0;
      S.$("audit").append(frag);
    }
    const note = S.$("tasks-note");
    note.hidden = state.tasks.length <= TASK_ROWS;
    S.text(note, `Showing the first ${TASK_ROWS} of ${state.tasks.length} tasks.`);

    const summary = state.summary;
    const ended = summary ? summary.tasksCompleted : 0;
    const total = summary ? summary.tasksTotal : 0;
    const processed = Boolean(summary && summary.grouptaskProcessed);
    const gs = groupState();
    S.setProgress(S.$("group-progress"), ended, total, processed ? "done" : gs.toLowerCase());
    S.$("group-progress").dataset.outcome = gs.toLowerCase();
    S.text("group-ended", Math.min(ended, total));
    S.text("group-total", total || "?");
    S.text("group-failed", summary ? summary.tasksFailed : 0);
    S.text("group-revoked", summary ? summary.tasksRevoked : 0);
    const badge = S.$("group-state");
    S.text(badge, gs.toLowerCase());
    badge.dataset.state = gs;
    // The results of the tasks that succeeded, in task order: the API's `results`.
    const listed = summary ? summary.results : [];
    S.text("group-results", listed.length <= RESULTS_SHOWN ? JSON.stringify(listed)
      : `${JSON.stringify(listed.slice(0, RESULTS_SHOWN)).slice(0, -1)},… (${listed.length - RESULTS_SHOWN} more)]`);
    S.$("cancel").disabled = processed || state.finished || state.total === null;
  }

  const render = S.batched(renderNow);

  // -- events: the tasks and the audit trail --------------------------------------

  function apply(id, event) {
    const isTask = event.index !== undefined;
    if (isTask && !namesATask(event)) {
      // Set aside by the projector too: shown in the audit trail only.
      audit(id, event);
      render();
      return;
    }
    switch (event.type) {
      case "GroupSubmitted": {
        // The first one: a copy further on is set aside by the projector.
        if (state.submitted) break;
        state.submitted = true;
        if (state.total === null) setTotal(event.tasksTotal);
        const as = String(event.paramsA || "").split(" ").filter(Boolean).slice(0, state.total);
        const bs = String(event.paramsB || "").split(" ").filter(Boolean).slice(0, state.total);
        as.forEach((a, i) => { task(i).a = a; });
        bs.forEach((b, i) => { task(i).b = b; });
        break;
      }
      case "TaskStarted": {
        const t = task(event.index);
        if (TERMINAL.has(t.state)) break; // a late progress note: the views ignore it too
        t.state = "STARTED";
        t.attempts = Math.max(t.attempts, event.attempt);
        t.worker = event.worker;
        t.note = "";
        break;
      }
      case "TaskRetried": {
        const t = task(event.index);
        if (TERMINAL.has(t.state)) break;
        t.state = "RETRY";
        t.attempts = Math.max(t.attempts, event.attempt);
        t.note = `${event.error}; retry in ${event.retryIn} s`;
        break;
      }
      case "TaskCompleted": {
        const t = task(event.index);
        if (TERMINAL.has(t.state)) break;
        t.state = "SUCCESS";
        t.result = event.result;
        t.attempts = Math.max(t.attempts, event.attempt);
        t.worker = event.fromCache ? "" : event.worker;
        t.note = event.fromCache ? "from cache" : "";
        break;
      }
      case "TaskFailed": {
        const t = task(event.index);
        if (TERMINAL.has(t.state)) break;
        t.state = "FAILURE";
        t.attempts = Math.max(t.attempts, event.attempts);
        t.worker = event.worker;
        t.note = event.error;
        break;
      }
      case "TaskDeadLettered":
        task(event.index).note = `dead-lettered: ${event.error}`;
        break;
      case "TaskRevoked": {
        const t = task(event.index);
        if (TERMINAL.has(t.state)) break;
        t.state = "REVOKED";
        break;
      }
      case "GroupCancelled":
        state.cancelled = true;
        break;
      case "GroupFinished":
        if (state.total === null) setTotal(event.tasksTotal);
        state.finished = true;
        state.succeeded = event.succeeded;
        break;
      default:
        break;
    }
    audit(id, event);
    render();
    views.want(gid, lagging);
    if (event.type === "GroupFinished" && state.stream) state.stream.stop("ended");
  }

  const auditQueue = []; // audit rows to append at the next frame

  function audit(id, event) {
    state.auditCount += 1;
    if (state.auditCount > AUDIT_ROWS) {
      const note = S.$("audit-note");
      note.hidden = false;
      S.text(note, `${state.auditCount - AUDIT_ROWS} more events not shown; \`sumbatch audit ${gid}\` lists them all.`);
      return;
    }
    auditQueue.push(S.el("tr", { "data-type": event.type, "data-id": id },
      S.el("td", { class: "when", text: id ? S.clock(S.entryMs(id)) : "" }),
      S.el("td", null, S.el("code", { class: "eid", text: id || "" })),
      S.el("td", null, S.el("span", { class: "event", "data-type": event.type, "data-succeeded": event.type === "GroupFinished" ? String(event.succeeded) : null, text: event.type })),
      S.el("td", { class: "num", text: event.index === undefined ? "" : `#${event.index + 1}` }),
      S.el("td", { class: "details", text: S.details(event) })));
  }

  // -- the summary, and the fallback without the event stream ---------------------

  async function refreshSummary() {
    const answer = await S.api(`/grouptasks/${encodeURIComponent(gid)}`);
    if (answer.status === 200 && answer.body) {
      state.summary = answer.body;
      if (state.total === null) setTotal(answer.body.tasksTotal);
      if (answer.body.grouptaskCancelled) state.cancelled = true;
      render();
    }
    return answer;
  }

  async function pollTasks() {
    const summary = await refreshSummary();
    if (summary.status === 200 && state.total !== null && state.total <= POLL_TASKS_MAX) {
      const todo = state.tasks.filter((t) => !TERMINAL.has(t.state));
      for (let i = 0; i < todo.length; i += 6) {
        await Promise.all(todo.slice(i, i + 6).map(async (t) => {
          const answer = await S.api(`/tasks/${encodeURIComponent(t.taskId)}`);
          if (answer.status !== 200 || !answer.body) return;
          t.state = answer.body.taskState;
          t.result = answer.body.result;
          t.attempts = answer.body.attempts;
          t.note = answer.body.fromCache ? "from cache" : (answer.body.error || "");
          dirty.add(t.index);
        }));
      }
    } else if (state.total !== null && state.total > POLL_TASKS_MAX) {
      const note = S.$("tasks-note");
      note.hidden = false;
      S.text(note, "The group's event stream is unavailable, and the group is too large to ask for each task.");
    }
    if (state.summary && state.summary.grouptaskProcessed) {
      state.finished = true;
      state.succeeded = state.summary.grouptaskSucceeded;
      S.showLive("ended");
      render();
      return;
    }
    render();
    setTimeout(pollTasks, 1500);
  }

  function withoutStream() {
    const note = S.$("audit-note");
    note.hidden = false;
    S.text(note, "Audit trail unavailable: the group's event stream could not be opened.");
    S.showLive("unavailable", "polling GET /grouptasks and /tasks instead");
    pollTasks();
  }

  // -- cancelling -----------------------------------------------------------------

  function setUpCancel() {
    const button = S.$("cancel");
    button.addEventListener("click", async () => {
      if (!window.confirm(`Cancel group ${gid}? Every task that has not ended is revoked.`)) return;
      button.disabled = true;
      const result = S.$("cancel-result");
      S.text(result, "cancelling…");
      const answer = await S.authorised(`/grouptasks/${encodeURIComponent(gid)}`, { method: "DELETE" });
      if (answer.status === 202 && answer.body) {
        state.cancelled = true;
        S.text(result, `cancelled: ${answer.body.tasksRevoked} tasks revoked`);
      } else if (answer.status === 409) {
        S.text(result, "the group had already finished: nothing to cancel");
      } else {
        const why = answer.body && answer.body.error ? answer.body.error : `HTTP ${answer.status}`;
        S.text(result, `not cancelled: ${why}`);
        button.disabled = state.finished;
      }
      render();
      if (!state.stream) refreshSummary();
    });
  }

  // -- start ----------------------------------------------------------------------

  async function start() {
    setUpCancel();
    const first = await refreshSummary();
    if (first.status === 404) {
      const missing = S.$("group-missing");
      missing.hidden = false;
      S.text(missing, "No such group: it never existed, or its results have expired.");
      S.showLive("ended");
      return;
    }
    let delivered = false;
    state.stream = S.live(
      () => `/grouptasks/${encodeURIComponent(gid)}/events`,
      (id, event) => { delivered = true; apply(id, event); },
      (opened) => {
        if (opened || delivered) return true; // it worked before: try again
        state.stream = null;
        withoutStream();
        return false;
      },
    );
    render();
  }

  start();
})();
