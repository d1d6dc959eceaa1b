/* The API's view of each group a page shows (GET /grouptasks/{id}), kept fresh.
 *
 * The figures a page shows (tasks ended, failed, revoked, its state, results) come
 * from these views, never from a fold of the event stream of the page's own: the log
 * may hold entries the projector set aside (a copied GroupSubmitted, a TaskFailed
 * written by hand), and only the projector can tell. Events only say when to ask.
 *
 * SumbatchViews.create(onView) returns {want, drop}:
 * - want(gid, behind): ask soon: at once when nothing is asked for that group, else
 *   once the answer in flight is in, at most every REFRESH_MS. ``behind(view)`` says
 *   whether a 200 answer lags what the events said (fewer tasks ended; not finished
 *   though a GroupFinished came): such a view is asked again, backing off up to
 *   BEHIND_MAX_MS, as the projector lags the log a little (entries it set aside never
 *   catch up: asked every 5 s while the page shows the group).
 * - onView(gid, status, body) gets every answer (status 0: no answer).
 * - drop(gid): stop asking.
 * At most IN_FLIGHT requests at once: a browser opens 6 connections to a host, and the
 * event stream and the /system poll hold two.
 */
"use strict";

window.SumbatchViews = (() => {
  const REFRESH_MS = 250;
  const BEHIND_FIRST_MS = 500;
  const BEHIND_MAX_MS = 5000;
  const IN_FLIGHT = 3;

  function create(onView) {
    const groups = new Map(); // gid -> {gid, timer, queued, fetching, again, asked, behind, backoff}
    const queue = [];
    let running = 0;

    function schedule(g, ms) {
      if (g.timer !== null || g.queued) return;
      g.timer = setTimeout(() => { g.timer = null; enqueue(g); }, ms);
    }

    function enqueue(g) {
      if (g.queued || g.fetching || !groups.has(g.gid)) return;
      g.queued = true;
      queue.push(g);
      pump();
    }

    function pump() {
      while (running < IN_FLIGHT && queue.length) {
        const g = queue.shift();
        g.queued = false;
        if (!groups.has(g.gid)) continue;
        running += 1;
        g.fetching = true;
        g.again = false;
        ask(g).finally(() => { running -= 1; g.fetching = false; pump(); });
      }
    }

    async function ask(g) {
      const answer = await Sumbatch.api(`/grouptasks/${encodeURIComponent(g.gid)}`);
      g.asked = true;
      if (!groups.has(g.gid)) return;
      onView(g.gid, answer.status, answer.body);
      const lagging = answer.status === 200 && answer.body && g.behind(answer.body);
      const failed = answer.status !== 200 && answer.status !== 404;
      if (g.again) {
        g.backoff = 0;
        schedule(g, REFRESH_MS);
      } else if (lagging || failed) {
        g.backoff = Math.min(BEHIND_MAX_MS, g.backoff ? g.backoff * 2 : BEHIND_FIRST_MS);
        schedule(g, g.backoff);
      } else {
        g.backoff = 0;
      }
    }

    function want(gid, behind) {
      let g = groups.get(gid);
      if (!g) {
        g = { gid, timer: null, queued: false, fetching: false, again: false, asked: false, behind: () => false, backoff: 0 };
        groups.set(gid, g);
      }
      if (behind) g.behind = behind;
      if (g.fetching) { g.again = true; return; }
      if (g.backoff && g.timer !== null) { clearTimeout(g.timer); g.timer = null; }
      schedule(g, g.asked ? REFRESH_MS : 0);
    }

    function drop(gid) {
      const g = groups.get(gid);
      if (!g) return;
      if (g.timer !== null) clearTimeout(g.timer);
      groups.delete(gid);
    }

    return { want, drop };
  }

  return { create };
})();
