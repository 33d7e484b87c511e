"""The JSON API's request and response models (pydantic): the OpenAPI schema is built from them.

Every AI result carries ``notice`` ("AI result – decision support") and, where it came from
untrained or unverified weights, ``model_warning``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dicom_node.outputs.sr import AI_NOTICE


class ErrorOut(BaseModel):
    detail: str


class FindingOut(BaseModel):
    label: str
    probability: float
    threshold: float | None
    decision: Literal["positive", "negative"]
    boxes: list[list[int]] = Field(description="[x0, y0, x1, y1] in source image pixels")


class WorklistItemOut(BaseModel):
    study_instance_uid: str
    received_at: datetime
    accession_number: str
    patient_name: str
    patient_id: str
    status: Literal["queued", "analysing", "done", "not_analysed", "failed"]
    status_detail: str
    priority: Literal["critical", "abnormal", "routine"]
    top_findings: list[FindingOut]
    model_warning: str
    notice: str = AI_NOTICE


class WorklistOut(BaseModel):
    items: list[WorklistItemOut]
    notice: str = AI_NOTICE


class ModelOut(BaseModel):
    name: str
    version: str
    weights_sha256: str
    weights_status: str
    thresholds_source: str
    warning: str
    card_sha256: str = ""  # the model card's SHA-256 ("": results from before model cards)
    runtime: str = ""  # torch or onnxruntime


class OutputOut(BaseModel):
    sop_instance_uid: str
    kind: str
    label: str
    download_url: str


class DeliveryOut(BaseModel):
    peer: str
    state: str
    delivered: int
    total: int
    last_status: str


class FeedbackOut(BaseModel):
    study_instance_uid: str
    label: str
    verdict: Literal["agree", "disagree"]
    comment: str
    username: str
    created_at: datetime


class StudyResultOut(BaseModel):
    study: WorklistItemOut
    analysed_sop_instance_uid: str | None
    model: ModelOut | None
    notes: str
    findings: list[FindingOut]
    outputs: list[OutputOut]
    deliveries: list[DeliveryOut]
    feedback: list[FeedbackOut]
    notice: str = AI_NOTICE


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str = Field(min_length=1, max_length=64, description="a finding label of the result")
    verdict: Literal["agree", "disagree"]
    comment: str = Field(default="", max_length=2000)
