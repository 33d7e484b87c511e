"""Operations: what an administrator runs or watches (operator actions, retention, scale-out,
backup and restore, the doctor checks, metrics and readiness, start-up reconciliation).
"""
