"""Producer: watch folders and publish every image change to the images topic."""

from producer.service import Producer

__all__ = ["Producer"]
