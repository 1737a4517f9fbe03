"""bluestream.schemas."""
