"""Decoding inputs into pixels, sizing them for the model, and the PNG encoder."""
