"""The original's Flask API: POST /grouptasks commissions a Celery group, GET
/grouptasks/<id> and GET /tasks/<id> read the result backend, with the original's field
names. Run: python api.py PORT (Flask's threaded server)."""

from __future__ import annotations

import sys

from celery import group
from celery.result import AsyncResult, GroupResult
from flask import Flask, Response, jsonify, request
from tasks import add
from tasks import app as celery_app

api = Flask(__name__)


@api.post("/grouptasks")
def create_group() -> Response:
    tasks = request.get_json()["tasks"]
    result = group(add.s(t["paramA"], t["paramB"]) for t in tasks).apply_async()
    result.save()
    return jsonify(groupTaskId=result.id, taskIds=[r.id for r in result.results])


@api.get("/grouptasks/<group_task_id>")
def get_group(group_task_id: str) -> Response | tuple[Response, int]:
    result = GroupResult.restore(group_task_id, app=celery_app)
    if result is None:
        return jsonify(error="no such groupTaskId"), 404
    done = [r for r in result.results if r.ready()]
    return jsonify(
        groupTaskId=group_task_id,
        grouptaskProcessed=len(done) == len(result.results),
        grouptaskSucceeded=not any(r.failed() for r in done),
        results=[r.result for r in done if r.successful()],
        tasksCompleted=len(done),
        tasksTotal=len(result.results),
    )


@api.get("/tasks/<task_id>")
def get_task(task_id: str) -> Response:
    result = AsyncResult(task_id, app=celery_app)
    ready = result.ready()
    return jsonify(
        result=result.result if result.successful() else None,
        resultReady=ready,
        taskId=task_id,
        taskState=result.state,
        taskSucceeded=result.successful(),
    )


@api.get("/readyz")
def ready() -> Response:
    return jsonify(ok=True)


if __name__ == "__main__":
    api.run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True)
