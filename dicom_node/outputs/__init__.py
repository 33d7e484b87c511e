"""DICOM objects the node writes back into the study: SR, SC heatmaps, Parametric Maps, KOS."""
