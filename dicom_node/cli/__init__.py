"""The ``dicom-node`` command: one module per command group; ``main`` parses and dispatches.

The CLI is one of the three edges where errors become outcomes: exit codes are decided in
:mod:`dicom_node.cli.main` only.
"""
