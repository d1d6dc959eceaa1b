"""What one POST appends, built from validated input. Pure."""

from __future__ import annotations

from sumbatch import ids
from sumbatch.submission import Submission
from sumbatch.wire import TaskIn


def test_a_submission_names_its_tasks_in_order_and_carries_their_params() -> None:
    submission = Submission.of([TaskIn(param_a=1, param_b=2), TaskIn(param_a=-3, param_b=4)])
    gid = submission.created.group_task_id
    tids = submission.created.task_ids
    assert ids.is_group_id(gid) and tids == ids.task_ids(gid, 2)
    event = submission.event
    assert (event.group_task_id, event.tasks_total) == (gid, 2)
    assert (event.params_a, event.params_b) == ("1 -3", "2 4")
    assert [
        (w.task_id, w.group_task_id, w.index, w.param_a, w.param_b) for w in submission.work
    ] == [
        (tids[0], gid, 0, 1, 2),
        (tids[1], gid, 1, -3, 4),
    ]


def test_two_submissions_get_different_groups() -> None:
    one, two = (Submission.of([TaskIn(param_a=1, param_b=1)]) for _ in range(2))
    assert one.created.group_task_id != two.created.group_task_id
