"""bluestream.storage."""
