"""Per-family processors: raw uint8 images and video frames -> the pixel inputs of each tower."""
