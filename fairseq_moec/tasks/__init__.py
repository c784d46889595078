from .translation_moec import TranslationMoECTask  # noqa: F401
