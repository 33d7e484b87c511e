"""``dicom-node doctor``: read-only checks of a node's set-up, each a line the operator
can act on."""
