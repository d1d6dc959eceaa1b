"""The stored layout of a group view (pure): a summary and chunks of tasks, loaded and
written in part."""

from __future__ import annotations

import json

import pytest

from sumbatch.model import chunks, ids
from sumbatch.model.chunks import NotAView
from sumbatch.model.events import GroupSubmitted, TaskCompleted, TaskFailed, to_fields
from sumbatch.model.projection import Views, apply, chunks_touched, fold_entries
from sumbatch.model.views import CHUNK_TASKS, UNLOADED, GroupView, task_view

GID = "g"
TOTAL = 2 * CHUNK_TASKS + 452  # three chunks, the last one short


def sample() -> GroupView:
    view = GroupView.submitted(GID, TOTAL)
    for i, letter in ((0, "D"), (1, "C"), (CHUNK_TASKS + 5, "F"), (TOTAL - 1, "R")):
        view.states[i] = letter
    view.results[0], view.results[1] = 7, 9
    view.attempts[CHUNK_TASKS + 5] = 3
    view.errors[CHUNK_TASKS + 5] = "boom"
    view.errors[TOTAL - 1] = "again"
    view.tasks_completed, view.tasks_failed = 3, 1
    return view


def stored(view: GroupView) -> dict[str, bytes]:
    return chunks.to_fields(view)


def done(i: int) -> TaskCompleted:
    return TaskCompleted(
        task_id=f"t{i}",
        group_task_id=GID,
        index=i,
        result=i,
        from_cache=False,
        attempt=1,
        worker="w",
    )


def test_a_view_is_a_summary_and_chunks_of_its_tasks_and_reads_back_whole() -> None:
    fields = stored(sample())
    assert sorted(fields) == ["0", "1", "2", "summary"]
    assert json.loads(fields["summary"]) == [GID, TOTAL, 3, 1, 0, False, False]
    results, states, attempts, errors = json.loads(fields["2"])
    assert len(results) == len(states) == len(attempts) == 452
    assert states == "P" * 451 + "R" and errors == {str(TOTAL - 1): "again"}
    assert chunks.decode_whole(GID, fields) == sample()


def test_a_small_group_is_a_summary_and_one_chunk_each_within_a_listpacks_64_bytes() -> None:
    gid = ids.new_group_id()
    view = GroupView.submitted(gid, 4)
    view.states, view.results, view.attempts = list("DDDD"), [123456] * 4, [1] * 4
    view.tasks_completed, view.finished = 4, True
    fields = stored(view)
    assert fields == {
        "summary": f'["{gid}",4,4,0,0,false,true]'.encode(),
        "0": b'[[123456,123456,123456,123456],"DDDD",[1,1,1,1],{}]',
    }
    assert all(len(value) <= 64 for value in fields.values())


def test_a_view_loaded_in_part_holds_placeholders_that_are_never_written() -> None:
    fields = stored(sample())
    view = chunks.decode_view(GID, fields["summary"], {1: fields["1"]})
    assert view.states[0] == UNLOADED and view.states[CHUNK_TASKS + 5] == "F"
    assert view.errors == {CHUNK_TASKS + 5: "boom"}
    assert (view.tasks_completed, view.tasks_failed) == (3, 1)  # the counts are whole
    assert chunks.to_fields(view, {1}) == {k: fields[k] for k in ("summary", "1")}
    for unloaded in (None, {0}, {2}):
        with pytest.raises(ValueError, match="not loaded"):
            chunks.to_fields(view, unloaded)


def test_a_fold_into_a_view_loaded_in_part_changes_its_chunk_and_exact_counts() -> None:
    fields = stored(sample())
    views = Views()
    views.groups[GID] = chunks.decode_view(GID, fields["summary"], {1: fields["1"]})
    views.partial[GID] = frozenset({1})
    apply(views, done(CHUNK_TASKS))
    apply(views, done(CHUNK_TASKS + 5))  # ended already: no change
    view = views.groups[GID]
    assert (view.tasks_completed, view.tasks_failed) == (4, 1)
    written = chunks.to_fields(view, views.partial[GID])
    whole = chunks.decode_whole(GID, {**fields, **written})
    assert task_view(whole, "t", CHUNK_TASKS) is not None
    assert (whole.states[CHUNK_TASKS], whole.results[CHUNK_TASKS]) == ("D", CHUNK_TASKS)
    assert whole.states[0] == "D" and whole.tasks_completed == 4


def test_an_event_whose_chunk_was_not_loaded_is_set_aside_not_lost() -> None:
    fields = stored(sample())
    views = Views()
    views.groups[GID] = chunks.decode_view(GID, fields["summary"], {1: fields["1"]})
    views.partial[GID] = frozenset({1})
    event = TaskFailed(
        task_id=ids.task_id(GID, 3), group_task_id=GID, index=3, attempts=1, error="x", worker="w"
    )
    [set_aside] = fold_entries([("1-0", to_fields(event))], views)
    assert "not loaded" in set_aside.reason
    assert views.groups[GID].tasks_completed == 3


def test_a_submission_makes_a_view_loaded_in_part_whole_again() -> None:
    views = Views()
    views.groups[GID] = chunks.decode_view(GID, stored(sample())["summary"], {})
    views.partial[GID] = frozenset()
    params = " ".join(["1"] * TOTAL)
    apply(
        views,
        GroupSubmitted(group_task_id=GID, tasks_total=TOTAL, params_a=params, params_b=params),
    )
    assert GID not in views.partial
    assert chunks.to_fields(views.groups[GID]) == stored(GroupView.submitted(GID, TOTAL))


def test_the_chunks_a_batch_touches_are_read_as_the_events_decode_their_index() -> None:
    entries = [
        ("1-0", {"type": "GroupSubmitted", "groupTaskId": "a"}),
        ("1-1", {"type": "TaskCompleted", "groupTaskId": "b", "index": "5"}),
        ("1-2", {"type": "TaskCompleted", "groupTaskId": "b", "index": f"{CHUNK_TASKS}.0"}),
        ("1-3", {"type": "TaskCompleted", "groupTaskId": "c", "index": "soon"}),
        ("1-4", {"type": "TaskCompleted", "index": "1"}),
    ]
    # "a" starts in this batch: its view starts afresh, nothing of it is loaded.
    assert chunks_touched(entries) == {"b": {0, 1}, "c": set()}


def test_a_group_submitted_again_after_its_first_entry_here_is_loaded() -> None:
    """Only a group whose first entry in the batch is its GroupSubmitted starts afresh:
    one with an event before it (a refold meeting a hand-written entry) is loaded."""
    entries = [
        ("1-0", {"type": "TaskCompleted", "groupTaskId": "a", "index": "0"}),
        ("1-1", {"type": "GroupSubmitted", "groupTaskId": "a"}),
        ("1-2", {"type": "GroupSubmitted", "groupTaskId": "b"}),
        ("1-3", {"type": "TaskCompleted", "groupTaskId": "b", "index": "0"}),
    ]
    assert chunks_touched(entries) == {"a": {0}}


def test_a_status_read_decodes_results_and_a_task_read_one_chunk() -> None:
    fields = stored(sample())
    summary = chunks.decode_summary(GID, fields)
    assert summary.results == sample().results and summary.tasks_completed == 3
    task = chunks.decode_task("t", GID, CHUNK_TASKS + 5, fields["summary"], fields["1"])
    assert task == task_view(sample(), "t", CHUNK_TASKS + 5)
    assert chunks.decode_task("t", GID, TOTAL, fields["summary"], None) is None


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"summary": b"{"}, "summary"),
        ({"summary": b'["other",2500]'}, "another group"),
        ({"summary": b'["g",2500,-1]'}, "counts"),
        ({"summary": b'{"groupTaskId":"g","tasksTotal":2500}'}, "summary"),
        ({"1": b'[[1],"D",[1],{}]'}, "shape"),
        ({"1": b"[]"}, "chunk 1"),
        ({"2": None}, "fields other"),
        ({"3": b'[[],"",[],{}]'}, "fields other"),
    ],
)
def test_a_view_written_by_hand_is_no_view(change: dict[str, bytes | None], why: str) -> None:
    fields = {**stored(sample()), **change}
    whole = {k: v for k, v in fields.items() if v is not None}
    with pytest.raises(NotAView, match=why):
        chunks.decode_whole(GID, whole)
