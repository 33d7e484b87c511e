"""The ``dicom-node`` command: one module per command group; ``main`` parses and dispatches.

The argument tree is :mod:`dicom_node.cli.parser`, built without importing any command's
implementation; ``main`` imports a command's module only when that command runs.  The CLI is
one of the edges where errors become outcomes: exit codes are decided in
:mod:`dicom_node.cli.main` only (``EXIT_CODE``), by the names of :mod:`dicom_node.cli.exits`.
"""
