"""The DICOM front door: the Storage and Verification SCP."""
