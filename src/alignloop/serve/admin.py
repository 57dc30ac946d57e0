"""The admin routes: the admin page, users and their keys, the model registry (lineage, deploy
and rollback), export of the feedback as training datasets, and the batches' counters.

Every JSON route is for admins: 401 without a valid key, 403 with a user's.
"""

from __future__ import annotations

import json
import logging

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse, Response

from alignloop.feedback.store import FeedbackStore, User
from alignloop.serve.dependencies import Serving, current_user, get_serving, get_store
from alignloop.serve.errors import ERRORS, ApiError
from alignloop.serve.page import STATIC
from alignloop.serve.schemas import (
    AdminUser,
    AdminUserList,
    DeployIn,
    DeployOut,
    LineageOut,
    NewUserIn,
    RegistryList,
    RegistryVersion,
    UserKeyOut,
    VersionDeployOut,
)

log = logging.getLogger("alignloop")
router = APIRouter()


@router.get("/admin", include_in_schema=False)
def admin_page() -> FileResponse:
    """The admin page (it logs in with an admin's key, as the chat page does)."""
    return FileResponse(STATIC / "admin.html")


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
    if body.version is not None and serving.upstream is None:
        raise ApiError(422, "field 'version': a local model's version is the hash of its weights; `version` names the version of "
                       "an upstream model on a gateway (serve --upstream)", param="version")
    new, previous = serving.deploy(body.name, body.path, version=body.version)
    log.info("serve: %s now serves version %s (was %s)", body.name, new.version, previous)
    return DeployOut(name=body.name, version=new.version, previous_version=previous)


@router.get("/admin/stats", responses=ERRORS)
def stats(user: User = Depends(current_user), serving: Serving = Depends(get_serving)) -> dict:
    """Per chat model: rows running and waiting in its batch, tokens generated, rows preempted
    (each resumed later) and rows cancelled (their client went away), since the server started;
    on a gateway, the upstream model each name goes to and its rows in flight."""
    _require_admin(user, "stats are")
    return {"models": {name: {"version": m.version, **m.stats()} for name, m in serving.models.items()}}


# --- users -----------------------------------------------------------------------------------

@router.get("/admin/users", response_model=AdminUserList, responses=ERRORS)
def list_users(user: User = Depends(current_user), store: FeedbackStore = Depends(get_store)) -> AdminUserList:
    _require_admin(user, "the user list is")
    return AdminUserList(data=[_shown_user(u) for u in store.list_users()])


@router.post("/admin/users", response_model=UserKeyOut, status_code=201, responses=ERRORS)
def add_user(body: NewUserIn, user: User = Depends(current_user), store: FeedbackStore = Depends(get_store)) -> UserKeyOut:
    """Add a user; the answer holds their API key, the one time anyone sees it."""
    _require_admin(user, "adding users is")
    key = store.add_user(body.name, admin=body.admin)
    log.info("serve: %s added user %s%s", user.name, body.name.strip(), " (admin)" if body.admin else "")
    return UserKeyOut(user=_named(store, body.name), key=key)


@router.post("/admin/users/{name:path}/revoke", response_model=AdminUser, responses=ERRORS)
def revoke_user(name: str, user: User = Depends(current_user), store: FeedbackStore = Depends(get_store)) -> AdminUser:
    """Take the user's key away: refused from their next request on. Their rows stay."""
    _require_admin(user, "revoking keys is")
    if name.strip() == user.name:
        # Refused, not warned: the page would be locked out by its own click, and with no other
        # admin only a shell on the server (`alignloop users rotate`) could let anyone back in.
        raise ApiError(409, f"field 'name': {name!r} is you; revoking your own key would lock you out of this page. "
                       "Ask another admin, or run `alignloop users revoke NAME` on the server", "conflict_error", "name")
    store.revoke_user(name)
    log.info("serve: %s revoked %s's API key", user.name, name)
    return _named(store, name)


@router.post("/admin/users/{name:path}/rotate", response_model=UserKeyOut, responses=ERRORS)
def rotate_key(name: str, user: User = Depends(current_user), store: FeedbackStore = Depends(get_store)) -> UserKeyOut:
    """Give the user a new key (shown once); the old one stops working at once. A revoked user
    gets a working key back this way."""
    _require_admin(user, "rotating keys is")
    key = store.rotate_key(name)
    log.info("serve: %s rotated %s's API key", user.name, name)
    return UserKeyOut(user=_named(store, name), key=key)


def _named(store: FeedbackStore, name: str) -> AdminUser:
    found = store.user_named(name)
    if found is None:
        raise ApiError(404, f"field 'name': no user named {name!r}", "not_found_error", "name")
    return _shown_user(found)


def _shown_user(user: User) -> AdminUser:
    return AdminUser(id=user.id, name=user.name, admin=user.admin, active=user.has_key)


# --- the model registry ----------------------------------------------------------------------

@router.get("/admin/models", response_model=RegistryList, responses=ERRORS)
def list_models(user: User = Depends(current_user), store: FeedbackStore = Depends(get_store),
                serving: Serving = Depends(get_serving)) -> RegistryList:
    """Every registered version, oldest first; ``serving`` marks the ones this server answers with now."""
    _require_admin(user, "the registry is")
    live = {m.version for m in [*serving.models.values(), *serving.classifiers.values()]}
    return RegistryList(data=[RegistryVersion(**{k: row[k] for k in RegistryVersion.model_fields if k in row},
                                              serving=row["version"] in live) for row in store.models()])


@router.get("/admin/models/{version}/lineage", response_model=LineageOut, responses=ERRORS)
def lineage(version: str, user: User = Depends(current_user), store: FeedbackStore = Depends(get_store)) -> LineageOut:
    _require_admin(user, "the registry is")
    return LineageOut(version=version, ancestry=store.ancestry(version), feedback=store.lineage(version))


@router.post("/admin/models/{version}/deploy", response_model=VersionDeployOut, responses=ERRORS)
def deploy_version(version: str, user: User = Depends(current_user), store: FeedbackStore = Depends(get_store),
                   serving: Serving = Depends(get_serving)) -> VersionDeployOut:
    """Serve a registered version under its name from the next request on (promotion or
    rollback): loads its folder as ``POST /admin/deploy`` does, which also marks it deployed."""
    _require_admin(user, "deploying is")
    row = next((m for m in store.models() if m["version"] == version), None)
    if row is None:
        raise ApiError(404, f"field 'version': model version {version!r} is not registered; GET /admin/models lists them",
                       "not_found_error", "version")
    new, previous = serving.deploy(row["name"], row["path"], version=version)  # a gateway records the version asked for
    log.info("serve: %s now serves version %s (was %s), deployed by %s", row["name"], new.version, previous, user.name)
    warning = None if new.version == version else (
        f"{row['path']} now hashes to {new.version}, not {version}: the folder changed since it was registered "
        "(or this server loads another dtype); the server serves and the registry marks deployed what it loaded")
    return VersionDeployOut(name=row["name"], version=new.version, previous_version=previous, requested_version=version,
                            warning=warning)


def _require_admin(user: User, what: str) -> None:
    if not user.admin:
        raise ApiError(403, f"{what} for admins (`alignloop users add NAME --admin`)", "permission_error")
