"""STOW-RS receive: ``POST /dicomweb/studies[/{study}]`` (PS3.18 10.5) for HTTP senders.

Modalities and routers that push over HTTP post a ``multipart/related;
type="application/dicom"`` body with an API token of the ``store`` scope
(``dicom-node users token NAME --scope store``).  The body is spooled to the store's ``tmp/``
(removed after the request; a crash's leftover at the next start), checked as a whole, and
each part stored through the C-STORE path (``web/stow_store.py``): the response is sent only
after every stored instance is fsynced and committed.  The answer is the Store Instances
Response of PS3.18 10.5.3 in DICOM JSON: ReferencedSOPSequence for the stored instances,
FailedSOPSequence with each failure's reason; 200 all stored, 202 some failed, 409 none
stored, 503 (with Retry-After) when none could be stored for a passing reason (storage or
database, the analysis backlog).  A request refused as a whole (401, 403, 400 malformed body,
413, 415) gets the same kind of body with one reason-only item and a ``Warning`` header
(PS3.18 8.7.3.5) saying why.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path

import anyio
import structlog
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydicom.dataset import Dataset
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import ClientDisconnect

from dicom_node.audit.atna import record_instances_received
from dicom_node.errors import MalformedRequestError, StorageError, UnsupportedMediaTypeError
from dicom_node.ingest import IngestContext
from dicom_node.scp.backlog import BacklogGauge
from dicom_node.scp.handlers import OUT_OF_RESOURCES
from dicom_node.store import TMP_DIR, writer_name
from dicom_node.web.auth import Principal, store_principal
from dicom_node.web.multipart import parse_media_type
from dicom_node.web.stow_store import DICOM_MEDIA_TYPE, PartOutcome, store_body

log = structlog.get_logger(__name__)
# PS3.18 defines this service, not the JSON API's OpenAPI schema: it is left out of that.
router = APIRouter(prefix="/dicomweb", include_in_schema=False)

DICOM_JSON = "application/dicom+json"
RETRY_AFTER_SECONDS = 30
NOT_AUTHORIZED = 0x0124  # Refused: Not Authorized (PS3.7 C.5.4), for 401 and 403
CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand (PS3.18 Table I.2-2)
# A whole request refused by HTTP status, with the Failure Reason its body gives.
REQUEST_FAILURE_REASONS = {401: NOT_AUTHORIZED, 403: NOT_AUTHORIZED, 413: OUT_OF_RESOURCES}


@router.post("/studies", summary="STOW-RS: store instances (PS3.18 10.5)")
async def store_instances(
    request: Request, principal: Principal = Depends(store_principal)
) -> Response:
    return await _stow(request, principal, None)


@router.post("/studies/{study_instance_uid}", summary="STOW-RS: store instances of one study")
async def store_study_instances(
    study_instance_uid: str, request: Request, principal: Principal = Depends(store_principal)
) -> Response:
    return await _stow(request, principal, study_instance_uid)


async def _stow(request: Request, principal: Principal, study_instance_uid: str | None) -> Response:
    ingest: IngestContext = request.app.state.ingest
    boundary = _boundary(request.headers.get("content-type", ""))
    if await anyio.to_thread.run_sync(_backlogged, request):
        return stow_failure(503, "the node's analysis backlog is full; retry later")
    spool = await _spool(request, ingest.storage_root)
    calling = principal.username.removeprefix("token:")[:16]  # the rows' sender (16 chars)
    try:
        outcomes = await anyio.to_thread.run_sync(
            store_body, ingest, spool, boundary, study_instance_uid, calling
        )
    finally:
        spool.unlink(missing_ok=True)
    host = request.client.host if request.client is not None else ""
    await anyio.to_thread.run_sync(_audit, ingest, outcomes, calling, host)
    return store_response(outcomes)


def _boundary(content_type: str) -> str:
    """The body's boundary; the Content-Type must be multipart/related of application/dicom
    (PS3.18 10.5.1.1; the DICOM JSON and XML metadata forms are not taken: 415)."""
    media = parse_media_type(content_type)
    if media.media_type != "multipart/related":
        raise UnsupportedMediaTypeError(
            'send Content-Type: multipart/related; type="application/dicom"'
        )
    if media.params.get("type", DICOM_MEDIA_TYPE).lower() != DICOM_MEDIA_TYPE:
        raise UnsupportedMediaTypeError("the node takes only application/dicom parts")
    boundary = media.params.get("boundary", "")
    if not 1 <= len(boundary) <= 70:  # RFC 2046 5.1.1: 1 to 70 characters
        raise MalformedRequestError("the multipart Content-Type has no valid boundary")
    return boundary


def _backlogged(request: Request) -> bool:
    """Whether the analysis backlog is over ``[scp] max_backlog`` (as the SCP refuses)."""
    ingest: IngestContext = request.app.state.ingest
    gauge: BacklogGauge = request.app.state.backlog
    bound = ingest.settings.scp.max_backlog
    try:
        return bound > 0 and gauge.current(ingest.session_factory) > bound
    except SQLAlchemyError as exc:  # each instance then answers for the database itself
        log.error("backlog.not_counted", error_type=type(exc).__name__)
        return False


async def _spool(request: Request, storage_root: Path) -> Path:
    """The body, written to the store's ``tmp/`` as it streams (never whole in memory)."""
    spool = storage_root / TMP_DIR / writer_name(f"{uuid.uuid4().hex}.stow")
    try:
        with spool.open("wb") as file:
            async for chunk in request.stream():
                file.write(chunk)
    except ClientDisconnect:  # the client left, or the body went over max_stow_mb (413 sent)
        spool.unlink(missing_ok=True)
        raise MalformedRequestError("the request body ended before it was complete") from None
    except OSError as exc:
        spool.unlink(missing_ok=True)
        raise StorageError(f"the request could not be spooled ({exc.strerror})") from None
    return spool


def _audit(ingest: IngestContext, outcomes: Sequence[PartOutcome], calling: str, host: str) -> None:
    """DICOM Instances Transferred (PS3.15 A.5.3.3), one row per study of the request."""
    studies: dict[str | None, list[PartOutcome]] = {}
    for outcome in outcomes:
        studies.setdefault(outcome.study_instance_uid, []).append(outcome)
    for study, items in studies.items():
        record_instances_received(
            ingest.session_factory,
            study_instance_uid=study,
            patient_id=next((o.patient_id for o in items if o.patient_id), None),
            instances=sum(o.failure_reason is None for o in items),
            failed=sum(o.failure_reason is not None for o in items),
            calling_ae_title=calling,
            called_ae_title=ingest.settings.node.ae_title,
            peer_address=host,
            association="stow-rs",
        )


def store_response(outcomes: Sequence[PartOutcome]) -> Response:
    """The Store Instances Response (PS3.18 10.5.3) and its status (Table 10.5.3-1)."""
    stored = [o for o in outcomes if o.failure_reason is None]
    failed = [o for o in outcomes if o.failure_reason is not None]
    body = Dataset()
    if stored:
        body.ReferencedSOPSequence = [_reference(o) for o in stored]
    if failed:
        body.FailedSOPSequence = [_reference(o) for o in failed]
    headers: dict[str, str] = {}
    if not failed:
        status = 200
    elif stored:
        status = 202
    elif all(o.failure_reason == OUT_OF_RESOURCES for o in failed):
        status, headers["Retry-After"] = 503, str(RETRY_AFTER_SECONDS)
    else:
        status = 409
    log.info("stow.answered", status=status, stored=len(stored), failed=len(failed))
    return JSONResponse(body.to_json_dict(), status, headers=headers, media_type=DICOM_JSON)


def _reference(outcome: PartOutcome) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = outcome.sop_class_uid
    item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
    if outcome.failure_reason is not None:
        item.FailureReason = outcome.failure_reason
    return item


def stow_failure(status: int, message: str) -> Response:
    """A whole request refused with ``status``: a Store Instances Response with one item of
    the reason, the message in a ``Warning`` header (PS3.18 8.7.3.5)."""
    item = Dataset()
    item.FailureReason = REQUEST_FAILURE_REASONS.get(
        status, OUT_OF_RESOURCES if status >= 500 else CANNOT_UNDERSTAND
    )
    body = Dataset()
    body.FailedSOPSequence = [item]
    text = message.replace("\\", "").replace('"', "'")
    headers = {"Warning": f'299 dicom-node "{text}"'}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return JSONResponse(body.to_json_dict(), status, headers=headers, media_type=DICOM_JSON)
