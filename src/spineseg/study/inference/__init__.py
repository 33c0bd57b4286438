"""Prediction from saved models: a bundle (`bundle`) or the study's own folders, applied to new radiographs
(`apply`). Imports `core` only: nothing of training, the run store or the stages (`spineseg predict --model`)."""
