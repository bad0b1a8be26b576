"""Opening slides and laying out patches: slide reading, tissue detection, the patch grid."""
