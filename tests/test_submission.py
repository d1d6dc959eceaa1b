"""What one POST appends, built from validated input. Pure."""

from __future__ import annotations

import pytest

from sumbatch.model import ids
from sumbatch.model.events import WORK_SLICE, TasksSubmitted, tasks_of
from sumbatch.model.submission import Submission
from sumbatch.model.wire import TaskIn


def test_a_submission_names_its_tasks_in_order_and_carries_their_params() -> None:
    submission = Submission.of([TaskIn(param_a=1, param_b=2), TaskIn(param_a=-3, param_b=4)])
    gid = submission.created.group_task_id
    tids = submission.created.task_ids
    assert ids.is_group_id(gid) and tids == ids.task_ids(gid, 2)
    event = submission.event
    assert (event.group_task_id, event.tasks_total) == (gid, 2)
    assert (event.params_a, event.params_b) == ("1 -3", "2 4")
    tasks = [task for work in submission.work for task in tasks_of(work)]
    assert [(t.task_id, t.group_task_id, t.index, t.param_a, t.param_b) for t in tasks] == [
        (tids[0], gid, 0, 1, 2),
        (tids[1], gid, 1, -3, 4),
    ]


def test_a_groups_work_comes_in_slices_of_consecutive_tasks() -> None:
    pairs = [(n, -n) for n in range(2 * WORK_SLICE + 6)]
    submission = Submission.of([TaskIn(param_a=a, param_b=b) for a, b in pairs])
    work = submission.work
    assert [(w.first, len(w.params_a.split())) for w in work] == [
        (0, WORK_SLICE),
        (WORK_SLICE, WORK_SLICE),
        (2 * WORK_SLICE, 6),
    ]
    tasks = [task for w in work for task in tasks_of(w)]
    assert [(t.index, t.param_a, t.param_b) for t in tasks] == [
        (n, a, b) for n, (a, b) in enumerate(pairs)
    ]
    assert [t.task_id for t in tasks] == submission.created.task_ids


@pytest.mark.parametrize(
    ("first", "params_a", "params_b"),
    [
        (1, "1", "2"),  # not where a slice starts
        (-WORK_SLICE, "1", "2"),
        (0, "", ""),  # empty
        (0, "1 2", "3"),  # columns of other lengths
        (0, " ".join(["1"] * (WORK_SLICE + 1)), " ".join(["2"] * (WORK_SLICE + 1))),
        (0, "1 x", "2 3"),  # not integers
        (2**32, "1", "2"),  # past the most tasks a group can have
    ],
)
def test_a_slice_no_submit_writes_is_refused(first: int, params_a: str, params_b: str) -> None:
    gid = ids.new_group_id()
    work = TasksSubmitted(group_task_id=gid, first=first, params_a=params_a, params_b=params_b)
    with pytest.raises(ValueError):
        tasks_of(work)


def test_a_slice_of_no_group_is_refused() -> None:
    work = TasksSubmitted(group_task_id=ids.task_id(ids.new_group_id(), 0), first=0,
                          params_a="1", params_b="2")  # fmt: skip
    with pytest.raises(ValueError):
        tasks_of(work)


def test_two_submissions_get_different_groups() -> None:
    one, two = (Submission.of([TaskIn(param_a=1, param_b=1)]) for _ in range(2))
    assert one.created.group_task_id != two.created.group_task_id
