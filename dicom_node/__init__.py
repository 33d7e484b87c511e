"""dicom-node: a PACS-side DICOM processing node for chest X-rays."""

__version__ = "0.1.0"
