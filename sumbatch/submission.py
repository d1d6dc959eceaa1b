"""What one POST appends: a group's events and its work entries, and the answer that
names their ids. Pure: built from validated input, written by the store."""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

from sumbatch import ids
from sumbatch.events import GroupSubmitted, TaskSubmitted
from sumbatch.wire import GroupCreated, TaskIn

_param_a, _param_b = attrgetter("param_a"), attrgetter("param_b")


@dataclass(frozen=True)
class Submission:
    """What one POST appends, and the answer that names its ids. The store appends the
    event and, built from its columns by the SUBMIT script, one work entry per task."""

    created: GroupCreated
    event: GroupSubmitted
    tasks: list[TaskIn]

    @classmethod
    def of(cls, tasks: list[TaskIn], partition: int = 0) -> Submission:
        gid = ids.new_group_id(partition)
        event = GroupSubmitted(
            group_task_id=gid,
            tasks_total=len(tasks),
            params_a=" ".join(map(str, map(_param_a, tasks))),
            params_b=" ".join(map(str, map(_param_b, tasks))),
        )
        return cls(
            GroupCreated(group_task_id=gid, task_ids=ids.task_ids(gid, len(tasks))), event, tasks
        )

    @property
    def work(self) -> list[TaskSubmitted]:
        """The work entries the SUBMIT script writes for it, as events."""
        gid = self.created.group_task_id
        return [
            TaskSubmitted(
                task_id=tid, group_task_id=gid, index=i, param_a=t.param_a, param_b=t.param_b
            )
            for i, (tid, t) in enumerate(zip(self.created.task_ids, self.tasks, strict=True))
        ]
