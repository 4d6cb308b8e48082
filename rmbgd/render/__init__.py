"""From image and mask to output bytes: crop, scale, background, encoders."""
