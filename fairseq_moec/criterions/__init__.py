from .moec_label_smoothed_cross_entropy import MoECLabelSmoothedCrossEntropy  # noqa: F401
