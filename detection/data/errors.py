"""The data package's own error types: each message names the file, record, annotation or field.

``DatasetError`` (a ``ValueError``) is the base of every refusal of bad dataset content:

- :class:`~detection.data.coco.CocoFormatError`: a json that cannot be read as COCO;
- :class:`~detection.data.mapper.InvalidSegmentationError`: a segmentation that is no mask;
- :class:`ImageSizeError`: an image file whose size differs from its record's;
- :class:`InvalidAnnotationError`: a record's annotation with a missing or malformed field;
- :class:`~detection.data.check.DataCheckError`: the data check found unusable records and
  skipping is off (its message is the problem table).

An unreadable image file raises :class:`~detection.data.image_io.ImageReadError`, an ``OSError``.
"""

from __future__ import annotations

__all__ = ["DatasetError", "ImageSizeError", "InvalidAnnotationError"]


class DatasetError(ValueError):
    """Dataset content that cannot be used. The message names where it is."""


class ImageSizeError(DatasetError):
    """An image file whose size (after EXIF orientation) is not its record's height/width."""


class InvalidAnnotationError(DatasetError):
    """A record's annotation whose field is missing or malformed (the message names both)."""
