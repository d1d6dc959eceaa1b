"""What one POST appends: a group's events and its work entries, and the answer that
names their ids. Pure: built from validated input, written by the store."""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

from sumbatch.model import ids
from sumbatch.model.events import WORK_SLICE, GroupSubmitted, TasksSubmitted
from sumbatch.model.wire import GroupCreated, TaskIn

_param_a, _param_b = attrgetter("param_a"), attrgetter("param_b")


@dataclass(frozen=True)
class Submission:
    """What one POST appends, and the answer that names its ids. The store appends the
    event and, built from its columns by the SUBMIT script, its work entries."""

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
    def work(self) -> list[TasksSubmitted]:
        """The work entries the SUBMIT script writes for it, as events."""
        gid, tasks = self.created.group_task_id, self.tasks
        return [
            TasksSubmitted(
                group_task_id=gid,
                first=first,
                params_a=" ".join(str(t.param_a) for t in tasks[first : first + WORK_SLICE]),
                params_b=" ".join(str(t.param_b) for t in tasks[first : first + WORK_SLICE]),
            )
            for first in range(0, len(tasks), WORK_SLICE)
        ]
