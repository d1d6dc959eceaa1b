from __future__ import annotations

import msgspec

from consumers.projector import awaited
from sumbatch.model import ids
from sumbatch.model.events import (
    AnyEvent,
    GroupCancelled,
    GroupFinished,
    GroupSubmitted,
    TaskCompleted,
    TaskFailed,
    TaskRetried,
    TaskRevoked,
    TaskStarted,
    to_fields,
)
from sumbatch.model.projection import Views, apply, fold, fold_entries, problem
from sumbatch.model.views import GroupView, task_view


def submitted(n: int) -> list[AnyEvent]:
    params = " ".join(str(i) for i in range(n))
    return [GroupSubmitted(group_task_id="g", tasks_total=n, params_a=params, params_b=params)]


def done(i: int, result: int, cached: bool = False) -> TaskCompleted:
    return TaskCompleted(
        task_id=f"t{i}",
        group_task_id="g",
        index=i,
        result=result,
        from_cache=cached,
        attempt=0 if cached else 1,
        worker="w",
    )


def state(views: Views, i: int) -> str | None:
    view = task_view(views.groups["g"], f"t{i}", i)
    return None if view is None else view.state


def test_submission_makes_a_pending_group() -> None:
    views = fold(submitted(3))
    group = views.groups["g"]
    assert group == GroupView.submitted("g", 3)
    assert (group.tasks_total, group.tasks_completed, group.processed) == (3, 0, False)
    assert [state(views, i) for i in range(3)] == ["PENDING"] * 3


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
    first, second = (task_view(views.groups["g"], f"t{i}", i) for i in range(2))
    assert first is not None and (first.state, first.from_cache, first.result) == (
        "SUCCESS",
        True,
        10,
    )
    assert second is not None and (second.from_cache, second.result) == (False, 11)


def test_a_second_outcome_for_a_task_changes_nothing() -> None:
    once = fold([*submitted(2), done(0, 10)])
    twice = fold([*submitted(2), done(0, 10), done(0, 10)])
    assert twice == once
    assert twice.groups["g"].tasks_completed == 1


def test_started_after_completion_does_not_reopen_the_task() -> None:
    late = TaskStarted(task_id="t0", group_task_id="g", index=0, attempt=2, worker="w2")
    views = fold([*submitted(1), done(0, 10), late])
    assert state(views, 0) == "SUCCESS"


def test_retry_then_failure() -> None:
    retried = TaskRetried(
        task_id="t0", group_task_id="g", index=0, attempt=1, error="E", retry_in=1
    )
    failed = TaskFailed(task_id="t0", group_task_id="g", index=0, attempts=3, error="E", worker="w")
    views = fold(submitted(2))
    apply(views, retried)
    assert state(views, 0) == "RETRY"
    apply(views, failed)
    group = views.groups["g"]
    view = task_view(group, "t0", 0)
    assert view is not None and (view.state, view.error, view.attempts) == ("FAILURE", "E", 3)
    assert (group.tasks_completed, group.tasks_failed, group.succeeded) == (1, 1, False)
    assert group.results == [None, None]


def test_cancel_and_revoke() -> None:
    views = fold(
        [
            *submitted(2),
            done(0, 10),
            GroupCancelled(group_task_id="g"),
            TaskRevoked(task_id="t1", group_task_id="g", index=1),
        ]
    )
    group = views.groups["g"]
    assert state(views, 1) == "REVOKED"
    assert (group.cancelled, group.processed, group.succeeded) == (True, False, False)
    assert (group.tasks_completed, group.tasks_revoked, group.results) == (2, 1, [10, None])
    apply(
        views,
        GroupFinished(
            group_task_id="g", tasks_total=2, tasks_failed=0, tasks_revoked=1, succeeded=False
        ),
    )
    assert group.processed


def test_processed_is_the_write_sides_word_not_a_count() -> None:
    """Every task ended is progress; "processed" waits for the GroupFinished that the
    ledger appends, so GET and DELETE's 409 rest on one fact."""
    views = fold([*submitted(1), done(0, 10)])
    group = views.groups["g"]
    assert (group.tasks_completed, group.processed) == (1, False)
    finished = GroupFinished(
        group_task_id="g", tasks_total=1, tasks_failed=0, tasks_revoked=0, succeeded=True
    )
    apply(views, finished)
    assert group.processed


def test_a_group_finished_before_its_tasks_ended_is_set_aside() -> None:
    early = GroupFinished(
        group_task_id="g", tasks_total=2, tasks_failed=0, tasks_revoked=0, succeeded=True
    )
    views = fold([*submitted(2), done(0, 10)])
    set_aside = fold_entries([("1-1", to_fields(early))], views)
    assert [entry.reason for entry in set_aside] == [
        "GroupFinished before every task of the group ended"
    ]
    assert not views.groups["g"].processed


def test_events_for_unknown_groups_are_ignored() -> None:
    views = fold([done(0, 1)], Views())
    assert views == Views()


def test_task_view_outside_the_group_is_none() -> None:
    group = GroupView.submitted("g", 2)
    assert task_view(group, "t", 2) is None
    assert task_view(group, "t", -1) is None


# -- the checked fold over log entries --------------------------------------------


def _entries(gid: str, index: int, *, at: str) -> list[tuple[str, dict[str, str]]]:
    fields = to_fields(
        TaskCompleted(
            task_id=ids.task_id(gid, index), group_task_id=gid, index=index, result=1,
            from_cache=False, attempt=1, worker="w",
        )
    )  # fmt: skip
    return [(at, fields)]


def test_an_event_of_a_group_that_expired_long_ago_is_skipped_not_set_aside() -> None:
    """Folding a trimmed log again from its start meets events of groups whose
    submission was trimmed and whose view has expired: history, not a fault."""
    gid = ids.new_group_id()
    views = Views()
    assert fold_entries(_entries(gid, 0, at="1000-0"), views, expired_before="5000-0") == []
    assert views.groups == {}


def test_an_event_of_an_unknown_group_written_lately_is_set_aside() -> None:
    gid = ids.new_group_id()
    set_aside = fold_entries(_entries(gid, 0, at="9000-0"), Views(), expired_before="5000-0")
    assert [(s.entry_id, s.reason.split(" ")[0]) for s in set_aside] == [("9000-0", "unknown")]


def test_a_view_of_the_wrong_shape_is_not_well_formed() -> None:
    view = GroupView.submitted(ids.new_group_id(), 3)
    assert view.well_formed()
    for broken in (
        msgspec.structs.replace(view, states=["P"]),
        msgspec.structs.replace(view, results=[]),
        msgspec.structs.replace(view, states=["P", "P", "?"]),
        msgspec.structs.replace(view, tasks_completed=4),
        msgspec.structs.replace(view, tasks_failed=1),
    ):
        assert not broken.well_formed()


def test_the_projector_folds_at_once_only_what_a_reader_waits_for() -> None:
    """A batch of submissions and starts may wait a moment for its outcomes (one fold
    instead of two); one with any outcome or end is folded at once."""

    def batch(*kinds: str) -> list[tuple[str, dict[str, str]]]:
        return [(f"{n}-0", {"type": kind}) for n, kind in enumerate(kinds, 1)]

    assert not awaited(batch("GroupSubmitted", "TaskStarted", "TaskStarted"))
    for kind in ("TaskCompleted", "TaskFailed", "TaskRetried", "TaskRevoked",
                 "GroupCancelled", "GroupFinished", "Unknown"):  # fmt: skip
        assert awaited(batch("GroupSubmitted", kind))


def test_a_submission_is_checked_against_its_params_and_its_groups_origin() -> None:
    gid = ids.new_group_id()

    def submitted(params_a: str, params_b: str = "1 2") -> GroupSubmitted:
        return GroupSubmitted(
            group_task_id=gid, tasks_total=2, params_a=params_a, params_b=params_b
        )

    views = Views()
    assert problem(views, submitted("1 -2")) is None
    assert problem(views, submitted(f"{2**63 - 1} {-(2**63)}")) is None
    for bad in ("1 x", f"1 {2**63}", f"{-(2**63) - 1} 1", "1 +2", "1 2.0", "1 ٣"):
        assert (
            problem(views, submitted(bad)) == "paramsA and paramsB must be signed 64-bit integers"
        )
    # Where its group's log begins decides which entry may start the view.
    views.origins[gid] = "5-0"
    assert problem(views, submitted("1 2"), "5-0") is None
    assert "a copy" in (problem(views, submitted("1 2"), "9-0") or "")
    views.origins[gid] = None
    assert "no such group" in (problem(views, submitted("1 2"), "5-0") or "")
    # A fold of events (no entry ids) has no origins to check.
    assert problem(Views(), submitted("1 2")) is None
