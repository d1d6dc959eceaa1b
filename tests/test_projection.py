from __future__ import annotations

from sumbatch.events import (
    AnyEvent,
    GroupFinished,
    GroupSubmitted,
    TaskCompleted,
    TaskFailed,
    TaskRetried,
    TaskStarted,
    TaskSubmitted,
)
from sumbatch.projection import Views, apply, fold


def submitted(n: int) -> list[AnyEvent]:
    events: list[AnyEvent] = [GroupSubmitted(group_task_id="g", tasks_total=n)]
    events += [
        TaskSubmitted(task_id=f"t{i}", group_task_id="g", index=i, param_a=i, param_b=10)
        for i in range(n)
    ]
    return events


def done(i: int, result: int, cached: bool = False) -> TaskCompleted:
    return TaskCompleted(
        task_id=f"t{i}", group_task_id="g", index=i, result=result, from_cache=cached, worker="w"
    )


def test_submission_makes_pending_views() -> None:
    views = fold(submitted(3))
    group = views.groups["g"]
    assert (group.tasks_total, group.tasks_completed, group.processed) == (3, 0, False)
    assert [views.tasks[f"t{i}"].state for i in range(3)] == ["PENDING"] * 3


def test_results_follow_submission_order_not_completion_order() -> None:
    views = fold([*submitted(3), done(2, 12), done(0, 10)])
    group = views.groups["g"]
    assert group.results == [10, None, 12]
    assert group.tasks_completed == 2
    assert not group.processed


def test_group_is_processed_when_every_task_ended() -> None:
    events = [*submitted(2), done(1, 11), done(0, 10, cached=True)]
    events.append(
        GroupFinished(
            group_task_id="g", tasks_total=2, tasks_failed=0, tasks_revoked=0, succeeded=True
        )
    )
    views = fold(events)
    assert views.groups["g"].processed and views.groups["g"].succeeded
    assert views.tasks["t0"].from_cache and not views.tasks["t1"].from_cache


def test_a_second_outcome_for_a_task_changes_nothing() -> None:
    once = fold([*submitted(2), done(0, 10)])
    twice = fold([*submitted(2), done(0, 10), done(0, 10)])
    assert twice == once
    assert twice.groups["g"].tasks_completed == 1


def test_started_after_completion_does_not_reopen_the_task() -> None:
    late = TaskStarted(task_id="t0", group_task_id="g", index=0, attempt=2, worker="w2")
    views = fold([*submitted(1), done(0, 10), late])
    assert views.tasks["t0"].state == "SUCCESS"


def test_retry_then_failure() -> None:
    retried = TaskRetried(
        task_id="t0", group_task_id="g", index=0, attempt=1, error="E", retry_in=1
    )
    failed = TaskFailed(task_id="t0", group_task_id="g", index=0, attempts=3, error="E", worker="w")
    views = fold(submitted(2))
    apply(views, retried)
    assert views.tasks["t0"].state == "RETRY"
    apply(views, failed)
    group = views.groups["g"]
    assert views.tasks["t0"].state == "FAILURE" and views.tasks["t0"].error == "E"
    assert (group.tasks_completed, group.tasks_failed, group.succeeded) == (1, 1, False)
    assert group.results == [None, None]


def test_events_for_unknown_views_are_ignored() -> None:
    views = fold([done(0, 1)], Views())
    assert views == Views()
