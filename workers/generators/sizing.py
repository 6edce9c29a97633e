"""Output sizes shared by every backend (no torch here, the simulator uses it too)."""

from __future__ import annotations

SIZE_MULTIPLE = 16
"""Every output side is a multiple of 16: it divides the latent grid of 8x VAEs with
2x2 patch packing (Flux, Qwen-Image) and of plain 8x VAEs (SD), and it is what the
gateway accepts for explicit sizes."""


def round_down(value: float, multiple: int = SIZE_MULTIPLE) -> int:
    """`value` rounded down to a multiple of `multiple`, never below `multiple`."""
    return max(multiple, int(value) // multiple * multiple)


def edit_size(
    source_size: tuple[int, int],
    max_edge: int,
    width: int | None = None,
    height: int | None = None,
) -> tuple[int, int]:
    """(width, height) of an edit of an image of `source_size`.

    As the upstream RationalRewards regeneration script does: keep the source's
    aspect ratio, shrink (never enlarge) so the long edge is at most `max_edge`, and
    round each side down to a multiple of 16. A side given explicitly wins; the other
    then follows the source's aspect ratio.
    """
    src_w, src_h = source_size
    if width is not None and height is not None:
        return width, height
    if width is not None:
        return width, round_down(width * src_h / src_w)
    if height is not None:
        return round_down(height * src_w / src_h), height
    scale = min(1.0, max_edge / max(src_w, src_h))
    limit = round_down(max_edge)
    return min(limit, round_down(src_w * scale)), min(limit, round_down(src_h * scale))
