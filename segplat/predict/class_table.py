"""The class names and colours inside the class GeoTIFF itself: a GDAL raster attribute table in its GDAL_METADATA tag.

A GeoTIFF has no place of its own for category names; GDAL keeps them, and raster attribute tables (RATs), in an
`.aux.xml` sidecar, which a file copied alone (object storage, a tiler, a STAC asset) loses. GDAL 3.12 reads and
writes a RAT in the file's GDAL_METADATA TIFF tag (42112) as `<Item name="DEFAULT_RASTER_ATTRIBUTE_TABLE" sample="0"
role="rat">`; rasterio's wheels carry GDAL 3.10, which writes no such item. So the writer reserves the space: the
striped stream gets a band-1 metadata item of exactly the table's length (`reservation`), GDAL's COG driver copies it
into the COG's GDAL_METADATA with the rest of the header, and `embed` overwrites that item in place with the table,
padded with XML whitespace to the same byte count. No offset, size or IFD changes, so the COG layout stays valid.
GDAL 3.10 skips the item it does not know (no error); GDAL >= 3.12 (`gdalinfo`, QGIS) shows the table with the class
names and colours; `read_table` reads it back with no GDAL at all.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from segplat.errors import DataError

GDAL_METADATA_TAG = 42112
RESERVED_ITEM = "SEGPLAT_CLASS_TABLE"  # the band-1 metadata item that holds the table's place in the stream
# GDAL's RAT field types and usages (gdal.h GDALRATFieldType / GDALRATFieldUsage)
GFT_INTEGER, GFT_STRING = 0, 2
GFU_NAME, GFU_MINMAX, GFU_RED, GFU_GREEN, GFU_BLUE, GFU_ALPHA = 2, 5, 6, 7, 8, 9
FIELDS = (("value", GFT_INTEGER, GFU_MINMAX), ("class", GFT_STRING, GFU_NAME), ("red", GFT_INTEGER, GFU_RED),
          ("green", GFT_INTEGER, GFU_GREEN), ("blue", GFT_INTEGER, GFU_BLUE), ("alpha", GFT_INTEGER, GFU_ALPHA))


def table_item(classes: Sequence[str], palette: Sequence[Sequence[int]]) -> bytes:
    """The GDAL_METADATA item of a thematic RAT: one row per class (value, name, red, green, blue, alpha)."""
    fields = "".join(f'<FieldDefn index="{i}"><Name>{name}</Name><Type>{kind}</Type><Usage>{usage}</Usage>'
                     "</FieldDefn>" for i, (name, kind, usage) in enumerate(FIELDS))
    rows = "".join(f'<Row index="{i}"><F>{i}</F><F>{escape(name)}</F>'
                   + "".join(f"<F>{int(v)}</F>" for v in (*palette[i][:3], 255)) + "</Row>"
                   for i, name in enumerate(classes))
    return (f'<Item name="DEFAULT_RASTER_ATTRIBUTE_TABLE" sample="0" role="rat"><GDALRasterAttributeTable '
            f'tableType="thematic">{fields}{rows}</GDALRasterAttributeTable></Item>').encode()


def _reserved(length: int) -> bytes:
    return f'<Item name="{RESERVED_ITEM}" sample="0">{"x" * length}</Item>'.encode()


def reservation(classes: Sequence[str], palette: Sequence[Sequence[int]]) -> str:
    """The value of the band-1 item `RESERVED_ITEM` whose XML is at least as long as the table's."""
    need = len(table_item(classes, palette)) - len(_reserved(0))
    return "x" * max(1, need)


def _metadata_span(f: Any, path: Path) -> tuple[int, int]:
    """(file offset, byte count) of the first IFD's GDAL_METADATA value, classic TIFF or BigTIFF."""
    head = f.read(16)
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    if order is None:
        raise DataError(f"{path} is not a TIFF file.")
    (magic,) = struct.unpack(order + "H", head[2:4])
    big = magic == 43
    (ifd,) = struct.unpack(order + "Q", head[8:16]) if big else struct.unpack(order + "I", head[4:8])
    f.seek(ifd)
    count_size, entry = (8, 20) if big else (2, 12)
    (n,) = struct.unpack(order + ("Q" if big else "H"), f.read(count_size))
    entries = f.read(n * entry)
    for i in range(n):
        e = entries[i * entry:(i + 1) * entry]
        tag, _kind = struct.unpack(order + "HH", e[:4])
        if tag != GDAL_METADATA_TAG:
            continue
        count, value = struct.unpack(order + ("QQ" if big else "II"), e[4:])
        inline = count <= (8 if big else 4)
        return (ifd + count_size + i * entry + (12 if big else 8) if inline else value), count
    raise DataError(f"{path} has no GDAL_METADATA tag; it was not written by segplat's class raster writer.")


def embed(path: Path, classes: Sequence[str], palette: Sequence[Sequence[int]]) -> None:
    """Overwrite the reserved item of `path`'s GDAL_METADATA with the class table, in place, same byte count."""
    item = table_item(classes, palette)
    with open(path, "r+b") as f:
        offset, count = _metadata_span(f, path)
        f.seek(offset)
        xml = f.read(count)
        start = xml.find(f'<Item name="{RESERVED_ITEM}"'.encode())
        end = xml.find(b"</Item>", start) + len(b"</Item>")
        if start < 0 or end - start < len(item):
            raise DataError(f"{path}: the space reserved for the class table in its GDAL_METADATA tag is missing or "
                            "too short; predict the scene again.")
        f.seek(offset + start)
        f.write(item + b" " * (end - start - len(item)))


def read_table(path: str | Path) -> list[dict[str, Any]] | None:
    """The class table of band 1 of a GeoTIFF's GDAL_METADATA (one dict per row, by field name), None without one."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            offset, count = _metadata_span(f, path)
        except DataError:
            return None
        f.seek(offset)
        root = ElementTree.fromstring(f.read(count).rstrip(b"\0 ").decode())
    for item in root.iter("Item"):
        if item.get("role") == "rat" and item.get("sample", "0") == "0":
            table = item.find("GDALRasterAttributeTable")
            if table is None:
                return None
            names = [(d.findtext("Name"), int(d.findtext("Type") or GFT_STRING)) for d in table.findall("FieldDefn")]
            return [{name: (int(f.text or 0) if kind == GFT_INTEGER else (f.text or ""))
                     for (name, kind), f in zip(names, row.findall("F"))} for row in table.findall("Row")]
    return None
