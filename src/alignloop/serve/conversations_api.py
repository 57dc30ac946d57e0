"""The conversation routes: the caller's chats, listed newest first, read back turn by turn (each
answer with the completion id its feedback attaches to), and taken off the list. A conversation
is created by sending ``conversation_id`` with a chat completion; only its owner sees it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import Response

from alignloop.feedback.entities import MAX_ID_CHARS
from alignloop.feedback.store import FeedbackStore, User
from alignloop.serve.dependencies import current_user, get_store
from alignloop.serve.errors import ERRORS, ApiError
from alignloop.serve.schemas import ConversationList, ConversationOut, ConversationSummary

router = APIRouter()

ConversationId = Annotated[str, Path(min_length=1, max_length=MAX_ID_CHARS)]


@router.get("/v1/conversations", response_model=ConversationList, responses=ERRORS)
def list_conversations(user: User = Depends(current_user), store: FeedbackStore = Depends(get_store),
                       limit: int = Query(100, ge=1, le=1000)) -> ConversationList:
    return ConversationList(data=[ConversationSummary(**c) for c in store.list_conversations(user.id, limit=limit)])


@router.get("/v1/conversations/{conversation_id}", response_model=ConversationOut, responses=ERRORS)
def get_conversation(conversation_id: ConversationId, user: User = Depends(current_user),
                     store: FeedbackStore = Depends(get_store)) -> ConversationOut:
    conversation = store.get_conversation(user.id, conversation_id)
    if conversation is None:
        raise _not_found(conversation_id)
    return ConversationOut(**conversation)


@router.delete("/v1/conversations/{conversation_id}", status_code=204, responses=ERRORS)
def delete_conversation(conversation_id: ConversationId, user: User = Depends(current_user),
                        store: FeedbackStore = Depends(get_store)) -> Response:
    """Off the caller's list; its completions and the feedback on them stay in the store."""
    if not store.delete_conversation(user.id, conversation_id):
        raise _not_found(conversation_id)
    return Response(status_code=204)


def _not_found(conversation_id: str) -> ApiError:
    # Another user's conversation is answered as a missing one: its existence is not theirs to learn.
    return ApiError(404, f"no conversation {conversation_id!r} of yours", "not_found_error", "conversation_id")
