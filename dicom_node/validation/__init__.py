"""Local validation of a model at this site: ground-truth labels, the validation report
(discrimination, calibration, operating points, localization) and the drift monitor.

The statistics (``stats``), the report's HTML (``html``) and the drift statistics (``drift``)
are pure functions of arrays; ``labels``, ``report`` and ``monitor`` read and write the
database.  No torch here: a report is computed from the scores the worker stored.
"""
