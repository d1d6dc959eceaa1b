"""What one POST appends: a group's events and its work entries, and the answer that
names their ids. Pure: built from validated input, written by the store."""

from __future__ import annotations

from dataclasses import dataclass

from sumbatch import ids
from sumbatch.events import GroupSubmitted, TaskSubmitted
from sumbatch.wire import GroupCreated, TaskIn


@dataclass(frozen=True)
class Submission:
    """What one POST appends, and the answer that names its ids."""

    created: GroupCreated
    event: GroupSubmitted
    work: list[TaskSubmitted]

    @classmethod
    def of(cls, tasks: list[TaskIn], partition: int = 0) -> Submission:
        gid = ids.new_group_id(partition)
        tids = ids.task_ids(gid, len(tasks))
        event = GroupSubmitted(
            group_task_id=gid,
            tasks_total=len(tasks),
            params_a=" ".join([str(t.param_a) for t in tasks]),
            params_b=" ".join([str(t.param_b) for t in tasks]),
        )
        work = [
            TaskSubmitted(
                task_id=tid, group_task_id=gid, index=i, param_a=t.param_a, param_b=t.param_b
            )
            for i, (tid, t) in enumerate(zip(tids, tasks, strict=True))
        ]
        return cls(GroupCreated(group_task_id=gid, task_ids=tids), event, work)
