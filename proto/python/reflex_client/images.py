"""Camera frames to the bytes the server decodes: HWC uint8 arrays are resized to the
model's input size and JPEG-encoded here, on the client, so a 1080p frame costs the wire
and the server no more than a 224×224 one. Encoded bytes pass through untouched.

The resize is a plain bilinear stretch to exactly the model's size, the same thing the
server does to a frame of another size, so sending a frame as an array or as full-size
bytes gives the model the same picture (up to JPEG).
"""

from __future__ import annotations

import io
from typing import Union

import numpy as np
import numpy.typing as npt

#: What `images={camera: frame}` accepts: an HWC (or HW) uint8 array, or JPEG/PNG bytes.
Frame = Union[npt.NDArray[np.uint8], bytes, bytearray, memoryview]

DEFAULT_JPEG_QUALITY = 90


def encode_frame(
    frame: Frame, size: tuple[int, int] | None, quality: int = DEFAULT_JPEG_QUALITY
) -> bytes:
    """Returns the bytes to send for one frame.

    `size` is the model's (height, width); None keeps the frame's size. Arrays must be
    uint8, HxWx3 (RGB), HxWx4 (RGBA, alpha dropped), HxWx1 or HxW (grayscale).
    """
    if isinstance(frame, bytes):
        return frame
    if isinstance(frame, (bytearray, memoryview)):
        return bytes(frame)
    if not isinstance(frame, np.ndarray):
        raise TypeError(
            f"an image must be a numpy array or encoded bytes, not {type(frame).__name__}"
        )
    if frame.dtype != np.uint8:
        raise ValueError(
            f"an image array must be uint8 (got {frame.dtype}); scale floats in [0, 1] "
            "with (255 * img).astype(np.uint8)"
        )
    arr = frame
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(
            f"an image array must be HxWx3 (RGB), HxWx4, HxWx1 or HxW; got shape {frame.shape}"
        )
    from PIL import Image  # imported on first use: bytes-only users never pay for it

    img = Image.fromarray(np.ascontiguousarray(arr))
    if img.mode != "RGB":
        img = img.convert("RGB")
    if size is not None and (img.height, img.width) != size:
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
