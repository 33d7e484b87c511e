"""The audit trail: who did what to which study, kept apart from the logs (PS3.15 A.5).

``trail`` records rows, ``spool`` keeps rows that meet a database outage, ``export`` and
``syslog`` copy them out, ``atna`` sends RFC 3881 / DICOM audit messages to a repository.
"""
