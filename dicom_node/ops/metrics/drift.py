"""The drift monitor's gauges: each model's latest drift point (``validation.monitor``).

Read at scrape time from the ``drift_points`` table, so every node's metrics endpoint shows
the figures the worker computed, whichever node computed them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import structlog
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.session import session_scope
from dicom_node.db.validation import DriftPoint

log = structlog.get_logger(__name__)


def drift_gauges(factory: sessionmaker[Session]) -> Iterator[Metric]:
    """Each model's latest drift point (``dicom_node.validation.monitor``)."""
    try:
        with session_scope(factory) as session:
            newest = select(func.max(DriftPoint.id)).group_by(DriftPoint.model_name)
            points = list(session.scalars(select(DriftPoint).where(DriftPoint.id.in_(newest))))
            session.expunge_all()
    except SQLAlchemyError as exc:
        log.warning("metrics.database_unavailable", error_type=type(exc).__name__)
        return
    score = GaugeMetricFamily(
        "dicom_node_model_drift_score",
        "Combined drift score of the model's recent window against its reference",
        labels=["model"],
    )
    alarm = GaugeMetricFamily(
        "dicom_node_model_drift_alarm", "1 while the drift score is over [drift] bound",
        labels=["model"],
    )  # fmt: skip
    z = GaugeMetricFamily(
        "dicom_node_model_drift_z",
        "z-score of one drift statistic (KS or chi-squared) against the reference",
        labels=["model", "field", "test"],
    )
    for point in points:
        score.add_metric([point.model_name], point.combined)
        alarm.add_metric([point.model_name], 1 if point.alarm else 0)
        for statistic in json.loads(point.statistics):
            z.add_metric([point.model_name, statistic["field"], statistic["test"]], statistic["z"])
    yield from (score, alarm, z)
