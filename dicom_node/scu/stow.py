"""Send stored output files to a DICOMweb peer by STOW-RS and classify every answer.

The same outputs as C-STORE (:mod:`dicom_node.scu.send`), posted with ``dicomweb-client`` as
one multipart/related request per batch (PS3.18 10.5).  The response is read per instance
(PS3.18 10.5.3): 200 all stored; 202 some stored, the rest named in the Failed SOP Sequence
(0008,1198) with a Failure Reason (0008,1197); 409 none stored.  A Failure Reason is a C-STORE
status (PS3.18 Table I.2-3) and is classified as one: A7xx is transient, the rest permanent.
A request that fails as a whole raises: ``TransientDeliveryError`` for a refused connection, a
timeout, 5xx, 408 and 429 (with the peer's ``Retry-After``), ``DeliveryError`` for the other
4xx (a wrong URL or credentials, a body the peer refuses: no retry will help).
"""

from __future__ import annotations

import base64
import email.utils
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import requests
import structlog
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset

from dicom_node.config.operations import TlsSettings
from dicom_node.config.settings import PeerSettings
from dicom_node.errors import DeliveryError, TransientDeliveryError
from dicom_node.scu.echo import SUCCESS as ECHO_SUCCESS
from dicom_node.scu.echo import EchoAnswer
from dicom_node.scu.send import (
    DELIVERED,
    FAILED,
    REJECTED,
    OutgoingFile,
    SendResult,
    classify_status,
)

log = structlog.get_logger(__name__)

TRANSIENT_HTTP = frozenset({408, 429})  # request timeout, too many requests (RFC 9110, 6585)
ACCEPT = "application/dicom+json"  # the response as DICOM JSON (PS3.18 F.2)


def stow_files(
    files: Sequence[OutgoingFile],
    peer: PeerSettings,
    *,
    timeout: float,
    tls: TlsSettings | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[SendResult]:
    """POST ``files`` to ``peer``'s STOW-RS resource in one request; one result per file.

    Raises ``TransientDeliveryError`` or ``DeliveryError`` when the request fails as a whole
    (see the module docstring)."""
    present = [f for f in files if f.path.is_file()]
    missing = [
        SendResult(f.sop_instance_uid, REJECTED, None, "the output file is missing")
        for f in files
        if not f.path.is_file()
    ]
    if not present:
        return missing
    session = _session(peer, tls or TlsSettings(), os.environ if environ is None else environ)
    answers: list[requests.Response] = []
    session.hooks["response"].append(lambda response, *args, **kwargs: answers.append(response))
    client = DICOMwebClient(peer.dicomweb_url, session=session, timeout=timeout)
    client.set_http_retry_params(retry=False)  # the delivery ledger retries, with backoff
    try:
        client.store_instances([pydicom.dcmread(f.path) for f in present])
    except requests.HTTPError as exc:
        if exc.response is None or exc.response.status_code != 409:
            raise _request_error(peer, exc.response) from None
        answers.append(exc.response)
    except requests.Timeout:
        raise TransientDeliveryError(f"no answer from {_where(peer)} in {timeout:g} s") from None
    except requests.ConnectionError as exc:
        reason = type(exc).__name__
        raise TransientDeliveryError(f"cannot connect to {_where(peer)} ({reason})") from None
    except requests.RequestException as exc:
        raise DeliveryError(f"cannot post to {_where(peer)} ({type(exc).__name__})") from None
    return missing + classify_response(answers[-1], present)


def classify_response(
    response: requests.Response, files: Sequence[OutgoingFile]
) -> list[SendResult]:
    """One result per file from a 200, 202 or 409 STOW-RS response (PS3.18 10.5.3)."""
    code = response.status_code
    body = _body(response)
    failed = {
        str(item.get("ReferencedSOPInstanceUID", "")): int(item.get("FailureReason", 0x0110))
        for item in body.get("FailedSOPSequence", [])
    }
    stored = {
        str(item.get("ReferencedSOPInstanceUID", "")): int(item.get("WarningReason", 0))
        for item in body.get("ReferencedSOPSequence", [])
    }
    results = []
    for item in files:
        uid = item.sop_instance_uid
        if uid in failed:
            outcome, detail = classify_status(failed[uid])
            if outcome == DELIVERED:  # a failure list naming a success status: not stored
                outcome, detail = REJECTED, f"failure 0x{failed[uid]:04X}"
            results.append(SendResult(uid, outcome, failed[uid], f"HTTP {code}, {detail}"))
        elif uid in stored or code == 200:  # 200: every instance stored (PS3.18 10.5.3.1)
            warning = stored.get(uid, 0)
            detail = f"HTTP {code}" + (f", warning 0x{warning:04X}" if warning else "")
            results.append(SendResult(uid, DELIVERED, warning, detail))
        elif code == 409:
            results.append(SendResult(uid, REJECTED, None, "HTTP 409, none stored"))
        else:
            results.append(SendResult(uid, FAILED, None, f"HTTP {code}, not named in the answer"))
    return results


def dicomweb_echo(
    peer: PeerSettings,
    *,
    timeout: float,
    tls: TlsSettings | None = None,
    environ: Mapping[str, str] | None = None,
) -> EchoAnswer:
    """The DICOMweb "is the PACS there?": one QIDO-RS search for a study (PS3.18 10.6) with
    the credentials and certificate checks delivery uses; never raises for a peer's failure."""
    try:
        session = _session(peer, tls or TlsSettings(), os.environ if environ is None else environ)
        client = DICOMwebClient(peer.dicomweb_url, session=session, timeout=timeout)
        client.set_http_retry_params(retry=False)
        client.search_for_studies(limit=1)
    except TransientDeliveryError as exc:
        return EchoAnswer(None, str(exc))
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else "?"
        return EchoAnswer(None, f"QIDO-RS answered HTTP {code}")
    except requests.RequestException as exc:
        return EchoAnswer(None, f"QIDO-RS failed: no answer ({type(exc).__name__})")
    return EchoAnswer(ECHO_SUCCESS, "QIDO-RS search answered")


def _body(response: requests.Response) -> Dataset:
    """The response's DICOM JSON (PS3.18 F.2), or an empty data set when it has none."""
    kind = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if not response.content or kind not in (ACCEPT, "application/json"):
        return Dataset()
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("delivery.unreadable_stow_response", error_type=type(exc).__name__)
        return Dataset()


def _request_error(peer: PeerSettings, response: requests.Response | None) -> DeliveryError:
    if response is None:
        return TransientDeliveryError(f"no HTTP response from {_where(peer)}")
    code, reason = response.status_code, response.reason or ""
    what = f"HTTP {code} {reason}".strip() + f" from {_where(peer)}"
    if code >= 500 or code in TRANSIENT_HTTP:
        retry_after = retry_after_seconds(response.headers.get("Retry-After", ""))
        return TransientDeliveryError(what, retry_after_seconds=retry_after)
    return DeliveryError(what)


def retry_after_seconds(value: str, now: datetime | None = None) -> float:
    """Seconds from a ``Retry-After`` value: delay-seconds or an HTTP-date (RFC 9110 10.2.3);
    0 when absent or unreadable."""
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _session(peer: PeerSettings, tls: TlsSettings, environ: Mapping[str, str]) -> requests.Session:
    """An HTTP session with the peer's authentication and certificate checking."""
    session = requests.Session()
    session.headers["Accept"] = ACCEPT
    if peer.tls_verify:  # the [tls] CA bundle when set, else the system's CAs
        session.verify = tls.ca_certificates or True
    else:
        session.verify = False
    if peer.auth != "none":
        session.headers["Authorization"] = authorization(peer, environ)
    return session


def authorization(peer: PeerSettings, environ: Mapping[str, str]) -> str:
    """The ``Authorization`` header of ``peer`` (RFC 7617 basic, RFC 6750 bearer), from its
    credentials file or environment variable, read at each send so a rotated secret is used."""
    secret = _secret(peer, environ)
    if peer.auth == "bearer":
        return f"Bearer {secret}"
    if ":" not in secret:
        raise TransientDeliveryError(
            f"peer {peer.name}: basic credentials must be one line 'user:password'"
        )
    return "Basic " + base64.b64encode(secret.encode("utf-8")).decode("ascii")


def _secret(peer: PeerSettings, environ: Mapping[str, str]) -> str:
    if peer.credentials_file:
        try:
            text = Path(peer.credentials_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TransientDeliveryError(
                f"peer {peer.name}: cannot read credentials_file {peer.credentials_file} "
                f"({type(exc).__name__})"
            ) from None
        where = f"credentials_file {peer.credentials_file}"
    else:
        text = environ.get(peer.credentials_env, "")
        where = f"environment variable {peer.credentials_env}"
    secret = text.strip()
    if not secret or "\n" in secret:
        raise TransientDeliveryError(f"peer {peer.name}: {where} must hold one non-empty line")
    return secret


def _where(peer: PeerSettings) -> str:
    return f"{peer.name} ({peer.dicomweb_url})"
