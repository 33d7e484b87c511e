"""Backup and restore of the database, the stored files and the configuration."""
