"""POST /v1/classify: a served classifier's answer for one or more inputs, each with what was
shown, the best label, the probabilities and the propensity of what was shown under the server's
exploration policy (:mod:`alignloop.rollout.exploration`).

The forward pass runs in a worker thread, never on the event loop, and every prediction is
stored before the answer carrying its ``prediction_id`` is sent, so feedback on it always
attaches (``POST /v1/feedback`` with kind ``prediction``).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from alignloop.feedback.store import User
from alignloop.serve.classifier import Inputs, ServedClassifier, classify, read_inputs
from alignloop.serve.dependencies import Serving, current_user, get_serving
from alignloop.serve.errors import ERRORS
from alignloop.serve.schemas import ClassifyRequest

router = APIRouter()


@router.post("/v1/classify", responses=ERRORS)
async def classify_route(body: ClassifyRequest, user: User = Depends(current_user),
                         serving: Serving = Depends(get_serving)) -> JSONResponse:
    served = serving.classifier(body.model)  # taken once: a redeploy during the request does not change it
    inputs = read_inputs(served, body.input, serving.config.max_classify_inputs)
    return JSONResponse(await run_in_threadpool(_classify_and_store, serving, served, inputs, user))


def _classify_and_store(serving: Serving, served: ServedClassifier, inputs: Inputs, user: User) -> dict:
    answer, predictions = classify(served, inputs, serving.exploration, user)
    serving.store.add_predictions(predictions)
    return answer
