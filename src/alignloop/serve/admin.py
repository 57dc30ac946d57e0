"""The admin routes: export the feedback as a training dataset, deploy a model version, and the batches' counters."""

from __future__ import annotations

import json
import logging

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from alignloop.feedback.store import FeedbackStore, User
from alignloop.serve.dependencies import Serving, current_user, get_serving, get_store
from alignloop.serve.errors import ERRORS, ApiError
from alignloop.serve.schemas import DeployIn, DeployOut

log = logging.getLogger("alignloop")
router = APIRouter()


@router.get("/admin/export", responses=ERRORS)
def export(kind: str = Query(..., pattern="^(pairs|kto|sft|ratings|bandit)$"), user: User = Depends(current_user),
           store: FeedbackStore = Depends(get_store)) -> Response:
    _require_admin(user, "export is")
    records, skipped = store.export(kind)
    lines = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
    return Response(lines, media_type="application/x-ndjson", headers={"X-Skipped": json.dumps(skipped)})


@router.post("/admin/deploy", response_model=DeployOut, responses=ERRORS)
def deploy(body: DeployIn, user: User = Depends(current_user), serving: Serving = Depends(get_serving)) -> DeployOut:
    """Serve the model at ``path`` as ``name`` from the next request on (promotion or rollback);
    streams already running finish on the weights they started with."""
    _require_admin(user, "deploying is")
    new, previous = serving.deploy(body.name, body.path)
    log.info("serve: %s now serves version %s (was %s)", body.name, new.version, previous)
    return DeployOut(name=body.name, version=new.version, previous_version=previous)


@router.get("/admin/stats", responses=ERRORS)
def stats(user: User = Depends(current_user), serving: Serving = Depends(get_serving)) -> dict:
    """Per chat model: rows running and waiting in its batch, tokens generated, rows preempted
    (each resumed later) and rows cancelled (their client went away), since the server started."""
    _require_admin(user, "stats are")
    return {"models": {name: {"version": m.version, **m.batcher.stats()} for name, m in serving.models.items()}}


def _require_admin(user: User, what: str) -> None:
    if not user.admin:
        raise ApiError(403, f"{what} for admins (`alignloop users add NAME --admin`)", "permission_error")
