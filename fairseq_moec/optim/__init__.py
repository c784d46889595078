from .torch_adam import TorchAdam  # noqa: F401  (registration)
