from .moec_transformer import MoECTransformerModel  # noqa: F401  (registers the model and architectures)
