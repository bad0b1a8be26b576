"""Stage two: the segmenter (training task, HisynSeg synthesis) and whole-slide prediction, one slide or many."""
