"""EXIF: the orientation that turns a photo upright, and the tags kept for the output.
"""

from __future__ import annotations

from PIL import ExifTags, Image

from rmbgd.imaging.pillow import PILLOW_ERRORS

_EXIF_ORIENTATION = 0x0112
EXIF_PREFIX = b"Exif\x00\x00"
_TIFF_HEADERS = (b"II*\x00", b"MM\x00*")
# First-IFD tags worth carrying into an output: who took the photo, when, with what, and the
# pointers to the Exif and GPS sub-IFDs (kept whole). Everything else there is dropped: in a
# TIFF input the first IFD also describes the file's own pixel layout (strip offsets, sample
# formats, colour maps, embedded XMP/ICC/Photoshop blocks with thumbnails), which would be
# false in the output; an allowlist keeps unknown private blobs out too. Resolution tags go
# as well: they would give a cropped or shrunk result its source's print size. The
# thumbnail (IFD1) is not carried either (Exif.tobytes never writes it): it would still
# show the removed background.
_EXIF_KEPT_TAGS = frozenset(
    {
        ExifTags.Base.ImageDescription,
        ExifTags.Base.Make,
        ExifTags.Base.Model,
        _EXIF_ORIENTATION,
        ExifTags.Base.Software,
        ExifTags.Base.DateTime,
        ExifTags.Base.Artist,
        ExifTags.Base.HostComputer,
        ExifTags.Base.Copyright,
        ExifTags.Base.Rating,
        ExifTags.Base.RatingPercent,
        ExifTags.Base.XPTitle,
        ExifTags.Base.XPComment,
        ExifTags.Base.XPAuthor,
        ExifTags.Base.XPKeywords,
        ExifTags.Base.XPSubject,
        ExifTags.IFD.Exif,
        ExifTags.IFD.GPSInfo,
    }
)


TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def read_exif(im: Image.Image) -> Image.Exif | None:
    # A photo with damaged EXIF is still a good photo; like most viewers, show it as
    # stored rather than reject it.
    try:
        return im.getexif()
    except PILLOW_ERRORS:
        return None


def exif_orientation(exif: Image.Exif | None) -> int:
    if not exif:
        return 1
    try:
        value = exif.get(_EXIF_ORIENTATION, 1)
    except PILLOW_ERRORS:
        return 1
    return value if isinstance(value, int) else 1


def exif_for_output(exif: Image.Exif | None) -> bytes | None:
    """The EXIF to embed in results, or None; edits ``exif`` in place (it is thrown away)."""
    if not exif:
        return None  # the common no-EXIF case costs one length check
    try:
        for tag in [tag for tag in exif if tag not in _EXIF_KEPT_TAGS]:
            del exif[tag]
        if all(tag == _EXIF_ORIENTATION for tag in exif):
            return None
        exif[_EXIF_ORIENTATION] = 1
        blob = exif.tobytes()
    except (*PILLOW_ERRORS, TypeError):
        # Parsing is lazy, so damaged sub-IFDs and values Pillow cannot write back only
        # show up here (TypeError included: the TIFF writer raises it for odd value types).
        # The pixels are fine; the result simply goes without EXIF.
        return None
    blob = blob[len(EXIF_PREFIX) :] if blob.startswith(EXIF_PREFIX) else blob
    return blob if blob.startswith(_TIFF_HEADERS) else None


def tiff_exif(exif: bytes | None) -> bytes | None:
    """The bare TIFF-structured EXIF blob that PNG's eXIf chunk and WebP's EXIF chunk hold.

    Also takes the blob with JPEG's ``Exif\\0\\0`` prefix, since that is what Pillow's own
    ``Exif.tobytes()`` returns. Empty means none.
    """
    if exif is None:
        return None
    if not isinstance(exif, (bytes, bytearray)):
        raise TypeError(f"exif must be bytes, got {type(exif).__name__}")
    exif = bytes(exif)
    if exif.startswith(EXIF_PREFIX):
        exif = exif[len(EXIF_PREFIX) :]
    if not exif:
        return None
    if not exif.startswith(_TIFF_HEADERS):
        raise ValueError("exif must be a TIFF-structured EXIF blob (starting with II*\\0 or MM\\0*)")
    return exif
