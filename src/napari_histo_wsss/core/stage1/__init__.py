"""Stage one: the CAM classifier (training task, SegMix curriculum) and CAMs to pseudo-masks."""
