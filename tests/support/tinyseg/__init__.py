"""Source of the tiny custom-code segmentation model used by the tests.

These files are copied verbatim next to the checkpoint, the way a Hugging Face
repository with ``trust_remote_code`` ships its code; this package exists so the
tests can also import them directly to build and save the checkpoint.
"""
