"""The feedback routes: a user's thumbs, ratings, comparisons and corrections on completions they
were served, and verdicts on classifiers' predictions, one at a time or in a batch. Each write is
answered only after its commit."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated, Optional

from fastapi import APIRouter, Depends, Header, Path, Query
from fastapi.responses import JSONResponse, Response

from alignloop.feedback.entities import MAX_IDEMPOTENCY_KEY_CHARS
from alignloop.feedback.store import FeedbackInput, FeedbackRecord, FeedbackStore, NotAuthorized, StoreError, User
from alignloop.serve.dependencies import Caller, Serving, current_user, feedback_caller, get_serving, get_store
from alignloop.serve.errors import ERRORS, ApiError, store_error_status
from alignloop.serve.schemas import (
    FeedbackBatchError,
    FeedbackBatchIn,
    FeedbackBatchOut,
    FeedbackBatchResult,
    FeedbackIn,
    FeedbackKind,
    FeedbackList,
    FeedbackOut,
    RefusedItem,
)

router = APIRouter()

# A feedback id is a database row id: a 64-bit integer on both back-ends. A bigger one is a 422
# naming the field, not an overflow inside the driver.
FeedbackId = Annotated[int, Path(ge=1, le=2**63 - 1)]


@router.post("/v1/feedback", response_model=FeedbackOut, status_code=201, responses=ERRORS)
def post_feedback(body: FeedbackIn, caller: Caller = Depends(feedback_caller), store: FeedbackStore = Depends(get_store),
                  serving: Serving = Depends(get_serving),
                  idempotency_key: Optional[str] = Header(None, min_length=1, max_length=MAX_IDEMPOTENCY_KEY_CHARS)) -> JSONResponse:
    try:
        record, outcome = store.put_feedback(caller.user.id, FeedbackInput(**body.to_input()), idempotency_key, caller.key)
    except NotAuthorized:
        serving.forget_key(caller.key)
        raise
    out = _feedback_out(record, outcome)
    return JSONResponse(json.loads(out.model_dump_json()), status_code=201 if outcome == "created" else 200)


@router.post("/v1/feedback/batch", response_model=FeedbackBatchOut, responses=ERRORS)
def post_feedback_batch(body: FeedbackBatchIn, caller: Caller = Depends(feedback_caller), store: FeedbackStore = Depends(get_store),
                        serving: Serving = Depends(get_serving)) -> FeedbackBatchOut:
    valid = [item for item in body.items if not isinstance(item, RefusedItem)]
    answers = store.put_feedback_many(caller.user.id, [(FeedbackInput(**item.to_input()), item.idempotency_key) for item in valid],
                                      caller.key)
    refused = next((a for a in answers if isinstance(a, NotAuthorized)), None)
    if refused is not None:  # the key was revoked: nothing of the batch was written
        serving.forget_key(caller.key)
        raise refused
    answers = iter(answers)
    results = []
    for item in body.items:
        if isinstance(item, RefusedItem):  # refused by the schema: answered, not written
            results.append(FeedbackBatchResult(status=422, error=FeedbackBatchError(message=item.message, type="invalid_request_error",
                                                                                    param=item.param)))
            continue
        answer = next(answers)
        if isinstance(answer, StoreError):
            status, kind, param = store_error_status(answer)
            results.append(FeedbackBatchResult(status=status, error=FeedbackBatchError(message=str(answer), type=kind, param=param)))
        else:
            record, outcome = answer
            results.append(FeedbackBatchResult(status=201 if outcome == "created" else 200, feedback=_feedback_out(record, outcome)))
    return FeedbackBatchOut(data=results)


@router.get("/v1/feedback", response_model=FeedbackList, responses=ERRORS)
def list_feedback(user: User = Depends(current_user), store: FeedbackStore = Depends(get_store),
                  kind: Optional[FeedbackKind] = None, limit: int = Query(100, ge=1, le=1000)) -> FeedbackList:
    records = store.list_feedback(user.id, kind=kind, limit=limit)
    return FeedbackList(data=_with_prompts(store, user, [_feedback_out(r) for r in records]))


@router.get("/v1/feedback/{feedback_id}", response_model=FeedbackOut, responses=ERRORS)
def get_feedback(feedback_id: FeedbackId, user: User = Depends(current_user), store: FeedbackStore = Depends(get_store)) -> FeedbackOut:
    record = store.get_feedback(user.id, feedback_id)
    if record is None:
        raise ApiError(404, f"no feedback {feedback_id} of yours", "not_found_error", "feedback_id")
    return _with_prompts(store, user, [_feedback_out(record)])[0]


@router.delete("/v1/feedback/{feedback_id}", status_code=204, responses=ERRORS)
def delete_feedback(feedback_id: FeedbackId, user: User = Depends(current_user), store: FeedbackStore = Depends(get_store)) -> Response:
    if not store.delete_feedback(user.id, feedback_id):
        raise ApiError(404, f"no feedback {feedback_id} of yours", "not_found_error", "feedback_id")
    return Response(status_code=204)


def _feedback_out(record: FeedbackRecord, outcome: str | None = None) -> FeedbackOut:
    fields = asdict(record)  # user_id is not among FeedbackOut's fields: a user's id is not echoed
    return FeedbackOut(**{k: v for k, v in fields.items() if k in FeedbackOut.model_fields}, outcome=outcome)


def _with_prompts(store: FeedbackStore, user: User, items: list[FeedbackOut]) -> list[FeedbackOut]:
    """The items with the prompt they answered and, for a comparison, the other answer's text."""
    found = store.prompts_and_texts(user.id, [cid for f in items for cid in (f.completion_id, f.other_completion_id) if cid])
    for item in items:
        if item.completion_id in found:
            item.prompt_text = found[item.completion_id][0]
        if item.other_completion_id in found:
            item.other_completion_text = found[item.other_completion_id][1]
    return items
