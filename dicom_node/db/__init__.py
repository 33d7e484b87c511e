"""The job database: models, engine and migrations."""
