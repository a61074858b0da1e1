"""Evaluation of a pre-trained backbone: labelled data, the kNN monitor, linear evaluation, export."""
